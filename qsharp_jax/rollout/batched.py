"""Sample many prompts through a :class:`~qsharp_jax.rollout.sampler.Sampler` in fixed-size
chunks (one compiled loop shape), with an optional progress bar; results concatenated.

:func:`generate_chunks` gives the results of chunked calls (chunk c with ``fold_in(key, c)``);
a continuous-batching sampler computes all of them in one call (rows >> slots), with the same
per-row keys, so the rows are the same as chunk by chunk."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from qsharp_jax.rollout.sampler import Sampler, row_keys
from qsharp_jax.rollout.state import RolloutBatch


def generate_in_chunks(
    sampler: Sampler,
    prompts: Sequence[Sequence[int]],
    *,
    key: jax.Array,
    chunk: int = 256,
    n: int = 1,
    desc: str | None = None,
    **knobs,
) -> RolloutBatch:
    """Like ``sampler.generate(prompts, n=n, **knobs)``, ``chunk`` prompts per call (the last
    chunk is padded with repeats of its first prompt, so every call has the same shape).
    Chunk i samples with ``fold_in(key, i)``."""
    parts = []
    starts = range(0, len(prompts), chunk)
    bar = tqdm(starts, desc=desc, leave=False, file=sys.stderr, disable=desc is None)
    for i, start in enumerate(bar):
        part = list(prompts[start : start + chunk])
        real = len(part)
        part += [part[0]] * (chunk - real)
        out = sampler.generate(part, key=jax.random.fold_in(key, i), n=n, **knobs)
        keep = real * n
        parts.append((out, keep, start))
    return RolloutBatch(
        tokens=np.concatenate([o.tokens[:k] for o, k, _ in parts]),
        lengths=np.concatenate([o.lengths[:k] for o, k, _ in parts]),
        logp_policy=np.concatenate([o.logp_policy[:k] for o, k, _ in parts]),
        logp_ref=np.concatenate([o.logp_ref[:k] for o, k, _ in parts]),
        kl_token=np.concatenate([o.kl_token[:k] for o, k, _ in parts]),
        kl_traj=np.concatenate([o.kl_traj[:k] for o, k, _ in parts]),
        prompt_index=np.concatenate([o.prompt_index[:k] + s for o, k, s in parts]),
        steps=max(o.steps for o, _, _ in parts),
    )


def continuous(sampler) -> bool:
    """Whether ``sampler`` decodes with continuous batching (duck-typed: test fakes are not)."""
    return getattr(getattr(sampler, "config", None), "slots", 0) > 0


def generate_chunks(
    sampler,
    prompts: Sequence[Sequence[int]],
    *,
    key: jax.Array,
    n: int,
    chunk: int,
    progress: Callable[[Iterable], Iterable] | None = None,
    **knobs,
) -> Iterator[tuple[int, object]]:
    """(first prompt, batch) pairs covering ``prompts``: the rows of ``sampler.generate`` on
    chunks of ``chunk`` prompts, chunk c sampled with ``fold_in(key, c)``. A continuous-batching
    sampler gets every chunk in one call with those chunks' per-row keys (one pair, start 0):
    the same rows, with the slots kept full across chunk boundaries."""
    starts = list(range(0, len(prompts), chunk))
    if continuous(sampler) and len(starts) > 1:
        keys = np.concatenate(
            [row_keys(jax.random.fold_in(key, c), len(prompts[s : s + chunk]), n) for c, s in enumerate(starts)]
        )
        for _ in progress([0]) if progress else [0]:
            yield 0, sampler.generate([list(p) for p in prompts], key=key, n=n, keys=keys, **knobs)
        return
    for c, start in enumerate(progress(starts) if progress else starts):
        part = [list(p) for p in prompts[start : start + chunk]]
        yield start, sampler.generate(part, key=jax.random.fold_in(key, c), n=n, **knobs)
