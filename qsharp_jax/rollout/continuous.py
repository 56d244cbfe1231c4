"""Continuous batching: a fixed number of decode slots; rows that stop are replaced by
pending (prompt, sample) rows between segments of decode steps, with static shapes.

Layout. Every slot's KV cache row is a circular buffer of length C = (longest prompt
bucket - 1) + max_new_tokens, written at one shared column ``index`` that advances by one
per decode step (mod C). A row inserted at column t has its prompt (all but its last
token) in columns t - (L-1) .. t-1 (mod C) and writes its decode steps at t, t+1, ...;
it spans at most C columns, so it never overwrites itself. Attention only looks at the
cache mask (reset for the whole slot on insertion) and explicit position ids, so where a
row sits in the buffer does not change what it computes.

Three jitted programs, each compiled once per shape class: ``init_slots`` (per slot
count and C), ``refill`` (per prefill shape: the sampler's fixed number of prompts per
prefill, and prompt-length bucket) and ``segment`` (per slot count and C; the number
of steps is traced). Each row samples with its own key (see ``engine.decode_step``), so
its result does not depend on which slot it got or when.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qsharp_jax.models.decoder import KVCache, init_cache, positions_from_mask
from qsharp_jax.rollout.engine import constrain_cache, decode_step
from qsharp_jax.rollout.state import LoopSpec, SlotState


def _backbone(model):
    return getattr(model, "backbone", model)


def init_slots(
    ref_graph,
    guide_graph,
    slots: int,
    cache_len: int,
    max_new_tokens: int,
    ref_state,
    guide_state,
    pad_id,
    attention_block: int = 0,
):
    """Empty slots (nothing live) with zeroed circular caches of length ``cache_len``, read
    in blocks of ``attention_block`` columns (0: all columns; see ``KVCache``)."""

    def empty(graph, state):
        model = _backbone(nnx.merge(graph, state))
        cache = init_cache(model.cfg, slots, cache_len, model.dtype, block=attention_block)
        return constrain_cache(cache, model.rules)

    zeros = jnp.zeros((slots, max_new_tokens), jnp.float32)
    return SlotState(
        ref_cache=empty(ref_graph, ref_state),
        guide_cache=None if guide_graph is None else empty(guide_graph, guide_state),
        newest=jnp.zeros((slots,), jnp.int32),
        position=jnp.zeros((slots,), jnp.int32),
        live=jnp.zeros((slots,), bool),
        age=jnp.zeros((slots,), jnp.int32),
        lengths=jnp.zeros((slots,), jnp.int32),
        keys=jnp.zeros((slots, 2), jnp.uint32),
        tokens=jnp.full((slots, max_new_tokens), pad_id, jnp.int32),
        logp_policy=zeros,
        logp_ref=zeros,
        kl_token=zeros,
    )


init_slots_jit = jax.jit(init_slots, static_argnums=(0, 1, 2, 3, 4), static_argnames=("attention_block",))


def _insert_prompts(model, cache: KVCache, tokens, mask, src, dst) -> KVCache:
    """Prefill ``tokens[:, :-1]`` ([U, L] left-padded) and write row src[i] into slot dst[i]
    of the circular ``cache``, in the L-1 columns just before ``cache.index``; the slot's
    mask is reset to that prompt's. dst entries >= the slot count are dropped."""
    u, length = tokens.shape
    width = max(length - 1, 1)
    pre = init_cache(model.cfg, u, width, model.dtype)
    if length > 1:
        ctx, ctx_mask = tokens[:, :-1], mask[:, :-1]
        _, pre = model(ctx, positions_from_mask(ctx_mask), token_mask=ctx_mask, cache=pre)
    cols = (cache.index - width + jnp.arange(width)) % cache.length  # [W]
    # advanced indices split by a slice: the indexed dims come first -> values [R, W, KV, D]
    put = lambda old, new: old.at[dst[:, None], :, cols[None, :]].set(
        new[src].transpose(0, 2, 1, 3).astype(old.dtype), mode="drop"
    )
    row_mask = jnp.zeros((src.shape[0], cache.length), bool).at[:, cols].set(pre.mask[src])
    new = KVCache(
        k=[put(o, n) for o, n in zip(cache.k, pre.k)],
        v=[put(o, n) for o, n in zip(cache.v, pre.v)],
        mask=cache.mask.at[dst].set(row_mask, mode="drop"),
        index=cache.index,
        block=cache.block,
    )
    return constrain_cache(new, model.rules)


def refill(ref_graph, guide_graph, ref_state, guide_state, state: SlotState, tokens, mask, src, dst, keys, pad_id):
    """Start rows in slots: slot dst[i] gets prompt row src[i] of ``tokens``/``mask`` ([U, L],
    left-padded) with raw key keys[i]. src/dst/keys have one entry per slot; unused entries
    have dst = slot count (dropped)."""
    ref = nnx.merge(ref_graph, ref_state)
    ref_cache = _insert_prompts(ref, state.ref_cache, tokens, mask, src, dst)
    guide_cache = state.guide_cache
    if guide_graph is not None:
        backbone = nnx.merge(guide_graph, guide_state).backbone
        guide_cache = _insert_prompts(backbone, guide_cache, tokens, mask, src, dst)
    set_ = lambda buf, val: buf.at[dst].set(val, mode="drop")
    t = state.tokens.shape[1]
    return SlotState(
        ref_cache=ref_cache,
        guide_cache=guide_cache,
        newest=set_(state.newest, tokens[src, -1]),
        position=set_(state.position, jnp.sum(mask[src], axis=1, dtype=jnp.int32) - 1),
        live=set_(state.live, True),
        age=set_(state.age, 0),
        lengths=set_(state.lengths, 0),
        keys=set_(state.keys, keys),
        tokens=set_(state.tokens, jnp.full((src.shape[0], t), pad_id, jnp.int32)),
        logp_policy=set_(state.logp_policy, 0.0),
        logp_ref=set_(state.logp_ref, 0.0),
        kl_token=set_(state.kl_token, 0.0),
    )


refill_jit = jax.jit(refill, static_argnums=(0, 1), donate_argnums=(4,))


def segment(
    ref_graph,
    guide_graph,
    spec: LoopSpec,
    ref_state,
    guide_state,
    state: SlotState,
    steps,
    refill_at,
    knobs,
    stop_ids,
    pad_id,
):
    """Decode up to ``steps`` steps (traced) in every slot; stop early when no slot is live
    or when at least ``refill_at`` slots are free (traced; pending rows can then be
    inserted). Returns (state, steps run)."""
    ref = nnx.merge(ref_graph, ref_state)
    guide = nnx.merge(guide_graph, guide_state) if spec.guided else None
    slots, width = state.age.shape[0], spec.max_new_tokens
    rows = jnp.arange(slots)

    def step(carry):
        i, s = carry
        token, stopped, lp_pi, lp_ref, kl, ref_cache, guide_cache = decode_step(
            ref, guide, spec, knobs, stop_ids, pad_id, s.ref_cache, s.guide_cache, s.newest, s.position,
            s.keys, s.age, s.live,
        )  # fmt: skip
        col = jnp.where(s.live, s.age, width)  # out of range: dropped
        write = lambda buf, val: buf.at[rows, col].set(val, mode="drop")
        age = s.age + s.live.astype(jnp.int32)
        live = s.live & ~stopped & (age < width)
        return i + 1, SlotState(
            ref_cache=_forget_stopped(ref_cache, live),
            guide_cache=_forget_stopped(guide_cache, live),
            newest=token,
            position=s.position + 1,
            live=live,
            age=age,
            lengths=age,
            keys=s.keys,
            tokens=write(s.tokens, token),
            logp_policy=write(s.logp_policy, lp_pi),
            logp_ref=write(s.logp_ref, lp_ref),
            kl_token=write(s.kl_token, kl),
        )

    def go_on(carry):
        i, s = carry
        free = slots - jnp.sum(s.live, dtype=jnp.int32)
        return (i < steps) & jnp.any(s.live) & (free < refill_at)

    steps_run, state = jax.lax.while_loop(go_on, step, (jnp.zeros((), jnp.int32), state))
    return state, steps_run


def _forget_stopped(cache, live):
    """Clear the cache mask of slots that stopped: their columns then no longer keep cache
    blocks in a blocked attention's read set (a refill sets the slot's mask anew)."""
    if cache is None:
        return None
    return dataclasses.replace(cache, mask=cache.mask & live[:, None])


segment_jit = jax.jit(segment, static_argnums=(0, 1, 2), donate_argnums=(5,))
