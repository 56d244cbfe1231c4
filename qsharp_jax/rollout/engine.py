"""The rollout engine: jitted prefill plus one ``lax.while_loop`` decode, optionally
guided by a :class:`~qsharp_jax.guidance.model.GuidanceModel` inside the loop (spec 1.3-1.6).

Shapes are static per (prompt-length bucket, batch, max_new_tokens); all sampling knobs
(temperature, top-p, top-k, greedy, 1/eta) are traced, so sweeping them never recompiles.

Layout of one call. Prompts are left-padded to a bucketed length L. Prefill writes the
first L-1 columns into each model's cache; the last prompt token (always real thanks to
left padding) is fed by the first loop step, so every step does the same thing:

1. the reference reads the newest context token -> logits for the next token;
2. guided: top-k candidates by raw reference logits; the guide scores them
   (V-type: one forward of [newest token | k candidates] with ``n_write=1``, so the
   candidates are probes that never enter the guide's cache; Q-type: one guide token,
   head read at the k candidate columns); the offset is scatter-added to those k logits;
   ("cd_logp", the star-graph CD: the offset is ln p and every non-candidate is masked);
3. / temperature -> top-k -> exact top-p -> sample; record log-probs and KL.

The guide is duck-typed (``backbone``, ``hidden``, ``head_outputs``, ``q_head_at``,
``log_mgf``, ``mean``, ``head_cfg``), so this layer does not import the guidance package.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qsharp_jax.core import sampling
from qsharp_jax.core.sharding import constrain
from qsharp_jax.models.decoder import KVCache, cache_logical_axes, init_cache, positions_from_mask
from qsharp_jax.rollout.state import DecodeState, LoopSpec


def constrain_cache(cache: KVCache, rules) -> KVCache:
    axes = cache_logical_axes(cache)
    return jax.tree.map(
        lambda x, a: constrain(x, a, rules),
        cache,
        axes,
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(s, str) for s in a),
    )


def _prefill_one(model, tokens, mask, cache_len: int, n: int, attention_block: int = 0):
    """Cache [B*n rows] holding tokens[:, :-1] (each prompt's rows repeated n times), read
    by decode in blocks of ``attention_block`` columns (0: all columns; see ``KVCache``)."""
    b, length = tokens.shape
    # prefill into a cache that just fits the prompt (attention does not scan the empty
    # decode slots), then grow it to cache_len and repeat rows in one pass
    cache = init_cache(model.cfg, b, max(length - 1, 1), model.dtype)
    if length > 1:
        ctx, ctx_mask = tokens[:, :-1], mask[:, :-1]
        _, cache = model(ctx, positions_from_mask(ctx_mask), token_mask=ctx_mask, cache=cache)
    extra = cache_len - cache.length

    def grow(x, length_axis):
        x = jnp.repeat(x, n, axis=0) if n > 1 else x  # n samples per prompt share one prefill
        pad = [(0, 0)] * x.ndim
        pad[length_axis] = (0, extra)
        return jnp.pad(x, pad)

    cache = KVCache(
        k=[grow(x, 2) for x in cache.k],
        v=[grow(x, 2) for x in cache.v],
        mask=grow(cache.mask, 1),
        index=jnp.asarray(length - 1, jnp.int32),
        block=attention_block,
    )
    return constrain_cache(cache, model.rules)


def prefill(
    ref_graph, guide_graph, n: int, max_new_tokens: int, ref_state, guide_state, tokens, mask, attention_block: int = 0
):
    """Reference (and guide, when given) caches of length L-1+max_new_tokens."""
    cache_len = tokens.shape[1] - 1 + max_new_tokens
    ref_cache = _prefill_one(nnx.merge(ref_graph, ref_state), tokens, mask, cache_len, n, attention_block)
    guide_cache = None
    if guide_graph is not None:
        guide = nnx.merge(guide_graph, guide_state)
        guide_cache = _prefill_one(guide.backbone, tokens, mask, cache_len, n, attention_block)
    return ref_cache, guide_cache


prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2, 3), static_argnames=("attention_block",))


def guidance_offsets(guide, out: jax.Array, guidance: str, inv_eta) -> jax.Array:
    """[N, k] logit offsets from guide head outputs at the k candidates ([N, k] or [N, k, A]).
    Q#: ln E[exp(Z/eta)] (categorical min-shifted over the k, Bernoulli not shifted);
    CD: E[Z]/eta; star-graph CD ("cd_logp"): ln E[Z] (eta cancels in the softmax)."""
    if guidance == "cd":
        return guide.mean(out) * inv_eta
    if guidance == "cd_logp":
        if guide.head_cfg.distribution == "bernoulli":
            return jax.nn.log_sigmoid(out.astype(jnp.float32))
        return jnp.log(jnp.maximum(guide.mean(out), jnp.finfo(jnp.float32).tiny))
    offset = guide.log_mgf(out, inv_eta)
    if guide.head_cfg.distribution == "categorical":
        offset = offset - jnp.min(offset, axis=-1, keepdims=True)
    return offset


def candidate_scores(guide, guide_cache, newest, position, candidates):
    """Guide head outputs for the k candidates after context ending in ``newest``.

    V-type: [newest | k candidates] in one forward; the candidates share position+1, see
    the cache, the newest token and themselves, and only ``newest`` enters the cache.
    Q-type: one forward of ``newest``; the per-vocab head is read at the candidates only.
    """
    if guide.head_cfg.kind == "v":
        k = candidates.shape[1]
        tokens = jnp.concatenate([newest[:, None], candidates], axis=1)
        positions = jnp.concatenate([position[:, None], jnp.repeat(position[:, None] + 1, k, axis=1)], axis=1)
        h, guide_cache = guide.hidden(tokens, positions, cache=guide_cache, n_write=1)
        return guide.head_outputs(h[:, 1:]), guide_cache
    h, guide_cache = guide.hidden(newest[:, None], position[:, None], cache=guide_cache)
    return guide.q_head_at(h[:, 0], candidates), guide_cache


def decode_step(
    ref, guide, spec: LoopSpec, knobs, stop_ids, pad_id, ref_cache, guide_cache, newest, position, keys, col, active
):
    """One decode step of every row (shared by the static loop and continuous batching).

    keys: [N, 2] raw per-row keys; row r samples with fold_in(keys[r], col[r]), so its
    tokens depend only on its own key and step, not on its batch or slot. Rows that are not
    ``active`` get pad_id and zero log-probs / KL. The caches' write index wraps around
    their length (continuous batching uses them as circular buffers).
    Returns (token, stopped, logp_policy, logp_ref, kl, ref_cache, guide_cache)."""
    rows = jnp.arange(newest.shape[0])[:, None]
    h, ref_cache = ref(newest[:, None], position[:, None], cache=ref_cache)
    ref_logits = ref.logits(h[:, 0])  # [N, V] float32
    logits = ref_logits
    if spec.guided:
        candidates = jax.lax.top_k(ref_logits, spec.k)[1]
        out, guide_cache = candidate_scores(guide, guide_cache, newest, position, candidates)
        offset = guidance_offsets(guide, out, spec.guidance, knobs["inv_eta"])
        if spec.guidance == "cd_logp":  # star-graph CD: only the k candidates stay sampleable
            picked_logits = jnp.take_along_axis(ref_logits, candidates, axis=-1) + offset
            logits = jnp.full_like(ref_logits, -jnp.inf).at[rows, candidates].set(picked_logits)
        else:
            logits = ref_logits.at[rows, candidates].add(offset)  # other logits untouched
        guide_cache = _wrap(constrain_cache(guide_cache, guide.backbone.rules))
    log_ref = sampling.reference_log_probs(ref_logits, knobs["temperature"])
    # unguided, the policy starts from the same tempered softmax as the reference
    tempered = sampling.reference_log_probs(logits, knobs["temperature"]) if spec.guided else log_ref
    log_pi = sampling.policy_log_probs(
        logits, tempered, knobs["temperature"], knobs["top_p"], knobs["top_k"], knobs["greedy"]
    )
    step_keys = jax.vmap(jax.random.fold_in)(keys, col)
    token = jax.vmap(lambda k, lp: sampling.sample(k, lp[None])[0])(step_keys, log_pi)
    token = jnp.where(active, token, pad_id)
    picked = lambda logp: jnp.where(active, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], 0.0)
    kl = jnp.where(active, sampling.kl_divergence(log_pi, log_ref), 0.0)
    stopped = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    ref_cache = _wrap(constrain_cache(ref_cache, ref.rules))
    return token, stopped, picked(log_pi), picked(log_ref), kl, ref_cache, guide_cache


def _wrap(cache: KVCache) -> KVCache:
    return dataclasses.replace(cache, index=cache.index % cache.length)


def decode(
    ref_graph,
    guide_graph,
    spec: LoopSpec,
    ref_state,
    guide_state,
    ref_cache,
    guide_cache,
    newest,
    position,
    keys,
    knobs,
    stop_ids,
    pad_id,
):
    """The whole decode as one while_loop. newest/position: [N] last prompt token and its
    position id; keys: [N, 2] raw per-row PRNG keys. knobs: dict of traced scalars
    (temperature, top_p, top_k, greedy, inv_eta). stop_ids: [S] int32 (-1 entries never
    match); pad_id: int32 scalar (both traced). Returns the final :class:`DecodeState`
    (its caches alias the donated inputs)."""
    ref = nnx.merge(ref_graph, ref_state)
    guide = nnx.merge(guide_graph, guide_state) if spec.guided else None
    n, steps = newest.shape[0], spec.max_new_tokens

    def step(s: DecodeState) -> DecodeState:
        active = ~s.done
        token, stopped, lp_pi, lp_ref, kl, ref_cache, guide_cache = decode_step(
            ref, guide, spec, knobs, stop_ids, pad_id, s.ref_cache, s.guide_cache, s.newest, s.position,
            s.keys, jnp.broadcast_to(s.step, (n,)), active,
        )  # fmt: skip
        write = lambda buf, val: buf.at[:, s.step].set(val)
        return DecodeState(
            step=s.step + 1,
            ref_cache=ref_cache,
            guide_cache=guide_cache,
            newest=token,
            position=s.position + 1,
            done=s.done | stopped,
            lengths=s.lengths + active.astype(jnp.int32),
            keys=s.keys,
            tokens=write(s.tokens, token),
            logp_policy=write(s.logp_policy, lp_pi),
            logp_ref=write(s.logp_ref, lp_ref),
            kl_token=write(s.kl_token, kl),
        )

    def not_finished(s: DecodeState):
        return (s.step < steps) & ~jnp.all(s.done)

    zeros = lambda: jnp.zeros((n, steps), jnp.float32)
    init = DecodeState(
        step=jnp.zeros((), jnp.int32),
        ref_cache=ref_cache,
        guide_cache=guide_cache,
        newest=newest,
        position=position,
        done=jnp.zeros((n,), bool),
        lengths=jnp.zeros((n,), jnp.int32),
        keys=keys,
        tokens=jnp.full((n, steps), pad_id, jnp.int32),
        logp_policy=zeros(),
        logp_ref=zeros(),
        kl_token=zeros(),
    )
    # returning the caches in the state lets the donated input buffers alias them
    return jax.lax.while_loop(not_finished, step, init)


decode_jit = jax.jit(decode, static_argnums=(0, 1, 2), donate_argnums=(5, 6))
