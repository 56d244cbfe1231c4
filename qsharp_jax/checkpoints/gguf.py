"""Read a ``.gguf`` file as if it were an HF checkpoint: HF-style config, HF tensor names,
float32 numpy tensors (dequantized one at a time), and an HF tokenizer.

numpy and the ``gguf`` package only (no torch): the file is memory-mapped and each
tensor is dequantized when asked for, so a big file never sits in RAM as float32.

llama.cpp stores the q/k projections of Llama-architecture models permuted for its
interleaved RoPE; :func:`unpermute_qk` (and nothing else) undoes that, so the weights
come out in HF's rotate-half layout that the decoder uses.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from qsharp_jax.models.config import ConfigError, ModelConfig, from_hf_dict
from qsharp_jax.models.weights import ConversionError

# GGUF architecture -> HF model_type (same names here); and which ones llama.cpp permutes.
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_ARCHS = ("llama",)

# GGUF tensor name (per-layer part after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation along the leading (output) axis.

    Per head llama.cpp reorders the head_dim rows from rotate-half order
    [x_0..x_{D/2-1}, y_0..y_{D/2-1}] into interleaved pairs [x_0, y_0, x_1, y_1, ...];
    we read them back as (head, D/2, pair) and swap to (head, pair, D/2). Works for
    weights [H*D, E] and biases [H*D].
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ConversionError(f"cannot unpermute a q/k tensor with {rows} rows into {n_heads} heads.")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf_name(name: str) -> str | None:
    """HF tensor name for a GGUF tensor name (None for tensors we do not use)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _value(field) -> Any:
    return field.contents()


def _f32(v) -> float:
    """The shortest decimal of a float32 metadata value: GGUF stores 1e-5 as 9.99999974e-06."""
    return float(str(np.float32(v)))


class GGUFCheckpoint:
    """A GGUF file seen through HF names. ``tensor(hf_name)`` dequantizes one tensor."""

    def __init__(self, path: str | os.PathLike):
        import gguf  # lazy: only needed for GGUF sources

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no GGUF file at {self.path}: pass the path of an existing .gguf file.")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:
            raise ConversionError(f"{self.path} is not a readable GGUF file ({e}); re-download or re-export it.") from e
        self._fields = self._reader.fields
        self.architecture = self.meta("general.architecture")
        self._tensors = {}
        for t in self._reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
        self.hf_config = self._hf_config()
        self.config: ModelConfig = from_hf_dict(self.hf_config)

    def meta(self, key: str, default: Any = None) -> Any:
        f = self._fields.get(key)
        return default if f is None else _value(f)

    def _hf_config(self) -> dict:
        arch = self.architecture
        if arch not in _ARCHS:
            raise ConfigError(
                f"unknown architecture: GGUF general.architecture={arch!r}; qsharp-jax reads GGUF files of "
                f"{', '.join(sorted(_ARCHS))} models. Use a Llama 3.x / Qwen2 / Qwen3 GGUF or an HF folder."
            )
        if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
            raise ConfigError(
                "this GGUF stores Llama-3.1 RoPE scaling as a rope_freqs tensor, which the GGUF reader does "
                "not translate; convert the original HF folder instead (its config.json carries rope_scaling)."
            )
        m = lambda k, d=None: self.meta(f"{arch}.{k}", d)
        heads = int(m("attention.head_count"))
        hidden = int(m("embedding_length"))
        head_dim = int(m("attention.key_length", hidden // heads))
        rope_dim = m("rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise ConfigError(
                f"partial rotary embeddings (rope dim {rope_dim} != head_dim {head_dim}) are not supported."
            )
        tokens = self._fields.get("tokenizer.ggml.tokens")
        vocab = m("vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None:
            vocab = int(self._tensors["model.embed_tokens.weight"].shape[-1])
        names = {t.name for t in self._reader.tensors}
        hf = {
            "model_type": _ARCHS[arch],
            "architectures": [
                {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
            ],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(m("feed_forward_length")),
            "num_hidden_layers": int(m("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(m("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(m("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(m("context_length", 8192)),
            # llama.cpp drops output.weight when the LM head is the embedding.
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
        }
        scaling = m("rope.scaling.type")
        if scaling not in (None, "none"):
            hf["rope_scaling"] = {"rope_type": scaling, "factor": _f32(m("rope.scaling.factor", 1.0))}
        for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            v = self.meta(f"tokenizer.ggml.{key}")
            if v is not None:
                hf[hf_key] = int(v)
        return hf

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, hf_name: str) -> tuple:
        return tuple(int(d) for d in reversed(self._tensors[hf_name].shape))  # GGUF lists dims fastest-first

    def tensor(self, hf_name: str) -> np.ndarray:
        """float32 tensor in HF layout (dequantized; q/k unpermuted when the architecture needs it)."""
        from gguf import quants

        t = self._tensors[hf_name]
        x = quants.dequantize(t.data, t.tensor_type)
        # Always a fresh array: an unquantized tensor is a view of the memory-mapped file,
        # which must not end up aliased by a device buffer.
        x = np.array(x, dtype=np.float32).reshape(self.shape(hf_name))
        if self.architecture in _PERMUTED_ARCHS:
            if ".q_proj." in hf_name:
                x = unpermute_qk(x, self.config.num_heads)
            elif ".k_proj." in hf_name:
                x = unpermute_qk(x, self.config.num_kv_heads)
        return x

    def tokenizer(self):
        """An HF fast tokenizer built from the file's vocabulary (None if the file has none)."""
        if "tokenizer.ggml.tokens" not in self._fields:
            return None
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

        # Same grouping as transformers' own GGUF reader, but read with the torch-free gguf package.
        groups = {}
        for group, renames in GGUF_TOKENIZER_MAPPING.items():
            groups[group] = {
                name: self.meta(f"tokenizer.{key}")
                for key, name in renames.items()
                if f"tokenizer.{key}" in self._fields
            }
        tok_dict, tok_config = groups["tokenizer"], groups["tokenizer_config"]
        if tok_dict.get("tokenizer_type") == "llama":
            tok_config.setdefault("add_bos_token", True)  # sentencepiece vocabularies add BOS unless told not to
        tokens = tok_dict["tokens"]
        for special, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            idx = self.meta(f"tokenizer.ggml.{key}")
            tok_config[special] = tokens[int(idx)] if idx is not None else None
        backend, extra = convert_gguf_tokenizer(self.architecture, tok_dict)
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config, **extra)
        if tok_config.get("chat_template"):
            tok.chat_template = tok_config["chat_template"]
        return tok
