"""A trained guide's predictions outside training: calibration on held-out classifier
examples, and the value of finished responses (Q# as a reward model, spec 6 / Table 3).

Both run the guide's training-time forward (:func:`qsharp_jax.guidance.train_step.predictions`,
so ``out[:, t]`` scores (prefix_<t, token_t) for V- and Q-type heads alike) on length-bucketed,
left-padded batches, jitted once per bucket length.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsharp_jax.core import metrics, multihost
from qsharp_jax.guidance.batching import Example, collate
from qsharp_jax.guidance.model import GuidanceModel
from qsharp_jax.guidance.train_step import predicted_mean, predictions


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@jax.jit
def _forward_means(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    out, mask = predictions(model, batch)
    mean = predicted_mean(model.head_cfg, out)
    if mean.shape[1] != batch["tokens"].shape[1]:  # Q-type drops the first position
        mean = jax.numpy.pad(mean, ((0, 0), (1, 0)))
        mask = jax.numpy.pad(mask, ((0, 0), (1, 0)))
    return mean, mask


def _batches(examples: Sequence[Example], batch_size: int, bucket: int, pad_id: int):
    """(indices, collated batch) over ``examples`` grouped by bucketed row length."""
    lengths = [len(e.input_ids) + len(e.target_ids) for e in examples]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(_round_up(n, bucket), []).append(i)
    for length, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            rows = [examples[i] for i in idx] + [None] * (batch_size - len(idx))  # fixed shapes
            yield idx, collate(rows, length, pad_id)


def predicted_means(
    guide: GuidanceModel, examples: Sequence[Example], *, batch_size: int = 8, bucket: int = 64, pad_id: int = 0
) -> list[np.ndarray]:
    """Per example, the guide's predicted E[Z] at each of its target positions."""
    graphdef, state = nnx.split(guide)
    leaves = jax.tree.leaves(state)
    mesh = getattr(leaves[0].sharding, "mesh", None) if leaves else None
    out: list[np.ndarray | None] = [None] * len(examples)
    for idx, batch in _batches(examples, batch_size, bucket, pad_id):
        if jax.process_count() > 1 and isinstance(mesh, Mesh):
            # multi-host: the guide spans processes, so the (identical) host batch becomes one
            # global array that every device holds; results are gathered back to every host
            whole = NamedSharding(mesh, P())
            batch = {k: jax.make_array_from_callback(v.shape, whole, lambda i, v=v: v[i]) for k, v in batch.items()}
        mean, mask = multihost.to_host(_forward_means(graphdef, state, batch))
        for row, i in enumerate(idx):
            out[i] = np.asarray(mean[row][np.asarray(mask[row])], np.float64)
    return out


def calibration(
    guide: GuidanceModel,
    examples: Sequence[Example],
    *,
    num_bins: int = 10,
    batch_size: int = 8,
    bucket: int = 64,
    pad_id: int = 0,
) -> dict:
    """Held-out calibration at every target position: BCE of the predicted mean (Bernoulli
    heads' log-loss, computed from E[Z] so it also reads categorical heads), ECE and explained
    variance, each position weighted equally."""
    head = guide.head_cfg
    means = predicted_means(guide, examples, batch_size=batch_size, bucket=bucket, pad_id=pad_id)
    p = np.concatenate(means) if means else np.zeros(0)
    r = np.concatenate([np.full(len(m), e.reward) for m, e in zip(means, examples)]) if means else np.zeros(0)
    # one row per position: calibration_sums takes one label per row
    sums = metrics.calibration_sums(p[:, None], r, np.ones((len(p), 1)), num_bins, head.v_min, head.v_max)
    summary = metrics.summarize_calibration(jax.device_get(sums))
    unit = np.clip((p - head.v_min) / (head.v_max - head.v_min), 1e-6, 1 - 1e-6)
    target = (r - head.v_min) / (head.v_max - head.v_min)
    bce = float(-np.mean(target * np.log(unit) + (1 - target) * np.log(1 - unit))) if len(p) else float("nan")
    return dict(
        bce=bce,
        ece=summary["ece"],
        explained_variance=summary["explained_variance"],
        positions=len(p),
        examples=len(examples),
    )


def sequence_values(
    guide: GuidanceModel,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    bucket: int = 64,
    pad_id: int = 0,
) -> np.ndarray:
    """The guide's predicted E[Z] of each sequence's last token given all before it: for a
    prompt + response ending in EOS, the value Q(x, EOS) used as a reward model (spec 6)."""
    if any(len(s) < 2 for s in sequences):
        raise ValueError("every sequence needs a context and a last token to score.")
    examples = [Example(list(s[:-1]), [s[-1]], 0.0) for s in sequences]
    means = predicted_means(guide, examples, batch_size=batch_size, bucket=bucket, pad_id=pad_id)
    return np.asarray([m[-1] for m in means], np.float64)
