"""Training examples -> length-bucketed, left-padded batches with loss masks (spec 2.3).

An :class:`Example` is one rollout cut: ``input_ids`` (prompt + roll-in prefix without its
last token), ``target_ids`` (the cut token + the reference continuation), the reward R and
a loss weight. A row is ``[pad | input_ids | target_ids]`` with ``loss_mask`` 1 exactly on
the target positions.

Batch order is a pure function of (seed, epoch, position): no iterator state besides two
integers, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import bisect
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


# ---- packing: several examples per row, no padding between them --------------------------


@dataclasses.dataclass(frozen=True)
class PackedExamples:
    """Examples packed into rows of ``row_length`` tokens (best fit, longest first; fixed for
    the run, so the number of batches per epoch is too); each epoch shuffles the rows and cuts
    them into batches of ``rows_per_batch`` rows (about ``batch_size`` examples)."""

    examples: tuple
    rows: tuple  # per row: tuple of example indices, in order
    row_length: int
    rows_per_batch: int
    num_dropped: int
    num_truncated: int

    def num_batches(self) -> int:
        return -(-len(self.rows) // self.rows_per_batch)

    def padded_fraction(self) -> float:
        """Pad tokens / all tokens of one epoch's batches (the last batch's empty rows included)."""
        real = sum(example_length(e) for e in self.examples)
        return 1.0 - real / (self.num_batches() * self.rows_per_batch * self.row_length)


def example_length(ex: Example) -> int:
    return len(ex.input_ids) + len(ex.target_ids)


def bucketed_padded_fraction(data: BucketedExamples, batch_size: int) -> float:
    """Pad tokens / all tokens of one epoch of bucketed (unpacked) batches."""
    real = sum(example_length(e) for exs in data.examples for e in exs)
    total = sum(-(-len(exs) // batch_size) * batch_size * b for b, exs in zip(data.buckets, data.examples))
    return 1.0 - real / total if total else 0.0


def pack_examples(data: BucketedExamples, batch_size: int, row_multiple: int = 1) -> PackedExamples:
    """Pack the bucketed examples (already truncated) into rows of the smallest bucket that
    holds two of the longest (the largest bucket if none does: rows of one long example leave
    little room). rows_per_batch is the divisor of ``batch_size`` closest to holding
    ``batch_size`` examples on average (a divisor, so that a mesh that splits ``batch_size``
    rows splits these rows too), among those that are multiples of ``row_multiple`` (the
    mesh's batch shards) when there are any."""
    examples = tuple(e for exs in data.examples for e in exs)
    if not examples:
        return PackedExamples((), (), data.buckets[0], batch_size, data.num_dropped, data.num_truncated)
    lengths = np.asarray([example_length(e) for e in examples])
    row_length = int(data.buckets[min(int(np.searchsorted(data.buckets, 2 * lengths.max())), len(data.buckets) - 1)])
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (space left, row id), ascending: best fit = first that fits
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, row = free.pop(j)
        else:
            space, row = row_length, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    target = batch_size * float(lengths.mean()) / row_length
    divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
    divisors = [d for d in divisors if d % row_multiple == 0] or divisors
    per_batch = min(divisors, key=lambda d: abs(np.log(d / max(target, 1e-9))))
    return PackedExamples(
        examples, tuple(tuple(r) for r in rows), row_length, per_batch, data.num_dropped, data.num_truncated
    )


def collate_packed(rows: Sequence[Sequence[Example]], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of consecutive examples, right-padded. Per token [B, L]: tokens, token_mask,
    loss_mask, segment_ids (1, 2, ... per example in its row, 0 on pads), positions
    (restarting at 0 per example), reward (its example's R) and weight (its example's weight /
    its number of target tokens, on target positions: the loss is then the same weighted mean
    of per-example means as for unpacked batches)."""
    b = len(rows)
    out = dict(
        tokens=np.full((b, length), pad_id, np.int32),
        token_mask=np.zeros((b, length), bool),
        loss_mask=np.zeros((b, length), bool),
        segment_ids=np.zeros((b, length), np.int32),
        positions=np.zeros((b, length), np.int32),
        reward=np.zeros((b, length), np.float32),
        weight=np.zeros((b, length), np.float32),
    )
    for i, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row, start=1):
            ids = list(ex.input_ids) + list(ex.target_ids)
            end, first_target = start + len(ids), start + len(ex.input_ids)
            if end > length:
                raise ValueError(f"row {i} holds {end} tokens, more than {length}.")
            out["tokens"][i, start:end] = ids
            out["token_mask"][i, start:end] = True
            out["loss_mask"][i, first_target:end] = True
            out["segment_ids"][i, start:end] = s
            out["positions"][i, start:end] = np.arange(len(ids))
            out["reward"][i, start:end] = ex.reward
            out["weight"][i, first_target:end] = ex.weight / len(ex.target_ids)
            start = end
    return out


class PackedStream:
    """Packed batches of one run, addressed by (epoch, position in epoch); rows shuffled per
    epoch, deterministic in (seed, epoch)."""

    def __init__(self, packed: PackedExamples, seed: int, pad_id: int = 0):
        self.packed, self.seed, self.pad_id = packed, seed, pad_id
        self.batches_per_epoch = packed.num_batches()
        if self.batches_per_epoch == 0:
            raise ValueError(f"no training examples left after bucketing ({packed.num_dropped} dropped).")
        self._epoch, self._order = None, None

    def position_of_step(self, step: int) -> tuple[int, int]:
        return divmod(step, self.batches_per_epoch)

    def batch(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        p = self.packed
        if self._epoch != epoch:
            self._order, self._epoch = np.random.default_rng([self.seed, epoch]).permutation(len(p.rows)), epoch
        picked = self._order[position * p.rows_per_batch : (position + 1) * p.rows_per_batch]
        rows = [[p.examples[i] for i in p.rows[r]] for r in picked]
        rows += [[]] * (p.rows_per_batch - len(rows))
        return collate_packed(rows, p.row_length, self.pad_id)
