"""Sample many prompts through a :class:`~qsharp_jax.rollout.sampler.Sampler` in fixed-size
chunks (one compiled loop shape), with an optional progress bar; results concatenated."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from qsharp_jax.rollout.sampler import Sampler
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
