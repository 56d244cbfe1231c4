"""Algorithm 1 data collection (spec 2.2) and classifier examples (spec 2.3).

One Q# iteration collects, for each training problem and each of n samples:

1. a full response from the current guided policy (iteration 1: guidance off, pure pi_ref);
2. a cut index c ~ Unif{0..L-1} over the response (L counts the EOS token if any);
3. unless the cut is at the last token, a continuation of prompt + response[:c+1] with pi_ref
   alone (guidance off);
4. the reward R = correctness of response[:c+1] + continuation (or of the response itself
   when the cut is at its end).

:func:`create_classifier_data` turns rollouts into (input_ids, target_ids, reward, weight)
examples: the guided prefix without its last token is the input, the cut token (plus the
pi_ref continuation with ``use_all_ref_tokens``, the "Prefix = All" setting) is the target,
and every target position is labelled R. Iterations aggregate by concatenation; rollouts
are saved as JSONL per (iteration, shard of problems) so a restarted job skips finished ones.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from qsharp_jax.guidance.batching import Example
from qsharp_jax.rollout.batched import generate_chunks
from qsharp_jax.tasks.data import DataFormatError, parse_jsonl, read_jsonl
from qsharp_jax.tasks.grading import Grader


@dataclasses.dataclass(frozen=True)
class Rollout:
    question: str
    gold: str
    prompt_ids: list[int]
    response_ids: list[int]  # the full rolled-in response (EOS included if it was generated)
    response_correct: bool
    cut: int  # prefix = response_ids[:cut + 1]; the last prefix token is the labelled "cut token"
    continuation_ids: list[int]  # pi_ref continuation after the prefix ([] when the cut is at the end)
    reward: float
    iteration: int
    sample: int

    @property
    def prefix_ids(self) -> list[int]:
        return self.response_ids[: self.cut + 1]


# A classifier example is the learner's own example type: (input_ids, target_ids, reward R
# labelling every target position, weight).
ClassifierExample = Example


# ---- collection ------------------------------------------------------------------------


def _rows(batch, tokenizer) -> list[tuple[int, list[int], str]]:
    """(prompt index, response ids, decoded text) per row of a rollout batch."""
    out = []
    for i in range(len(batch.lengths)):
        ids = np.asarray(batch.tokens[i, : int(batch.lengths[i])]).tolist()
        out.append((int(batch.prompt_index[i]), ids, tokenizer.decode(ids, skip_special_tokens=True)))
    return out


def collect_iteration(
    sampler,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    questions: Sequence[str],
    golds: Sequence[str],
    *,
    iteration: int,
    num_samples: int,
    key,
    guided: bool,
    inv_eta: float,
    temperature: float = 0.8,
    top_p: float = 0.9,
    grader: Grader = Grader(),
    seed: int = 47,
    shard: int = 0,
    problems_per_batch: int = 8,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> list[Rollout]:
    """Rollouts of one Q# iteration: ``num_samples`` per problem, in (problem, sample) order.

    ``shard`` numbers a slice of an iteration's problems: each shard draws its own random
    numbers, so shards can be collected (and resumed) independently."""
    # The cut indices come from a numpy stream seeded by (seed, iteration, shard): reproducible
    # and independent of how problems are batched.
    rng = np.random.default_rng([seed, iteration, shard])
    roll_key, cont_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, iteration), shard))
    full: list[list] = [[] for _ in prompts]
    # a continuous-batching sampler gets the whole shard in one call (same rows as per chunk)
    for start, batch in generate_chunks(
        sampler,
        prompts,
        key=roll_key,
        n=num_samples,
        chunk=problems_per_batch,
        progress=progress,
        temperature=temperature,
        top_p=top_p,
        inv_eta=inv_eta,
        guided=guided,
    ):
        for p, ids, text in _rows(batch, tokenizer):
            full[start + p].append((ids, text))

    # Cut every response; queue the pi_ref continuations that are needed.
    plans = []  # (problem, sample, response ids, correct, cut, needs continuation)
    for p, samples in enumerate(full):
        for s, (ids, text) in enumerate(samples):
            if not ids:
                continue  # nothing was generated: no (prefix, token) pair to label
            correct = grader.same(golds[p], grader.extract(text))
            cut = int(rng.integers(len(ids)))
            plans.append((p, s, ids, correct, cut, cut < len(ids) - 1))
    queued = [i for i, plan in enumerate(plans) if plan[5]]
    continuations: dict[int, tuple[list[int], str]] = {}
    rows_per_batch = max(1, problems_per_batch * num_samples)
    cont_prompts = [list(prompts[plans[i][0]]) + plans[i][2][: plans[i][4] + 1] for i in queued]
    for start, batch in generate_chunks(
        sampler,
        cont_prompts,
        key=cont_key,
        n=1,
        chunk=rows_per_batch,
        progress=progress,
        temperature=temperature,
        top_p=top_p,
        inv_eta=0.0,
        guided=False,
    ):
        for row, ids, _ in _rows(batch, tokenizer):
            continuations[queued[start + row]] = ids

    rollouts = []
    for i, (p, s, ids, correct, cut, continued) in enumerate(plans):
        if continued:
            cont = continuations[i]
            text = tokenizer.decode(ids[: cut + 1] + cont, skip_special_tokens=True)
            reward = grader.reward(text, golds[p])
        else:
            cont, reward = [], float(correct)
        rollouts.append(
            Rollout(questions[p], golds[p], list(prompts[p]), ids, bool(correct), cut, cont, reward, iteration, s)
        )
    return rollouts


# ---- classifier examples ------------------------------------------------------------------


def drop_problems_without_variation(rollouts: Sequence[Rollout]) -> list[Rollout]:
    """Keep only problems whose rewards (over all aggregated samples) are not all equal:
    a problem that is always (or never) solved teaches the guide nothing about tokens."""
    rewards = collections.defaultdict(set)
    for r in rollouts:
        rewards[r.question].add(r.reward)
    return [r for r in rollouts if len(rewards[r.question]) > 1]


def create_classifier_data(
    rollouts: Sequence[Rollout],
    *,
    drop_no_variation: bool = True,
    use_all_ref_tokens: bool = True,
    max_length: int = -1,
) -> list[ClassifierExample]:
    """Training examples of the guidance model from (aggregated) rollouts."""
    if drop_no_variation:
        rollouts = drop_problems_without_variation(rollouts)
    examples = []
    for r in rollouts:
        prefix = r.prefix_ids
        input_ids = list(r.prompt_ids) + prefix[:-1]
        target_ids = [prefix[-1]] + (list(r.continuation_ids) if use_all_ref_tokens else [])
        if max_length > 0:
            if len(input_ids) >= max_length - 1:
                continue
            target_ids = target_ids[: max_length - len(input_ids)]
        examples.append(ClassifierExample(input_ids, target_ids, float(r.reward), 1.0))
    return examples


def aggregate(per_iteration: Iterable[Sequence[Rollout]]) -> list[Rollout]:
    """Aggregated dataset of Algorithm 1: all iterations' rollouts, concatenated."""
    return [r for rollouts in per_iteration for r in rollouts]


# ---- persistence ---------------------------------------------------------------------------


def save_rollouts(path: str | os.PathLike, rollouts: Sequence[Rollout]) -> None:
    """Write JSONL atomically: a file that exists is a finished iteration."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rollouts:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    os.replace(tmp, path)


def load_rollouts(path: str | os.PathLike, text: str | None = None) -> list[Rollout]:
    """The rollouts saved in ``path`` (or in ``text``, that file's content read elsewhere)."""
    path = os.fspath(path)
    fields = [f.name for f in dataclasses.fields(Rollout)]
    records = read_jsonl(path) if text is None else parse_jsonl(text.splitlines(), path)
    out = []
    for line_number, record in records:
        missing = [k for k in fields if k not in record]
        if missing:
            raise DataFormatError(path, line_number, f"rollout record misses keys {missing}")
        out.append(Rollout(**{k: record[k] for k in fields}))
    return out


def rollouts_path(output_dir: str, iteration: int, shard: int = 0) -> str:
    """Where one shard of an iteration's rollouts is saved."""
    return os.path.join(output_dir, "rollouts", f"iteration_{iteration}", f"shard_{shard:05d}.jsonl")
