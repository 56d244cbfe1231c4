"""Decoder hyper-parameters, read from a Hugging Face ``config.json``.

One dataclass describes every supported family (Llama 3.x, Qwen2/2.5, Qwen3); the
differences are flags (q/k/v bias, q/k RMSNorm, explicit head_dim, tied embeddings,
RoPE scaling). Both the transformers 4.x (``rope_theta`` + ``rope_scaling``) and 5.x
(``rope_parameters``) spellings are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

# model_type -> family flags that the config.json does not spell out.
_FAMILIES = {
    "llama": dict(qkv_bias=None, qk_norm=False),  # None: read ``attention_bias``
    "qwen2": dict(qkv_bias=True, qk_norm=False),
    "qwen3": dict(qkv_bias=None, qk_norm=True),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))
_ROPE_TYPES = ("default", "llama3", "linear")


class ConfigError(ValueError):
    """A model config we cannot build a decoder for."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # llama3 / linear scaling parameters, as a sorted tuple of (name, value) so the config hashes.
    rope_scaling: tuple = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        e, d, m = self.hidden_size, self.head_dim, self.intermediate_size
        attn = e * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        layer = attn + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_layers * layer + e + head

    def matmul_flops_per_token(self, lm_head: bool = True) -> int:
        """2 x (weights touched per token): the dense-matmul FLOPs of one token."""
        e, d, m = self.hidden_size, self.head_dim, self.intermediate_size
        layer = e * d * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * e * m
        return 2 * (self.num_layers * layer + (self.vocab_size * e if lm_head else 0))

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies (head_dim/2,) in float64, with the configured scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        p = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv = inv / p["factor"]
        elif self.rope_type == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old_len = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
            smooth = (old_len / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * inv / factor + smooth * inv
            inv = np.where(wavelen > lo_wavelen, inv / factor, np.where(wavelen < hi_wavelen, inv, mid))
        return inv

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = tuple(sorted(d.get("rope_scaling", {}).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, str, tuple]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)}); "
            "remove `rope_scaling` from config.json to run at the original context length."
        )
    keep = {
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "linear": ("factor",),
        "default": (),
    }[rope_type]
    missing = [k for k in keep if k not in merged]
    if missing:
        raise ConfigError(f"RoPE type {rope_type!r} needs {missing} in config.json `rope_scaling`.")
    return theta, rope_type, tuple(sorted((k, float(merged[k])) for k in keep))


def from_hf_dict(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from a parsed HF ``config.json``."""
    model_type = hf.get("model_type")
    if model_type not in _FAMILIES:
        archs = hf.get("architectures")
        raise ConfigError(
            f"unknown architecture model_type={model_type!r} (architectures={archs}); qsharp-jax supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}: convert a Llama 3.x, Qwen2/2.5 or Qwen3 checkpoint."
        )
    fam = _FAMILIES[model_type]
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=True is not supported (no Llama/Qwen release uses it).")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ConfigError("Qwen2 sliding-window attention is not supported; set use_sliding_window=false.")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    theta, rope_type, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    qkv_bias = fam["qkv_bias"] if fam["qkv_bias"] is not None else bool(hf.get("attention_bias", False))
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=fam["qk_norm"],
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={cfg.num_kv_heads}.")
    return cfg


def to_hf_dict(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The HF ``config.json`` content for ``cfg`` (transformers 5.x spelling), weights stored as ``dtype``."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
    if "original_max_position_embeddings" in rope:
        rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    d = {
        "architectures": [arch],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.rope_type != "default":
        d["rope_scaling"] = rope
    if cfg.model_type != "qwen2":
        d["attention_bias"] = cfg.qkv_bias
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        d["eos_token_id"] = list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1 else cfg.eos_token_ids[0]
    return d


def load_hf_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` from an HF model folder (or the file itself)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "config.json")
    if not os.path.exists(p):
        raise FileNotFoundError(f"no config.json at {p}: pass an HF model folder that holds config.json.")
    with open(p) as f:
        return from_hf_dict(json.load(f))
