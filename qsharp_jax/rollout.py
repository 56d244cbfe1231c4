"""The rollout engine: jitted prefill plus one ``lax.while_loop`` decode, optionally
guided by a :class:`~qsharp_jax.guidance_model.GuidanceModel` inside the loop (spec 1.3-1.6).

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
3. / temperature -> top-k -> exact top-p -> sample; record log-probs and KL.

The reference and the guide are separate decoders with their own sharding rules; both
run under one mesh when one is given.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from qsharp_jax import sampling
from qsharp_jax.model import KVCache, cache_logical_axes, init_cache, positions_from_mask
from qsharp_jax.sharding import check_model_fits, constrain, logical_to_spec, state_shardings

GUIDANCE_KINDS = ("qsharp", "cd")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    max_new_tokens: int = 256
    k: int = 20  # guidance candidates per step (top-k of the raw reference logits)
    guidance: str = "qsharp"  # "qsharp": ln E[exp(Z/eta)]; "cd": E[Z]/eta
    stop_ids: tuple = ()  # a row stops after emitting any of these (the stop token is kept)
    pad_id: int = 0  # written after a row stops (and used for left padding)
    prompt_bucket: int = 64  # padded prompt length = a multiple of this (bounds recompiles)
    batch_bucket: int = 1  # padded prompt count = a multiple of this

    def __post_init__(self):
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance={self.guidance!r} is not one of {GUIDANCE_KINDS}.")
        if self.max_new_tokens < 1 or self.k < 1 or self.prompt_bucket < 1 or self.batch_bucket < 1:
            raise ValueError(f"max_new_tokens, k, prompt_bucket and batch_bucket must be >= 1: {self}")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))


@dataclasses.dataclass
class RolloutBatch:
    """Host (numpy) results; row r continues prompt ``prompt_index[r]``. Per-token arrays are
    [N, max_new_tokens] and hold pad_id / 0 after each row's ``lengths`` (stop token included)."""
    tokens: np.ndarray
    lengths: np.ndarray
    logp_policy: np.ndarray  # log pi(token) under the distribution actually sampled
    logp_ref: np.ndarray  # log pi_ref(token) at the same temperature, untruncated
    kl_token: np.ndarray  # KL(pi || pi_ref) of each step's full next-token distributions
    kl_traj: np.ndarray  # [N] sum of kl_token over the response
    prompt_index: np.ndarray
    steps: int = 0  # decode iterations run (early exit when every row stopped)

    def completions(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


# --------------------------------------------------------------------------------------
# pure jitted functions: (static graphdefs/config, params, caches, inputs, knobs)
# --------------------------------------------------------------------------------------

def _constrain_cache(cache: KVCache, rules) -> KVCache:
    axes = cache_logical_axes(cache)
    return jax.tree.map(lambda x, a: constrain(x, a, rules), cache, axes,
                        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(s, str) for s in a))


def _prefill_one(model, tokens, mask, cache_len: int, n: int):
    """Cache [B*n rows] holding tokens[:, :-1] (each prompt's rows repeated n times)."""
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

    cache = KVCache(k=[grow(x, 2) for x in cache.k], v=[grow(x, 2) for x in cache.v],
                    mask=grow(cache.mask, 1), index=jnp.asarray(length - 1, jnp.int32))
    return _constrain_cache(cache, model.rules)


@dataclasses.dataclass(frozen=True)
class _LoopSpec:
    """Everything static about one decode loop (hashable: a jit static argument)."""
    max_new_tokens: int
    k: int
    guidance: str
    guided: bool


def prefill(ref_graph, guide_graph, n: int, max_new_tokens: int, ref_state, guide_state, tokens, mask):
    """Reference (and guide, when given) caches of length L-1+max_new_tokens."""
    cache_len = tokens.shape[1] - 1 + max_new_tokens
    ref_cache = _prefill_one(nnx.merge(ref_graph, ref_state), tokens, mask, cache_len, n)
    guide_cache = None
    if guide_graph is not None:
        guide = nnx.merge(guide_graph, guide_state)
        guide_cache = _prefill_one(guide.backbone, tokens, mask, cache_len, n)
    return ref_cache, guide_cache


prefill_jit = jax.jit(prefill, static_argnums=(0, 1, 2, 3))


def guidance_offsets(guide, out: jax.Array, guidance: str, inv_eta) -> jax.Array:
    """[N, k] logit offsets from guide head outputs at the k candidates ([N, k] or [N, k, A]).
    Q#: ln E[exp(Z/eta)] (categorical min-shifted over the k, Bernoulli not shifted);
    CD: E[Z]/eta."""
    if guidance == "cd":
        return guide.mean(out) * inv_eta
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


def decode(ref_graph, guide_graph, spec: _LoopSpec, ref_state, guide_state, ref_cache, guide_cache,
           newest, position, key, knobs, stop_ids, pad_id):
    """The whole decode as one while_loop. newest/position: [N] last prompt token and its
    position id. knobs: dict of traced scalars (temperature, top_p, top_k, greedy, inv_eta).
    stop_ids: [S] int32 (-1 entries never match); pad_id: int32 scalar (both traced).
    Returns (steps run, lengths [N], (tokens, logp_policy, logp_ref, kl_token) [N, max_new],
    final caches)."""
    ref = nnx.merge(ref_graph, ref_state)
    guide = nnx.merge(guide_graph, guide_state) if spec.guided else None
    n, steps = newest.shape[0], spec.max_new_tokens
    rows = jnp.arange(n)[:, None]

    def step(carry):
        i, ref_cache, guide_cache, newest, position, done, lengths, outs = carry
        h, ref_cache = ref(newest[:, None], position[:, None], cache=ref_cache)
        ref_logits = ref.logits(h[:, 0])  # [N, V] float32
        logits = ref_logits
        if spec.guided:
            candidates = jax.lax.top_k(ref_logits, spec.k)[1]
            out, guide_cache = candidate_scores(guide, guide_cache, newest, position, candidates)
            offset = guidance_offsets(guide, out, spec.guidance, knobs["inv_eta"])
            logits = ref_logits.at[rows, candidates].add(offset)  # other logits untouched
            guide_cache = _constrain_cache(guide_cache, guide.backbone.rules)
        log_ref = sampling.reference_log_probs(ref_logits, knobs["temperature"])
        # unguided, the policy starts from the same tempered softmax as the reference
        tempered = sampling.reference_log_probs(logits, knobs["temperature"]) if spec.guided else log_ref
        log_pi = sampling.policy_log_probs(logits, tempered, knobs["temperature"], knobs["top_p"],
                                           knobs["top_k"], knobs["greedy"])
        token = sampling.sample(jax.random.fold_in(key, i), log_pi)
        active = ~done
        per_token = (
            jnp.where(active, token, pad_id),
            jnp.where(active, jnp.take_along_axis(log_pi, token[:, None], axis=-1)[:, 0], 0.0),
            jnp.where(active, jnp.take_along_axis(log_ref, token[:, None], axis=-1)[:, 0], 0.0),
            jnp.where(active, sampling.kl_divergence(log_pi, log_ref), 0.0),
        )
        outs = tuple(buf.at[:, i].set(val) for buf, val in zip(outs, per_token))
        done = done | (active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1))
        return (i + 1, _constrain_cache(ref_cache, ref.rules), guide_cache, per_token[0], position + 1,
                done, lengths + active.astype(jnp.int32), outs)

    def not_finished(carry):
        i, done = carry[0], carry[5]
        return (i < steps) & ~jnp.all(done)

    outs = (jnp.full((n, steps), pad_id, jnp.int32),) + tuple(jnp.zeros((n, steps), jnp.float32)
                                                                 for _ in range(3))
    init = (jnp.zeros((), jnp.int32), ref_cache, guide_cache, newest, position,
            jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32), outs)
    i, ref_cache, guide_cache, _, _, _, lengths, outs = jax.lax.while_loop(not_finished, step, init)
    # returning the caches lets the donated input buffers alias them (no copy at loop entry)
    return i, lengths, outs, ref_cache, guide_cache


decode_jit = jax.jit(decode, static_argnums=(0, 1, 2), donate_argnums=(5, 6))


# --------------------------------------------------------------------------------------
# host-side driver
# --------------------------------------------------------------------------------------

def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class Sampler:
    """Samples continuations of token-id prompts from a reference model, optionally guided.

    ``sampler.generate(prompts, key=..., n=..., temperature=..., top_p=..., top_k=...,
    greedy=..., inv_eta=..., guided=...)`` -> :class:`RolloutBatch`.
    """

    def __init__(self, ref_model, guide=None, config: SamplerConfig = SamplerConfig(), mesh=None):
        self.config = config
        self.mesh = mesh
        self.ref_cfg = ref_model.cfg
        self.ref_graph, ref_state = nnx.split(ref_model)
        self.ref_rules = ref_model.rules
        self.guide_graph = guide_state = None
        if guide is not None:
            if guide.cfg.vocab_size != ref_model.cfg.vocab_size:
                raise ValueError(f"guide vocab {guide.cfg.vocab_size} != reference vocab "
                                 f"{ref_model.cfg.vocab_size}: they must share one tokenizer.")
            if config.k > ref_model.cfg.vocab_size:
                raise ValueError(f"k={config.k} exceeds the vocabulary ({ref_model.cfg.vocab_size}).")
            self.guide_graph, guide_state = nnx.split(guide)
            self.guide_rules = guide.backbone.rules
        if mesh is not None:
            check_model_fits(ref_model.cfg, mesh, self.ref_rules, name="reference")
            ref_state = jax.device_put(ref_state, state_shardings(ref_state, mesh, self.ref_rules))
            if guide is not None:
                check_model_fits(guide.cfg, mesh, self.guide_rules, name="guide")
                guide_state = jax.device_put(guide_state, state_shardings(guide_state, mesh, self.guide_rules))
        self.ref_state, self.guide_state = ref_state, guide_state
        self.last_timings: dict = {}  # seconds of the last generate: prefill, decode, total

    # -- helpers -------------------------------------------------------------------------
    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        spec = logical_to_spec(("batch",), self.ref_rules)[0]
        names = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
        return int(np.prod([self.mesh.shape[a] for a in names]))

    def _put_batch(self, x: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(x)
        spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), self.ref_rules)
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def pad_prompts(self, prompts: Sequence[Sequence[int]]):
        """Left-padded [B_pad, L] tokens and mask; L and B_pad bucketed."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token.")
        cfg = self.config
        length = _round_up(max(len(p) for p in prompts), cfg.prompt_bucket)
        batch = _round_up(len(prompts), int(np.lcm(cfg.batch_bucket, self._batch_shards())))
        tokens = np.full((batch, length), cfg.pad_id, np.int32)
        mask = np.zeros((batch, length), bool)
        for r in range(batch):
            p = prompts[r] if r < len(prompts) else prompts[0]  # filler rows, dropped later
            tokens[r, length - len(p):] = p
            mask[r, length - len(p):] = True
        return tokens, mask

    # -- public --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, key: jax.Array, n: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                 inv_eta: float = 0.0, guided: bool = True) -> RolloutBatch:
        cfg = self.config
        guided = bool(guided) and self.guide_graph is not None
        tokens, mask = self.pad_prompts(prompts)
        n_rows = tokens.shape[0] * n
        if self.mesh is not None:
            check_model_fits(self.ref_cfg, self.mesh, self.ref_rules, batch=n_rows, name="reference")
        newest = np.repeat(tokens[:, -1], n)
        position = np.repeat(mask.sum(axis=1) - 1, n).astype(np.int32)
        knobs = dict(temperature=np.float32(temperature), top_p=np.float32(top_p),
                     top_k=np.int32(top_k), greedy=np.bool_(greedy), inv_eta=np.float32(inv_eta))
        spec = _LoopSpec(cfg.max_new_tokens, cfg.k, cfg.guidance, guided)
        # stop ids are traced, padded with -1 to a multiple of 4 entries (fewer recompiles)
        stop_ids = np.full(_round_up(max(len(cfg.stop_ids), 1), 4), -1, np.int32)
        stop_ids[:len(cfg.stop_ids)] = cfg.stop_ids
        guide_graph = self.guide_graph if guided else None
        guide_state = self.guide_state if guided else None
        start = time.perf_counter()
        with self._mesh_context():
            ref_cache, guide_cache = prefill_jit(self.ref_graph, guide_graph, n, cfg.max_new_tokens,
                                                 self.ref_state, guide_state,
                                                 self._put_batch(tokens), self._put_batch(mask))
            jax.block_until_ready(ref_cache.index)  # only to time prefill apart from decode
            prefilled = time.perf_counter()
            steps, lengths, outs, _, _ = decode_jit(self.ref_graph, guide_graph, spec, self.ref_state, guide_state,
                                              ref_cache, guide_cache, self._put_batch(newest),
                                              self._put_batch(position), key, knobs, stop_ids,
                                              np.int32(cfg.pad_id))
        steps, lengths, outs = jax.device_get((steps, lengths, outs))
        end = time.perf_counter()
        self.last_timings = dict(prefill=prefilled - start, decode=end - prefilled, total=end - start)
        keep = len(prompts) * n  # rows of filler prompts come last
        out_tokens, logp_policy, logp_ref, kl_token = (np.asarray(o[:keep]) for o in outs)
        return RolloutBatch(tokens=out_tokens, lengths=np.asarray(lengths[:keep]), logp_policy=logp_policy,
                            logp_ref=logp_ref, kl_token=kl_token, kl_traj=kl_token.sum(axis=1),
                            prompt_index=np.repeat(np.arange(len(prompts)), n), steps=int(steps))
