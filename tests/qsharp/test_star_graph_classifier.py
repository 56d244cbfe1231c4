"""The star-graph classifier's backbones: from the reference, and from a pretrained LM whose
vocabulary is mapped onto the graph's tokens (a tiny random Llama with a byte-level tokenizer
stands in for SmolLM2)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.checkpoints import loader
from qsharp_jax.models import decoder as model_lib
from qsharp_jax.models.config import ModelConfig
from qsharp_jax.qsharp import star_graph as qsg
from qsharp_jax.tasks import star_graph as sg

from conftest import byte_chat_tokenizer, write_tiny_model


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("pretrained") / "model"), byte_chat_tokenizer())


def test_graph_tokens_map_to_distinct_single_tokens_of_the_pretrained_tokenizer():
    tokenizer, star = byte_chat_tokenizer(), sg.Tokenizer(num_nodes=50)
    ids = qsg.pretrained_token_ids(tokenizer, star)
    assert ids.shape == (star.vocab_size,) and len(set(ids.tolist())) == star.vocab_size
    # byte-level: " A" is two tokens, so each node is a bare letter; separators are themselves
    assert tokenizer.decode([int(ids[0])]) == "A" and tokenizer.decode([int(ids[26])]) == "a"
    for sep in sg.SEPARATORS:
        assert tokenizer.decode([int(ids[star.sep_ids[sep]])]) == sep
    # 52 letters, and no letter pairs are single byte tokens: 53 nodes cannot be named
    with pytest.raises(ValueError, match=r"53 distinct single-token names.*lower graph\.num_nodes"):
        qsg.pretrained_token_ids(tokenizer, sg.Tokenizer(num_nodes=53))


def test_pretrained_backbone_keeps_the_lm_blocks_and_its_embeddings_of_the_mapped_tokens(pretrained_dir):
    star = sg.Tokenizer(num_nodes=20)
    source = loader.load(pretrained_dir)
    ids = qsg.pretrained_token_ids(source.tokenizer, star)
    ref_cfg = ModelConfig(model_type="llama", vocab_size=star.vocab_size, hidden_size=8, intermediate_size=16,
                          num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4)  # fmt: skip
    reference = model_lib.build(ref_cfg, seed=0)
    guide = qsg.build_classifier(reference, ref_cfg, "pretrained", seed=3, star=star, pretrained_path=pretrained_dir)
    backbone = guide.backbone
    assert backbone.cfg.vocab_size == star.vocab_size and backbone.cfg.hidden_size == source.config.hidden_size
    np.testing.assert_array_equal(
        np.asarray(backbone.embed.get_value()), np.asarray(source.model.embed.get_value())[ids]
    )
    ours = dict(nnx.to_flat_state(nnx.split(backbone)[1]))
    theirs = dict(nnx.to_flat_state(nnx.split(source.model)[1]))
    for path, var in ours.items():
        if path[0] != "embed":
            np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(theirs[path].get_value()))
    # the graph read by the backbone = the LM reading the mapped tokens (same hidden states)
    graph = jnp.asarray([[0, star.sep_ids[","], 1, star.sep_ids["|"], 1, star.sep_ids[","], 2]])
    mask = jnp.ones(graph.shape, bool)
    positions = model_lib.positions_from_mask(mask)
    h_ours, _ = backbone(graph, positions, token_mask=mask)
    h_lm, _ = source.model(jnp.asarray(ids)[graph], positions, token_mask=mask)
    np.testing.assert_array_equal(np.asarray(h_ours), np.asarray(h_lm))
    with pytest.raises(ValueError, match="needs the star-graph tokenizer"):
        qsg.build_classifier(reference, ref_cfg, "pretrained", seed=3, pretrained_path=pretrained_dir)
