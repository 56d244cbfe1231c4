"""HF checkpoint -> Orbax (CLI) -> loader.load -> logits match transformers; export back
to HF and reload in transformers; bf16; sharded safetensors; the rules table itself."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import convert, export
from qsharp_jax.checkpoints import files, hf, loader
from qsharp_jax.checkpoints.export import export_hf
from qsharp_jax.models import weights
from qsharp_jax.models.config import load_hf_config
from qsharp_jax.models.decoder import forward_logits

from conftest import TINY_NAMES, hf_logits, left_padded_batch

# Long enough (40) to pass llama3_rope's original_max_position_embeddings (32); left padded.
LENGTHS = (40, 23, 1)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _ours(lm, tokens, mask) -> np.ndarray:
    graphdef, state = nnx.split(lm.model)
    fwd = jax.jit(lambda s, t, m: forward_logits(nnx.merge(graphdef, s), t, m))
    return np.asarray(fwd(state, tokens, mask))


def _max_err(a, b, mask) -> float:
    return float(np.abs(a - b)[mask].max())


@pytest.fixture(scope="module")
def converted(tiny_hf_models, tmp_path_factory):
    """name -> (hf folder, orbax dir), converted through the CLI entry point."""
    cache = {}

    def get(name):
        if name not in cache:
            src = tiny_hf_models(name)
            out = str(tmp_path_factory.mktemp("conv") / name)
            assert convert.main(["--src", src, "--out", out, "--mesh", "1,1,1"]) == 0
            cache[name] = (src, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", TINY_NAMES)
def test_converted_logits_match_transformers(name, converted, capsys):
    src, out = converted(name)
    assert sorted(os.listdir(out)) == ["config.json", "params", "qsharp_config.json"]
    tokens, mask = left_padded_batch(256, LENGTHS)
    ref = hf_logits(src, tokens, mask)
    lm = loader.load(out)
    assert lm.config == load_hf_config(src)
    assert lm.tokenizer is None
    err = _max_err(_ours(lm, tokens, mask), ref, mask)
    with capsys.disabled():
        print(f"\n[parity] {name}: max abs logit error {err:.2e} (|logits| max {np.abs(ref).max():.1f})")
    assert err < 1e-4


@pytest.mark.parametrize("name", TINY_NAMES)
def test_export_round_trip_loads_in_transformers(name, converted, tmp_path):
    src, out = converted(name)
    lm = loader.load(out)
    hf_dir = export_hf(tmp_path / "hf", lm.model, lm.config)
    tokens, mask = left_padded_batch(256, LENGTHS, seed=1)
    ref = hf_logits(src, tokens, mask)
    err = _max_err(hf_logits(hf_dir, tokens, mask), ref, mask)
    assert err < 1e-4, err
    # and back again through our HF reader: same config, same params bit for bit
    again = loader.load(hf_dir)
    assert again.config == lm.config
    for a, b in zip(
        jax.tree.leaves(nnx.state(lm.model, nnx.Param)), jax.tree.leaves(nnx.state(again.model, nnx.Param))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_hf_folder_directly_and_sharded_index(tiny_hf_models):
    src = tiny_hf_models("qwen2", sharded=True)
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 1
    tokens, mask = left_padded_batch(256, LENGTHS, seed=2)
    lm = loader.load(src)
    assert _max_err(_ours(lm, tokens, mask), hf_logits(src, tokens, mask), mask) < 1e-4


def test_bfloat16_convert(tiny_hf_models, tmp_path):
    src = tiny_hf_models("llama", dtype="bfloat16")  # bf16 safetensors, like real HF releases
    out = str(tmp_path / "bf16")
    summary = hf.convert(src, out, dtype="bfloat16", mesh="1,1,1", log=None)
    assert summary.dtype == "bfloat16" and summary.num_params == load_hf_config(src).num_params()
    assert _read_json(os.path.join(out, "qsharp_config.json"))["param_dtype"] == "bfloat16"
    tokens, mask = left_padded_batch(256, LENGTHS, seed=3)
    ref = hf_logits(src, tokens, mask)  # float32 compute on the bf16 weights
    # stored dtype is kept by default ...
    lm16 = loader.load(out, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(lm16.model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    assert _max_err(_ours(lm16, tokens, mask), ref, mask) < 0.25  # bf16 compute
    # ... and bf16 params upcast to float32 reproduce the float32 reference exactly
    lm32 = loader.load(out, param_dtype=jnp.float32)
    assert _max_err(_ours(lm32, tokens, mask), ref, mask) < 1e-4
    # export keeps bf16 and transformers reads it
    hf_dir = export_hf(tmp_path / "hf16", lm16.model, lm16.config)
    assert _read_json(os.path.join(hf_dir, "config.json"))["torch_dtype"] == "bfloat16"
    assert _max_err(hf_logits(hf_dir, tokens, mask), ref, mask) < 1e-4


def test_export_writes_sharded_index(converted, tmp_path):
    src, out = converted("llama")
    lm = loader.load(out)
    hf_dir = export_hf(tmp_path / "hf", lm.model, lm.config, max_shard_bytes=100_000)
    index = _read_json(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    tokens, mask = left_padded_batch(256, LENGTHS)
    assert _max_err(hf_logits(hf_dir, tokens, mask), hf_logits(src, tokens, mask), mask) < 1e-4


@pytest.mark.parametrize("name", TINY_NAMES)
def test_rules_cover_exactly_the_decoder_params(name, tiny_hf_models):
    """Every decoder parameter has exactly one rule and every HF tensor is used (or tied away)."""
    from safetensors import safe_open

    src = tiny_hf_models(name)
    cfg = load_hf_config(src)
    _, abstract = hf.abstract_params(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rules=hf.DEFAULT_RULES)
    ours = set(files.flat_by_path(abstract))
    plan = list(weights.entries(cfg))
    assert len({e.path for e in plan}) == len(plan) and {e.path for e in plan} == ours
    with safe_open(os.path.join(src, "model.safetensors"), "numpy") as f:
        assert {e.hf for e in plan} == set(f.keys())


def test_layout_transforms_are_inverse():
    rng = np.random.default_rng(0)
    for in_dims, flat, our_shape in [
        (1, False, (6, 2, 3)),
        (2, False, (2, 3, 6)),
        (None, True, (2, 3)),
        (None, False, (5, 4)),
    ]:
        e = weights.Entry("x", ("x",), in_dims, flat)
        y = rng.standard_normal(our_shape)
        x = weights.to_hf(e, y)
        assert x.shape == weights.hf_shape(e, our_shape)
        np.testing.assert_array_equal(weights.to_ours(e, x, our_shape), y)
    # q_proj rows are (head, head_dim) in HF: wq[e, h, d] == q_proj[h * D + d, e]
    e = weights.Entry("q", ("q",), 1)
    q_proj = rng.standard_normal((2 * 3, 5))
    wq = weights.to_ours(e, q_proj, (5, 2, 3))
    assert wq[4, 1, 2] == q_proj[1 * 3 + 2, 4]


def _byte_tokenizer():
    """A tiny byte-level BPE tokenizer over the 256-token vocabulary of the tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=backend.id_to_token(1), eos_token=backend.id_to_token(2)
    )
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    return tok


def test_tokenizer_travels_through_convert_and_export_cli(tiny_hf_models, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    src = str(tmp_path / "src")
    shutil.copytree(tiny_hf_models("llama_tied"), src)
    _byte_tokenizer().save_pretrained(src)
    out, hf_out = str(tmp_path / "orbax"), str(tmp_path / "hf")
    assert convert.main(["--src", src, "--out", out, "--dtype", "bfloat16"]) == 0
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    lm = loader.load(out)
    msgs = [{"role": "user", "content": "héllo"}]
    text = lm.tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "[user] héllo\n" and lm.tokenizer.decode(lm.tokenizer(text)["input_ids"]) == text
    assert export.main(["--src", out, "--out", hf_out]) == 0
    ref = AutoTokenizer.from_pretrained(hf_out)
    assert ref(text)["input_ids"] == lm.tokenizer(text)["input_ids"]
    tokens, mask = left_padded_batch(256, LENGTHS)
    # bf16-stored weights: exported bf16 folder vs the same bf16 params in float32 compute
    lm32 = loader.load(out, param_dtype=jnp.float32)
    assert _max_err(hf_logits(hf_out, tokens, mask), _ours(lm32, tokens, mask), mask) < 1e-4
