"""The one table that maps Hugging Face tensor names onto our decoder's parameters.

Import (HF/GGUF -> ours) and export (ours -> HF) both read :data:`RULES`; nothing else
knows a tensor name. A rule says which HF tensor feeds which parameter and how the
layout differs:

* ``in_dims=None``: same values and shape (embedding, norms); with ``flat=True`` HF
  keeps a flat vector that we split into named axes (biases ``[H*D] -> [H, D]``).
* ``in_dims=n``: an HF ``Linear`` weight, stored ``[out, in]``. Ours is ``[in..., out...]``
  whose first ``n`` dims flatten to HF's ``in``: transpose, then reshape
  (``q_proj [H*D, E] -> wq [E, H, D]`` has ``n=1``; ``o_proj [E, H*D] -> wo [H, D, E]`` has ``n=2``).

q/k weights need no permutation: the decoder uses HF's rotate-half RoPE layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from qsharp_jax.models.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" stands for the layer index
    ours: str  # our parameter path, "/"-separated; "{i}" as above
    in_dims: int | None = None  # see module docstring
    flat: bool = False  # HF stores a flat vector (biases)
    when: str | None = None  # ModelConfig flag that must hold ("untied" = not tie_word_embeddings)


_L = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed"),
    Rule(_L + "input_layernorm.weight", "layers/{i}/attn_norm/scale"),
    Rule(_L + "self_attn.q_proj.weight", "layers/{i}/attn/wq", in_dims=1),
    Rule(_L + "self_attn.k_proj.weight", "layers/{i}/attn/wk", in_dims=1),
    Rule(_L + "self_attn.v_proj.weight", "layers/{i}/attn/wv", in_dims=1),
    Rule(_L + "self_attn.o_proj.weight", "layers/{i}/attn/wo", in_dims=2),
    Rule(_L + "self_attn.q_proj.bias", "layers/{i}/attn/bq", flat=True, when="qkv_bias"),
    Rule(_L + "self_attn.k_proj.bias", "layers/{i}/attn/bk", flat=True, when="qkv_bias"),
    Rule(_L + "self_attn.v_proj.bias", "layers/{i}/attn/bv", flat=True, when="qkv_bias"),
    Rule(_L + "self_attn.q_norm.weight", "layers/{i}/attn/q_norm/scale", when="qk_norm"),
    Rule(_L + "self_attn.k_norm.weight", "layers/{i}/attn/k_norm/scale", when="qk_norm"),
    Rule(_L + "post_attention_layernorm.weight", "layers/{i}/mlp_norm/scale"),
    Rule(_L + "mlp.gate_proj.weight", "layers/{i}/mlp/gate", in_dims=1),
    Rule(_L + "mlp.up_proj.weight", "layers/{i}/mlp/up", in_dims=1),
    Rule(_L + "mlp.down_proj.weight", "layers/{i}/mlp/down", in_dims=1),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "lm_head", in_dims=1, when="untied"),
)

# HF tensors that carry no parameter (buffers some old checkpoints saved); skipped silently.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One rule applied to one layer: an HF tensor <-> one of our parameters."""

    hf: str
    path: tuple  # our state path, e.g. ("layers", 0, "attn", "wq")
    in_dims: int | None
    flat: bool = False

    @property
    def path_str(self) -> str:
        return "/".join(str(p) for p in self.path)


def _applies(rule: Rule, cfg: ModelConfig) -> bool:
    if rule.when is None:
        return True
    if rule.when == "untied":
        return not cfg.tie_word_embeddings
    return bool(getattr(cfg, rule.when))


def entries(cfg: ModelConfig) -> Iterator[Entry]:
    """Every (HF name, our path) pair of a model with config ``cfg``, in checkpoint order."""
    for rule in RULES:
        if not _applies(rule, cfg):
            continue
        layers = range(cfg.num_layers) if "{i}" in rule.hf else (None,)
        for i in layers:
            hf = rule.hf.format(i=i)
            path = tuple(int(p) if p.isdigit() else p for p in rule.ours.format(i=i).split("/"))
            yield Entry(hf, path, rule.in_dims, rule.flat)


def hf_shape(entry: Entry, our_shape: tuple) -> tuple:
    """The HF tensor shape that maps onto a parameter of ``our_shape``."""
    if entry.in_dims is None:
        return (math.prod(our_shape),) if entry.flat else tuple(our_shape)
    n = entry.in_dims
    return (math.prod(our_shape[n:]), math.prod(our_shape[:n]))


def check_shape(entry: Entry, got: tuple, our_shape: tuple) -> None:
    """Raise a ConversionError naming the tensor if ``got`` is not the HF shape we need."""
    want = hf_shape(entry, tuple(our_shape))
    if tuple(got) != want:
        raise ConversionError(
            f"tensor {entry.hf!r} has shape {tuple(got)}, expected {want} (for parameter "
            f"{entry.path_str} of shape {tuple(our_shape)}): the weights do not match the config "
            "(hidden_size / heads / head_dim / intermediate_size / vocab_size); fix config.json or "
            "re-export the checkpoint."
        )


def to_ours(entry: Entry, x: np.ndarray, our_shape: tuple) -> np.ndarray:
    """HF layout -> ours (checks the shape first, naming the tensor)."""
    check_shape(entry, x.shape, our_shape)
    if entry.in_dims is None:
        return x.reshape(our_shape)
    # [out, in] -> [in, out] -> split in/out into our named axes.
    return np.ascontiguousarray(x.T).reshape(our_shape)


def to_hf(entry: Entry, y: np.ndarray) -> np.ndarray:
    """Our layout -> HF (inverse of :func:`to_ours`)."""
    shape = hf_shape(entry, y.shape)
    if entry.in_dims is None:
        return y.reshape(shape)
    out, inn = shape
    return np.ascontiguousarray(y.reshape(inn, out).T)


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)
