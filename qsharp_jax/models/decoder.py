"""One decoder for Llama 3.x, Qwen2/2.5 and Qwen3 (Flax NNX), with a KV cache.

The same module serves the training forward (no cache), prefill and cached decode, and
the V-type candidate scoring of guided decoding ("probe" tokens, below). Use it
functionally: ``graphdef, state = nnx.split(model)`` outside jit, ``nnx.merge`` inside.

Tokens of one call are split into two groups by the static ``n_write``:

* the first ``n_write`` tokens are context: causal among themselves, written to the
  cache (if any) at ``cache.index``;
* the remaining tokens are probes: each sees the cache / context and itself only, all
  may share one position id, and their K/V are never stored. Scoring k candidate next
  tokens in one pass is ``n_write = 1`` (the newest context token) plus k probes.

RoPE uses HF's rotate-half layout, so HF q/k weights load without permutation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qsharp_jax.core.sharding import DEFAULT_RULES, constrain
from qsharp_jax.models.config import ModelConfig

_MASKED = -1e30  # finite, so a fully masked (padding) query row gives a uniform softmax, not NaN


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer K/V of shape [batch, kv_heads, cache_length, head_dim], plus which slots
    hold real tokens (left padding leaves holes) and the next slot to write.

    ``block`` (static): 0 = attention reads every cache column (masked); > 0 = while at
    most 3/4 of the blocks of this many columns hold a token of some row, it reads only
    those blocks, so a step's attention costs what the filled part of the cache costs, not
    its capacity (see :func:`_attend_cache_blocks`); fuller caches are read in one pass."""

    k: list
    v: list
    mask: jax.Array  # [batch, cache_length] bool
    index: jax.Array  # int32 scalar
    block: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def length(self) -> int:
        return self.mask.shape[1]


CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, block: int = 0) -> KVCache:
    if block < 0:
        raise ValueError(f"cache block={block}: use 0 (attend over every column) or a positive block size.")
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(
        k=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        v=[jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
        mask=jnp.zeros((batch, length), bool),
        index=jnp.zeros((), jnp.int32),
        block=block,
    )


def cache_logical_axes(cache: KVCache) -> KVCache:
    """The cache's logical axis names, as a pytree shaped like the cache."""
    return KVCache(
        k=[CACHE_AXES] * len(cache.k),
        v=[CACHE_AXES] * len(cache.v),
        mask=("batch", "cache_length"),
        index=(),
        block=cache.block,
    )


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position ids that skip left padding: 0 at each row's first real token."""
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1 + offset
    return jnp.maximum(pos, 0)


def _param(rngs: nnx.Rngs, shape, axes, param_dtype, init="normal"):
    # `init` is kept as metadata: `build` fills concrete values on the host from it.
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(param_dtype), out_sharding=axes, eager_sharding=False, init=init)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype, rngs: nnx.Rngs):
        self.scale = _param(rngs, (dim,), (axis_name,), param_dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.scale.get_value().astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, heads, D]; positions: [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rules, rngs: nnx.Rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = _param(rngs, (e, h, d), ("embed", "q_heads", "head_dim"), param_dtype)
        self.wk = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wv = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.wo = _param(rngs, (h, d, e), ("q_heads", "head_dim", "embed"), param_dtype)
        if cfg.qkv_bias:
            self.bq = _param(rngs, (h, d), ("q_heads", "head_dim"), param_dtype, init="zeros")
            self.bk = _param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
            self.bv = _param(rngs, (kv, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, "head_dim", param_dtype, rngs)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, "head_dim", param_dtype, rngs)
        self.cfg, self.dtype, self.rules = cfg, dtype, rules

    def _proj(self, x, w, b):
        y = jnp.einsum("bte,ehd->bthd", x, w.get_value().astype(self.dtype))
        return y if b is None else y + b.get_value().astype(self.dtype)

    def __call__(self, x, positions, inv_freq, ctx_mask, probe_visible, layer_cache, index, n_write):
        cfg, dt = self.cfg, self.dtype
        bias = cfg.qkv_bias
        q = self._proj(x, self.wq, self.bq if bias else None)
        k = self._proj(x, self.wk, self.bk if bias else None)
        v = self._proj(x, self.wv, self.bv if bias else None)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        q = constrain(q, ("batch", "length", "q_heads", "head_dim"), self.rules)

        b, t = x.shape[:2]
        g = cfg.q_per_kv
        # [B, KV, G, T, D]: query heads grouped under their kv head (GQA without repeating K/V).
        qg = q.reshape(b, t, cfg.num_kv_heads, g, cfg.head_dim).transpose(0, 2, 3, 1, 4)
        k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
        block = 0
        if layer_cache is None:
            keys, values, new_layer = k_t[:, :, :n_write], v_t[:, :, :n_write], None
        else:
            ck, cv, block = layer_cache
            start = (0, 0, index, 0)
            ck = jax.lax.dynamic_update_slice(ck, k_t[:, :, :n_write].astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, v_t[:, :, :n_write].astype(cv.dtype), start)
            keys, values, new_layer = ck.astype(dt), cv.astype(dt), (ck, cv)

        scale = cfg.head_dim**-0.5
        # One extra "self" column: a probe token's own key (unused by context tokens).
        s_self = jnp.einsum("bkgtd,bktd->bkgt", qg, k_t, preferred_element_type=jnp.float32) * scale
        s_self = jnp.where(probe_visible[None, None, None, :], s_self, _MASKED)
        v_self = v_t[:, :, None].astype(dt)  # [B, KV, 1, T, D]
        args = (qg, keys, values, ctx_mask, s_self, v_self, scale)
        if 0 < block < keys.shape[2]:
            live = _live_blocks(ctx_mask, block)
            # reading blocks costs ~1.35x per column what one dense pass does (measured on
            # CPU): read blocks only while at most 3/4 of them hold tokens
            few = jnp.sum(live) * 4 <= 3 * live.shape[0]
            out = jax.lax.cond(
                few,
                lambda *a: _attend_cache_blocks(*a, live=live, block=block),
                lambda *a: _attend_cache(*a).astype(jnp.float32),
                *args,
            )
        else:
            out = _attend_cache(*args)
        out = out.astype(dt).transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads, cfg.head_dim)
        y = jnp.einsum("bthd,hde->bte", out, self.wo.get_value().astype(dt))
        return y, new_layer


def _attend_cache(qg, keys, values, ctx_mask, s_self, v_self, scale: float):
    """Softmax attention over every cache column (masked) plus each query's "self" column.

    qg: [B, KV, G, T, D]; keys/values: [B, KV, S, D]; ctx_mask: [B, T, S]; s_self: [B, KV, G, T]
    scaled and masked self scores; v_self: [B, KV, 1, T, D]. Returns [B, KV, G, T, D]."""
    dt = values.dtype
    s_ctx = jnp.einsum("bkgtd,bksd->bkgts", qg, keys, preferred_element_type=jnp.float32) * scale
    s_ctx = jnp.where(ctx_mask[:, None, None], s_ctx, _MASKED)
    probs = jax.nn.softmax(jnp.concatenate([s_ctx, s_self[..., None]], axis=-1), axis=-1)
    p_ctx, p_self = probs[..., :-1].astype(dt), probs[..., -1].astype(dt)
    return jnp.einsum("bkgts,bksd->bkgtd", p_ctx, values) + p_self[..., None] * v_self


def _live_blocks(ctx_mask: jax.Array, block: int) -> jax.Array:
    """[ceil(S / block)] bool: which ``block``-column blocks of the cache some query sees."""
    length = ctx_mask.shape[-1]
    n_blocks = -(-length // block)
    visible = jnp.pad(jnp.any(ctx_mask, axis=(0, 1)), (0, n_blocks * block - length))
    return jnp.any(visible.reshape(n_blocks, block), axis=1)


def _attend_cache_blocks(qg, keys, values, ctx_mask, s_self, v_self, scale: float, *, live, block: int):
    """:func:`_attend_cache`, reading the cache ``block`` columns at a time and only the
    ``live`` blocks (a ``while_loop`` of data-dependent length, online softmax as in flash
    attention). Equal to the dense path up to float32 summation order: a block that is
    masked for one row adds exactly zero to it. Returns float32."""
    length = keys.shape[2]
    order = jnp.argsort(~live, stable=True)  # live blocks first, in column order
    columns = jnp.arange(block)

    def body(i, carry):
        top, total, acc = carry
        first = order[i] * block
        # the last block may be cut short: read the final ``block`` columns instead and
        # mask the ones before ``first`` (an earlier block already counted them)
        start = jnp.minimum(first, length - block)
        k_blk = jax.lax.dynamic_slice_in_dim(keys, start, block, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(values, start, block, axis=2)
        seen = jax.lax.dynamic_slice_in_dim(ctx_mask, start, block, axis=2) & (start + columns >= first)
        s = jnp.einsum("bkgtd,bksd->bkgts", qg, k_blk, preferred_element_type=jnp.float32) * scale
        s = jnp.where(seen[:, None, None], s, _MASKED)
        new_top = jnp.maximum(top, jnp.max(s, axis=-1))
        keep = jnp.exp(top - new_top)
        p = jnp.exp(s - new_top[..., None])
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
        return new_top, total * keep + jnp.sum(p, axis=-1), acc * keep[..., None] + pv

    init = (
        jnp.full(s_self.shape, -jnp.inf, jnp.float32),
        jnp.zeros(s_self.shape, jnp.float32),
        jnp.zeros(qg.shape, jnp.float32),
    )
    top, total, acc = jax.lax.fori_loop(0, jnp.sum(live, dtype=jnp.int32), body, init)
    new_top = jnp.maximum(top, s_self)
    keep, p_self = jnp.exp(top - new_top), jnp.exp(s_self - new_top)
    acc = acc * keep[..., None] + p_self[..., None] * v_self.astype(jnp.float32)
    return acc / (total * keep + p_self)[..., None]


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rngs: nnx.Rngs):
        e, m = cfg.hidden_size, cfg.intermediate_size
        self.gate = _param(rngs, (e, m), ("embed", "mlp"), param_dtype)
        self.up = _param(rngs, (e, m), ("embed", "mlp"), param_dtype)
        self.down = _param(rngs, (m, e), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x):
        dt = self.dtype
        h = jax.nn.silu(x @ self.gate.get_value().astype(dt)) * (x @ self.up.get_value().astype(dt))
        return h @ self.down.get_value().astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, param_dtype, rules, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", param_dtype, rngs)
        self.attn = Attention(cfg, dtype, param_dtype, rules, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", param_dtype, rngs)
        self.mlp = MLP(cfg, dtype, param_dtype, rngs)
        self.rules = rules

    def __call__(self, x, positions, inv_freq, ctx_mask, probe_visible, layer_cache, index, n_write):
        a, new_layer = self.attn(
            self.attn_norm(x), positions, inv_freq, ctx_mask, probe_visible, layer_cache, index, n_write
        )
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "length", "act_embed"), self.rules), new_layer


@nnx.remat(static_argnums=(7,))
def _remat_block(block, x, positions, inv_freq, ctx_mask, probe_visible, index, n_write):
    return block(x, positions, inv_freq, ctx_mask, probe_visible, None, index, n_write)[0]


class Decoder(nnx.Module):
    """Token embedding, ``num_layers`` pre-norm blocks, final RMSNorm, LM head (or tied)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rules: Iterable | None = DEFAULT_RULES,
        remat: bool = False,
        rngs: nnx.Rngs,
    ):
        rules = tuple(rules) if rules is not None else None
        # remat: recompute each block's activations in the backward pass of a cache-free
        # forward (training), trading ~1/3 more FLOPs for O(layers) less activation memory.
        self.remat = remat
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([Block(cfg, dtype, param_dtype, rules, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", param_dtype, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)
        self.cfg, self.dtype, self.rules = cfg, dtype, rules

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        *,
        token_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        n_write: int | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """Final hidden states [B, T, E] and the updated cache (None without a cache).

        tokens, positions: [B, T] ints. token_mask: [B, T] bool, False on padding (only the
        first ``n_write`` entries matter). n_write: static count of context tokens; the rest
        are probes (see module docstring). segment_ids: [B, T] ints, without a cache only:
        several sequences packed in one row (positions restart per sequence); a token
        attends only to earlier tokens with its own segment id.
        """
        cfg = self.cfg
        b, t = tokens.shape
        n_write = t if n_write is None else n_write
        if token_mask is None:
            token_mask = jnp.ones((b, t), bool)
        written = token_mask[:, :n_write]
        q_idx = jnp.arange(t)
        # Each query sees context slots up to its own (context) or the last written one (probe).
        last_visible = jnp.minimum(q_idx, n_write - 1)
        if cache is None:
            index, slot_valid = jnp.zeros((), jnp.int32), written
            slots = jnp.arange(n_write)
        else:
            index = cache.index
            slot_valid = jax.lax.dynamic_update_slice(cache.mask, written, (0, index))
            slots = jnp.arange(cache.length)
        # A query must not see the context tokens written after it in this call; any other
        # valid slot is earlier context (slots past index + n_write are only valid when the
        # cache is used as a circular buffer, and then they hold older tokens).
        later = (slots[None, :] > index + last_visible[:, None]) & (slots[None, :] < index + n_write)
        ctx_mask = slot_valid[:, None, :] & ~later[None]
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed sequences) are for cache-free forwards only.")
            ctx_mask = ctx_mask & (segment_ids[:, :, None] == segment_ids[:, None, :n_write])
        probe_visible = q_idx >= n_write
        inv_freq = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)

        x = jnp.take(self.embed.get_value(), tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"), self.rules)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            if cache is None and self.remat:
                x = _remat_block(block, x, positions, inv_freq, ctx_mask, probe_visible, index, n_write)
                continue
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache.block)
            x, new_layer = block(x, positions, inv_freq, ctx_mask, probe_visible, layer_cache, index, n_write)
            if new_layer is not None:
                new_k.append(new_layer[0])
                new_v.append(new_layer[1])
        h = self.final_norm(x)
        if cache is None:
            return h, None
        return h, KVCache(k=new_k, v=new_v, mask=slot_valid, index=index + n_write, block=cache.block)

    def lm_head_kernel(self) -> jax.Array:
        """[E, V] output projection (the transposed embedding when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed.get_value().T
        return self.lm_head.get_value()

    def logits(self, h: jax.Array) -> jax.Array:
        """float32 logits [..., V] from final hidden states."""
        w = self.lm_head_kernel().astype(self.dtype)
        out = jnp.einsum("...e,ev->...v", h, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "vocab")[-out.ndim :], self.rules) if out.ndim == 3 else out


def build(
    cfg: ModelConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rules=DEFAULT_RULES,
    seed: int = 0,
    remat: bool = False,
) -> Decoder:
    """A randomly initialised decoder (N(0, 0.02) weights, unit norms, zero biases).

    Values are drawn on the host with numpy from the abstract model: initialising eagerly
    in JAX compiles one small program per parameter shape, which costs seconds per model
    on a CPU and dominated the test suite.
    """
    graphdef, state = nnx.split(abstract(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules, remat=remat))
    rng = np.random.default_rng(seed)

    def fill(var: nnx.Variable) -> nnx.Variable:
        shape, dt = var.get_value().shape, var.get_value().dtype
        kind = var.get_metadata().get("init", "normal")
        if kind == "normal":
            value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        else:
            value = np.full(shape, 1.0 if kind == "ones" else 0.0, np.float32)
        return var.replace(jnp.asarray(value, dtype=dt))

    state = jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def abstract(
    cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rules=DEFAULT_RULES, remat: bool = False
) -> Decoder:
    """The decoder with ShapeDtypeStruct leaves: no memory allocated (for loading big models)."""
    return nnx.eval_shape(
        lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules, remat=remat, rngs=nnx.Rngs(0))
    )


def forward_logits(model: Decoder, tokens, mask):
    """Convenience: full causal forward of a left-padded batch -> float32 logits [B, T, V]."""
    h, _ = model(tokens, positions_from_mask(mask), token_mask=mask)
    return model.logits(h)


def truncate_layers(model, num_layers: int):
    """Keep the first ``num_layers`` blocks of a decoder (in place): a smaller model of the
    same architecture and vocabulary."""
    if not 0 < num_layers <= model.cfg.num_layers:
        n = model.cfg.num_layers
        raise ValueError(f"cannot keep {num_layers} layers of a model with {n}: choose 1..{n}.")
    model.layers = nnx.List(list(model.layers)[:num_layers])
    model.cfg = model.cfg.replace(num_layers=num_layers)
    return model
