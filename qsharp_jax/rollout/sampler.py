"""The host-side sampler: pads and buckets prompts, places params and batches on the mesh,
and runs the engine's jitted prefill and decode; returns numpy results."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from qsharp_jax.core.sharding import check_model_fits, logical_to_spec, state_shardings
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
    ) -> RolloutBatch:
        cfg = self.config
        guided = bool(guided) and self.guide_graph is not None
        tokens, mask = self.pad_prompts(prompts)
        n_rows = tokens.shape[0] * n
        if self.mesh is not None:
            check_model_fits(self.ref_cfg, self.mesh, self.ref_rules, batch=n_rows, name="reference")
        newest = np.repeat(tokens[:, -1], n)
        position = np.repeat(mask.sum(axis=1) - 1, n).astype(np.int32)
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
        guide_graph = self.guide_graph if guided else None
        guide_state = self.guide_state if guided else None
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
                key,
                knobs,
                stop_ids,
                np.int32(cfg.pad_id),
            )
        steps, lengths, outs = _fetch(
            (final.step, final.lengths, (final.tokens, final.logp_policy, final.logp_ref, final.kl_token))
        )
        end = time.perf_counter()
        self.last_timings = dict(prefill=prefilled - start, decode=end - prefilled, total=end - start)
        keep = len(prompts) * n  # rows of filler prompts come last
        out_tokens, logp_policy, logp_ref, kl_token = (np.asarray(o[:keep]) for o in outs)
        return RolloutBatch(
            tokens=out_tokens,
            lengths=np.asarray(lengths[:keep]),
            logp_policy=logp_policy,
            logp_ref=logp_ref,
            kl_token=kl_token,
            kl_traj=kl_token.sum(axis=1),
            prompt_index=np.repeat(np.arange(len(prompts)), n),
            steps=int(steps),
        )
