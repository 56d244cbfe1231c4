"""Training examples -> length-bucketed, left-padded batches with loss masks (spec 2.3).

An :class:`Example` is one rollout cut: ``input_ids`` (prompt + roll-in prefix without its
last token), ``target_ids`` (the cut token + the reference continuation), the reward R and
a loss weight. A row is ``[pad | input_ids | target_ids]`` with ``loss_mask`` 1 exactly on
the target positions.

Batch order is a pure function of (seed, epoch, position): no iterator state besides two
integers, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: Sequence[int]
    target_ids: Sequence[int]
    reward: float
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class BucketedExamples:
    """Examples grouped by the smallest bucket length that holds them (too-long targets
    truncated to the largest bucket; examples whose input alone does not fit are dropped)."""

    buckets: tuple  # bucket lengths, ascending
    examples: tuple  # per bucket: tuple of Example
    num_dropped: int
    num_truncated: int

    def num_batches(self, batch_size: int) -> int:
        return sum(-(-len(ex) // batch_size) for ex in self.examples)


def bucket_examples(examples: Sequence[Example], buckets: Sequence[int]) -> BucketedExamples:
    buckets = tuple(sorted(int(b) for b in buckets))
    if not buckets or buckets[0] < 2:
        raise ValueError(f"bucket lengths must be >= 2, got {buckets}.")
    longest = buckets[-1]
    grouped: list[list[Example]] = [[] for _ in buckets]
    dropped = truncated = 0
    for ex in examples:
        n_in, n_tgt = len(ex.input_ids), len(ex.target_ids)
        if n_tgt == 0 or n_in + 1 > longest:  # need at least the cut token as a target
            dropped += 1
            continue
        if n_in + n_tgt > longest:  # keep the prefix whole, cut the continuation (spec 2.3 max_length)
            ex = dataclasses.replace(ex, target_ids=tuple(ex.target_ids)[: longest - n_in])
            truncated += 1
        n = len(ex.input_ids) + len(ex.target_ids)
        grouped[int(np.searchsorted(buckets, n))].append(ex)
    return BucketedExamples(buckets, tuple(tuple(g) for g in grouped), dropped, truncated)


def epoch_plan(data: BucketedExamples, batch_size: int, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches as (bucket index, example indices padded with -1 to batch_size).

    Examples are shuffled within each bucket, cut into batches, then the batches of all
    buckets are shuffled together. Deterministic in (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    plan = []
    for b, exs in enumerate(data.examples):
        order = rng.permutation(len(exs))
        for start in range(0, len(exs), batch_size):
            idx = np.full(batch_size, -1, np.int64)
            chunk = order[start : start + batch_size]
            idx[: len(chunk)] = chunk
            plan.append((b, idx))
    perm = rng.permutation(len(plan))
    return [plan[i] for i in perm]


def collate(examples: Sequence[Example | None], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Left-padded arrays for a batch; ``None`` rows are padding (weight 0, no targets).

    tokens [B, L] int32, token_mask [B, L] bool (False on pads), loss_mask [B, L] bool
    (True on target positions), reward [B] float32, weight [B] float32."""
    b = len(examples)
    tokens = np.full((b, length), pad_id, np.int32)
    token_mask = np.zeros((b, length), bool)
    loss_mask = np.zeros((b, length), bool)
    reward = np.zeros((b,), np.float32)
    weight = np.zeros((b,), np.float32)
    for i, ex in enumerate(examples):
        if ex is None:
            continue
        row = list(ex.input_ids) + list(ex.target_ids)
        if len(row) > length:
            raise ValueError(f"example of {len(row)} tokens does not fit a row of {length}.")
        start = length - len(row)
        tokens[i, start:] = row
        token_mask[i, start:] = True
        loss_mask[i, length - len(ex.target_ids) :] = True
        reward[i], weight[i] = ex.reward, ex.weight
    return dict(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask, reward=reward, weight=weight)


class BatchStream:
    """Batches of one run, addressed by (epoch, position in epoch)."""

    def __init__(self, data: BucketedExamples, batch_size: int, seed: int, pad_id: int = 0):
        self.data, self.batch_size, self.seed, self.pad_id = data, batch_size, seed, pad_id
        self.batches_per_epoch = data.num_batches(batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                "no training examples left after bucketing "
                f"({data.num_dropped} dropped as longer than the largest bucket {data.buckets[-1]})."
            )
        self._plan_epoch, self._plan = None, None

    def position_of_step(self, step: int) -> tuple[int, int]:
        return divmod(step, self.batches_per_epoch)

    def batch(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = epoch_plan(self.data, self.batch_size, self.seed, epoch), epoch
        bucket, idx = self._plan[position]
        exs = self.data.examples[bucket]
        return collate([exs[i] if i >= 0 else None for i in idx], self.data.buckets[bucket], self.pad_id)
