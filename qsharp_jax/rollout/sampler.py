"""The host-side sampler: pads and buckets prompts, places params and batches on the mesh,
and runs the engine's jitted prefill and decode; returns numpy results."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from qsharp_jax.core.host_memory import reuse_freed_memory
from qsharp_jax.core.sharding import check_model_fits, logical_to_spec, state_shardings
from qsharp_jax.rollout.continuous import init_slots_jit, refill_jit, segment_jit
from qsharp_jax.rollout.engine import decode_jit, prefill_jit
from qsharp_jax.rollout.state import LoopSpec, RolloutBatch, SamplerConfig


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _fetch(tree):
    """Host numpy copies of global arrays. On a multi-host slice the batch rows live on every
    host's devices, so each host gathers all of them (every host then holds the same results)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _pow2_at_least(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def raw_key(key) -> jax.Array:
    """uint32 key data of a typed (``jax.random.key``) or raw (``PRNGKey``) key."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


@jax.jit
def _derive_row_keys(key, prompt_index, sample_index):
    return jax.vmap(lambda p, j: jax.random.fold_in(jax.random.fold_in(key, p), j))(prompt_index, sample_index)


def row_keys(key, n_prompts: int, n: int) -> np.ndarray:
    """[n_prompts * n, 2] raw keys; row p * n + j (prompt p, sample j) gets
    fold_in(fold_in(key, p), j): a row's random stream depends on nothing else."""
    p = np.repeat(np.arange(n_prompts, dtype=np.int32), n)
    j = np.tile(np.arange(n, dtype=np.int32), n_prompts)
    return np.asarray(_derive_row_keys(raw_key(key), p, j))


def refill_threshold(slots: int, n: int, pending: int, total: int, fraction: float) -> int:
    """Free slots at which continuous batching starts a refill (rows are started in order,
    ``pending`` of ``total`` started): ``fraction`` of the slots (rounded up, at least one),
    but no more than the rows left; ``slots + 1`` (never) when nothing is pending. ``n`` is
    unused here: a refill may split a prompt's samples when fewer than n slots are free
    (its rest is prefilled again by the next refill, about one decode step's work), which
    measured cheaper than keeping slots idle until n are free."""
    del n
    if pending >= total:
        return slots + 1
    return min(max(math.ceil(fraction * slots), 1), total - pending)


def rows_to_start(free: int, n: int, pending: int, total: int) -> int:
    """How many pending rows a refill with ``free`` free slots starts: as many as fit, cut
    back to the end of a prompt (a prompt's samples start together) unless that leaves none
    or every pending row fits."""
    take = min(free, total - pending)
    whole = (pending + take) // n * n - pending
    return whole if pending + take < total and whole > 0 else take


class Sampler:
    """Samples continuations of token-id prompts from a reference model, optionally guided.

    ``sampler.generate(prompts, key=..., n=..., temperature=..., top_p=..., top_k=...,
    greedy=..., inv_eta=..., guided=...)`` -> :class:`RolloutBatch`.
    """

    def __init__(self, ref_model, guide=None, config: SamplerConfig | None = None, mesh=None):
        self.config = config = config if config is not None else SamplerConfig()
        self.mesh = mesh
        self.ref_cfg = ref_model.cfg
        self.ref_graph, ref_state = nnx.split(ref_model)
        self.ref_rules = ref_model.rules
        self.guide_graph = guide_state = None
        if guide is not None:
            if guide.cfg.vocab_size != ref_model.cfg.vocab_size:
                raise ValueError(
                    f"guide vocab {guide.cfg.vocab_size} != reference vocab "
                    f"{ref_model.cfg.vocab_size}: they must share one tokenizer."
                )
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
        self.last_timings: dict = {}  # seconds of the last generate: total (+ prefill, decode when static)
        self.last_stats: dict = {}  # decode steps, slots, useful tokens, slot utilisation

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
        filled = list(prompts) + [prompts[0]] * (batch - len(prompts))  # filler rows, dropped later
        return self._left_pad(filled, length)

    def _left_pad(self, prompts, length: int):
        tokens = np.full((len(prompts), length), self.config.pad_id, np.int32)
        mask = np.zeros((len(prompts), length), bool)
        for r, p in enumerate(prompts):
            tokens[r, length - len(p) :] = p
            mask[r, length - len(p) :] = True
        return tokens, mask

    # -- public --------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        key: jax.Array,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        greedy: bool = False,
        inv_eta: float = 0.0,
        guided: bool = True,
        keys: np.ndarray | None = None,
    ) -> RolloutBatch:
        """n samples of each prompt; row p * n + j is sample j of prompt p and samples with
        its own key (``row_keys(key, len(prompts), n)[p * n + j]``, or ``keys`` when given:
        [len(prompts) * n, 2] raw keys), so its result does not depend on the other rows."""
        cfg = self.config
        guided = bool(guided) and self.guide_graph is not None
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token.")
        keys = row_keys(key, len(prompts), n) if keys is None else np.asarray(keys, np.uint32)
        if keys.shape != (len(prompts) * n, 2):
            raise ValueError(f"keys must be [{len(prompts) * n}, 2] raw keys, got {keys.shape}.")
        knobs = dict(
            temperature=np.float32(temperature),
            top_p=np.float32(top_p),
            top_k=np.int32(top_k),
            greedy=np.bool_(greedy),
            inv_eta=np.float32(inv_eta),
        )
        spec = LoopSpec(cfg.max_new_tokens, cfg.k, cfg.guidance, guided)
        # stop ids are traced, padded with -1 to a multiple of 4 entries (fewer recompiles)
        stop_ids = np.full(_round_up(max(len(cfg.stop_ids), 1), 4), -1, np.int32)
        stop_ids[: len(cfg.stop_ids)] = cfg.stop_ids
        run = self._continuous if cfg.slots > 0 else self._static
        with reuse_freed_memory():  # large decode scratch is reused, not page-faulted in each step
            return run(prompts, n, keys, knobs, spec, stop_ids)

    def _models(self, guided: bool):
        return (self.guide_graph, self.guide_state) if guided else (None, None)

    def _static(self, prompts, n, keys, knobs, spec, stop_ids) -> RolloutBatch:
        """One batch: every row decodes until the last one stops."""
        cfg = self.config
        tokens, mask = self.pad_prompts(prompts)
        n_rows = tokens.shape[0] * n
        if self.mesh is not None:
            check_model_fits(self.ref_cfg, self.mesh, self.ref_rules, batch=n_rows, name="reference")
        newest = np.repeat(tokens[:, -1], n)
        position = np.repeat(mask.sum(axis=1) - 1, n).astype(np.int32)
        all_keys = np.zeros((n_rows, 2), np.uint32)  # filler rows (dropped) get zero keys
        all_keys[: len(keys)] = keys
        guide_graph, guide_state = self._models(spec.guided)
        start = time.perf_counter()
        with self._mesh_context():
            ref_cache, guide_cache = prefill_jit(
                self.ref_graph,
                guide_graph,
                n,
                cfg.max_new_tokens,
                self.ref_state,
                guide_state,
                self._put_batch(tokens),
                self._put_batch(mask),
                attention_block=cfg.attention_block,
            )
            jax.block_until_ready(ref_cache.index)  # only to time prefill apart from decode
            prefilled = time.perf_counter()
            final = decode_jit(
                self.ref_graph,
                guide_graph,
                spec,
                self.ref_state,
                guide_state,
                ref_cache,
                guide_cache,
                self._put_batch(newest),
                self._put_batch(position),
                self._put_batch(all_keys),
                knobs,
                stop_ids,
                np.int32(cfg.pad_id),
            )
        steps, lengths, outs = _fetch(
            (final.step, final.lengths, (final.tokens, final.logp_policy, final.logp_ref, final.kl_token))
        )
        end = time.perf_counter()
        keep = len(prompts) * n  # rows of filler prompts come last
        lengths = np.asarray(lengths[:keep])
        self.last_timings = dict(prefill=prefilled - start, decode=end - prefilled, total=end - start)
        self.last_stats = dict(
            steps=int(steps),
            slots=n_rows,
            useful_tokens=int(lengths.sum()),
            utilisation=lengths.sum() / (n_rows * max(int(steps), 1)),
        )
        out_tokens, logp_policy, logp_ref, kl_token = (np.asarray(o[:keep]) for o in outs)
        return RolloutBatch.from_rows(
            out_tokens, lengths, logp_policy, logp_ref, kl_token, num_prompts=len(prompts), n=n, steps=steps
        )

    def _refill(self, state, models, prompts, rows, dst, keys, n, group_size):
        """Start ``rows`` (of at most ``group_size`` distinct prompts) in slots ``dst``: one
        prefill of the distinct prompts ([group_size, length bucket]), caches copied per row."""
        slots, (guide_graph, guide_state) = state.live.shape[0], models
        uniq, src = np.unique(rows // n, return_inverse=True)
        group = [prompts[p] for p in uniq]
        group += [group[0]] * (group_size - len(group))
        tokens, mask = self._left_pad(group, _round_up(max(len(p) for p in group), self.config.prompt_bucket))
        src_all = np.zeros((slots,), np.int32)
        dst_all = np.full((slots,), slots, np.int32)  # out of range: dropped
        keys_all = np.zeros((slots, 2), np.uint32)
        src_all[: len(rows)], dst_all[: len(rows)], keys_all[: len(rows)] = src, dst, keys[rows]
        return refill_jit(
            self.ref_graph,
            guide_graph,
            self.ref_state,
            guide_state,
            state,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            jnp.asarray(src_all),
            jnp.asarray(dst_all),
            jnp.asarray(keys_all),
            np.int32(self.config.pad_id),
        )

    def _continuous(self, prompts, n, keys, knobs, spec, stop_ids) -> RolloutBatch:
        """Fixed decode slots; between segments, once enough slots are free (see
        :func:`refill_threshold`), pending rows start in them, whole prompts at a time when
        at least n slots are free (:func:`rows_to_start`): a refill prefills each of its
        distinct prompts once (in prefill programs of ``group_size`` prompts) and copies its
        caches into the slots of all its samples."""
        cfg = self.config
        total = len(prompts) * n
        shards = self._batch_shards()
        slots = _round_up(min(cfg.slots, _pow2_at_least(total)), shards)
        if self.mesh is not None:
            check_model_fits(self.ref_cfg, self.mesh, self.ref_rules, batch=slots, name="reference")
        prompt_len = _round_up(max(len(p) for p in prompts), cfg.prompt_bucket)
        cache_len = prompt_len - 1 + cfg.max_new_tokens
        models = guide_graph, guide_state = self._models(spec.guided)
        width, pad = cfg.max_new_tokens, np.int32(cfg.pad_id)
        out_tokens = np.full((total, width), cfg.pad_id, np.int32)
        out_f = [np.zeros((total, width), np.float32) for _ in range(3)]
        lengths = np.zeros((total,), np.int32)
        slot_row = np.full((slots,), -1)  # row decoding in each slot, -1 when free
        # prompts per prefill program (one shape per length bucket): the whole prompts a
        # refill at the threshold starts; larger refills loop, so no prefill row is padding
        # unless a refill starts fewer prompts (a prompt prefill costs ~3 decode steps here)
        group_size = _pow2_at_least(-(-math.ceil(cfg.refill_fraction * slots) // n))
        pending = 0  # rows are started in order
        steps = refills = prefills = 0
        start = time.perf_counter()
        with self._mesh_context():
            state = init_slots_jit(
                self.ref_graph, guide_graph, slots, cache_len, width, self.ref_state, guide_state, pad,
                attention_block=cfg.attention_block,
            )  # fmt: skip
            while pending < total or (slot_row >= 0).any():
                free = np.flatnonzero(slot_row < 0)
                if pending < total and len(free) >= refill_threshold(slots, n, pending, total, cfg.refill_fraction):
                    take = rows_to_start(len(free), n, pending, total)
                    rows = np.arange(pending, pending + take)
                    for part in np.split(rows, np.flatnonzero(np.diff((rows // n - rows[0] // n) // group_size)) + 1):
                        state = self._refill(state, models, prompts, part, free[part - pending], keys, n, group_size)
                        prefills += len(np.unique(part // n))
                    slot_row[free[:take]] = rows
                    pending += take
                    refills += 1
                # the segment ends early once enough slots are free for the next refill
                refill_at = refill_threshold(slots, n, pending, total, cfg.refill_fraction)
                state, ran = segment_jit(
                    self.ref_graph,
                    guide_graph,
                    spec,
                    self.ref_state,
                    guide_state,
                    state,
                    np.int32(cfg.segment),
                    np.int32(refill_at),
                    knobs,
                    stop_ids,
                    pad,
                )
                ran, live, age = _fetch((ran, state.live, state.age))
                steps += int(ran)
                finished = np.flatnonzero((slot_row >= 0) & ~live)
                if len(finished):
                    got = _fetch((state.tokens, state.logp_policy, state.logp_ref, state.kl_token))
                    r = slot_row[finished]
                    out_tokens[r] = got[0][finished]
                    for dst, src in zip(out_f, got[1:]):
                        dst[r] = src[finished]
                    lengths[r] = age[finished]
                    slot_row[finished] = -1
        end = time.perf_counter()
        self.last_timings = dict(total=end - start)
        self.last_stats = dict(
            steps=steps,
            slots=slots,
            refills=refills,
            prefills=prefills,
            useful_tokens=int(lengths.sum()),
            utilisation=lengths.sum() / (slots * max(steps, 1)),
        )
        logp_policy, logp_ref, kl_token = out_f
        return RolloutBatch.from_rows(
            out_tokens, lengths, logp_policy, logp_ref, kl_token, num_prompts=len(prompts), n=n, steps=steps
        )
