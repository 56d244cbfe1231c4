"""Evaluation metrics of spec 4.5 and a driver that samples and grades a problem set.

The metric functions take plain Python / numpy data (per-problem lists of n samples), so
they are testable without a model:

* pass@1: mean over ``rounds`` simulations of "one random sample per problem is correct";
* maj1@n: majority vote over the extracted answers, classes formed greedily with the
  answer matcher, empty answers ignored, ties broken uniformly at random;
* pass@n: any of the n samples is correct;
* KL: mean trajectory KL(pi || pi_ref) over all samples;
* Q# as a reward model (spec 6): best-of-n by the guide's value of each finished response,
  and majority voting with those values as weights.

Each metric comes with its standard error over problems (the unit samples are drawn per).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from qsharp_jax.rollout.batched import generate_chunks
from qsharp_jax.tasks import grading
from qsharp_jax.tasks.base import Problem, Task
from qsharp_jax.tasks.grading import Grader

Matcher = Callable[[str, str], bool]


def pass_at_1(correct: Sequence[Sequence[bool]], rounds: int = 100, seed: int = 47) -> float:
    """Mean over ``rounds`` of the accuracy of one uniformly drawn sample per problem."""
    if not len(correct):
        return 0.0
    rng = np.random.default_rng(seed)
    totals = np.zeros(rounds)
    for samples in correct:
        if not len(samples):
            raise ValueError("pass@1: a problem has no samples.")
        picks = rng.integers(0, len(samples), size=rounds)
        totals += np.asarray(samples, dtype=float)[picks]
    return float(np.mean(totals / len(correct)))


def pass_at_n(correct: Sequence[Sequence[bool]]) -> float:
    if not len(correct):
        return 0.0
    return float(np.mean([any(samples) for samples in correct]))


def answer_classes(answers: Sequence[str], matcher: Matcher) -> list[list[int]]:
    """Greedy equivalence classes of sample indices: each non-empty answer joins the first
    class whose representative (its first member) matches it, else starts a new class."""
    classes: list[list[int]] = []
    for i, answer in enumerate(answers):
        if not answer:
            continue  # no answer: never votes
        for members in classes:
            if matcher(answers[members[0]], answer):
                members.append(i)
                break
        else:
            classes.append([i])
    return classes


def majority_vote_correct(
    answers: Sequence[str], correct: Sequence[bool], matcher: Matcher, rng: np.random.Generator
) -> bool:
    """Whether the majority answer is correct (False when no sample has an answer)."""
    classes = answer_classes(answers, matcher)
    if not classes:
        return False
    largest = max(len(c) for c in classes)
    tied = [c for c in classes if len(c) == largest]
    winner = tied[int(rng.integers(len(tied)))]
    return bool(correct[winner[0]])


def majority_votes(
    answers: Sequence[Sequence[str]],
    correct: Sequence[Sequence[bool]],
    matcher: Matcher | str = "symbolic",
    seed: int = 47,
) -> list[bool]:
    """Per problem, whether its majority answer is correct (one tie-break draw per problem, in order)."""
    if isinstance(matcher, str):
        matcher = grading.get_matcher(matcher)
    rng = np.random.default_rng(seed)
    return [majority_vote_correct(a, c, matcher, rng) for a, c in zip(answers, correct)]


def maj_at_n(
    answers: Sequence[Sequence[str]],
    correct: Sequence[Sequence[bool]],
    matcher: Matcher | str = "symbolic",
    seed: int = 47,
) -> float:
    votes = majority_votes(answers, correct, matcher, seed)
    return float(np.mean(votes)) if votes else 0.0


def weighted_vote_correct(
    answers: Sequence[str], correct: Sequence[bool], weights: Sequence[float], matcher: Matcher, rng
) -> bool:
    """Majority vote where each sample counts with its weight (Q# value as reward model):
    the class with the largest summed weight wins, ties broken uniformly at random."""
    classes = answer_classes(answers, matcher)
    if not classes:
        return False
    totals = np.asarray([sum(weights[i] for i in c) for c in classes])
    tied = np.flatnonzero(totals == totals.max())
    return bool(correct[classes[int(tied[int(rng.integers(len(tied)))])][0]])


def best_of_n_correct(correct: Sequence[bool], scores: Sequence[float], rng) -> bool:
    """Whether the highest-scored sample is correct (ties broken uniformly at random)."""
    scores = np.asarray(scores, np.float64)
    tied = np.flatnonzero(scores == scores.max())
    return bool(correct[int(tied[int(rng.integers(len(tied)))])])


def standard_error(per_problem: Sequence[float]) -> float:
    """Standard error of a mean over problems (the unit the samples are drawn per): the
    sample standard deviation of the per-problem values over sqrt(#problems)."""
    x = np.asarray(per_problem, np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired_difference(correct_a: Sequence[Sequence[bool]], correct_b: Sequence[Sequence[bool]]) -> tuple[float, float]:
    """(mean, standard error) over problems of the difference of per-problem accuracies of two
    policies evaluated on the same problems (and, in the sweep, the same per-row keys): the
    pairing removes the between-problem variance that the two separate standard errors carry."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired evaluations need the same problems: {len(correct_a)} vs {len(correct_b)}.")
    diff = [float(np.mean(a)) - float(np.mean(b)) for a, b in zip(correct_a, correct_b)]
    return float(np.mean(diff)), standard_error(diff)


def mean_kl(kl_traj: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Mean trajectory KL over all problems x samples (the paper's aggregation is unstated;
    this is the natural reading)."""
    flat = np.concatenate([np.asarray(k, dtype=float).ravel() for k in kl_traj]) if len(kl_traj) else np.zeros(0)
    return float(flat.mean()) if flat.size else 0.0


# ---- sampling + grading -------------------------------------------------------------


@dataclasses.dataclass
class Graded:
    """Per-problem samples of one evaluation: ``[problem][sample]`` lists."""

    responses: list[list[str]]
    answers: list[list[str]]
    correct: list[list[bool]]
    kl_traj: list[list[float]]
    lengths: list[list[int]]
    response_ids: list[list[list[int]]] = dataclasses.field(default_factory=list)
    values: list[list[float]] | None = None  # the guide's Q(x, response + EOS) per sample, when scored

    def metrics(self, grader: Grader = Grader(), rounds: int = 100, seed: int = 47) -> dict[str, float]:
        """pass@1, maj1@n, pass@n, mean KL and length, each with its standard error over
        problems (``<name>_se``); with ``values``, the reward-model metrics too."""
        n = max((len(c) for c in self.correct), default=0)
        if not n:
            return {"num_problems": 0.0}
        accuracy = [float(np.mean(c)) for c in self.correct]  # pass@1's per-problem expectation
        votes = [float(v) for v in majority_votes(self.answers, self.correct, grader.same, seed)]
        any_right = [float(any(c)) for c in self.correct]
        kl = [float(np.mean(k)) for k in self.kl_traj]
        out = {
            "pass@1": pass_at_1(self.correct, rounds=rounds, seed=seed),
            "pass@1_se": standard_error(accuracy),
            f"maj1@{n}": float(np.mean(votes)),
            f"maj1@{n}_se": standard_error(votes),
            f"pass@{n}": float(np.mean(any_right)),
            f"pass@{n}_se": standard_error(any_right),
            "kl": mean_kl(self.kl_traj),
            "kl_se": standard_error(kl),
            "mean_length": float(np.mean([t for row in self.lengths for t in row])),
            "num_problems": float(len(self.correct)),
        }
        if self.values is not None:
            rng = np.random.default_rng(seed)
            best = [float(best_of_n_correct(c, v, rng)) for c, v in zip(self.correct, self.values)]
            weighted = [
                float(weighted_vote_correct(a, c, v, grader.same, rng))
                for a, c, v in zip(self.answers, self.correct, self.values)
            ]
            out.update(
                {
                    f"rm_best_of_{n}": float(np.mean(best)),
                    f"rm_best_of_{n}_se": standard_error(best),
                    f"rm_maj1@{n}": float(np.mean(weighted)),
                    f"rm_maj1@{n}_se": standard_error(weighted),
                }
            )
        return out


def response_texts(batch, tokenizer) -> list[str]:
    """Decoded responses of a rollout batch (special tokens such as EOS dropped)."""
    return [
        tokenizer.decode(np.asarray(batch.tokens[i, : int(batch.lengths[i])]).tolist(), skip_special_tokens=True)
        for i in range(len(batch.lengths))
    ]


def sample_and_grade(
    sampler,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    golds: Sequence[str],
    *,
    n: int,
    key,
    temperature: float,
    top_p: float,
    inv_eta: float,
    guided: bool,
    grader: Grader = Grader(),
    problems_per_batch: int = 8,
    progress: Callable | None = None,
) -> Graded:
    """Draw ``n`` responses per prompt with ``sampler`` and grade them against ``golds``."""
    num = len(prompts)
    graded = Graded(*([[] for _ in range(num)] for _ in range(6)))
    # a continuous-batching sampler gets every prompt in one call (same rows as per chunk)
    for start, batch in generate_chunks(
        sampler,
        prompts,
        key=key,
        n=n,
        chunk=problems_per_batch,
        progress=progress,
        temperature=temperature,
        top_p=top_p,
        inv_eta=inv_eta,
        guided=guided,
    ):
        texts = response_texts(batch, tokenizer)
        for row, text in enumerate(texts):
            p = start + int(batch.prompt_index[row])
            answer = grader.extract(text)
            graded.responses[p].append(text)
            graded.answers[p].append(answer)
            graded.correct[p].append(grader.same(golds[p], answer))
            graded.kl_traj[p].append(float(batch.kl_traj[row]))
            graded.lengths[p].append(int(batch.lengths[row]))
            graded.response_ids[p].append(np.asarray(batch.tokens[row, : int(batch.lengths[row])]).tolist())
    return graded


def evaluate(
    sampler,
    tokenizer,
    task: Task,
    problems: Sequence[Problem],
    *,
    n: int = 8,
    key,
    temperature: float = 0.8,
    top_p: float = 0.9,
    inv_eta: float = 10.0,
    guided: bool = True,
    rounds: int = 100,
    seed: int = 47,
    problems_per_batch: int = 8,
    progress: Callable | None = None,
) -> dict[str, float]:
    """pass@1, maj1@n, pass@n, mean trajectory KL (and mean length), with standard errors, of
    the sampler's policy on ``problems`` of ``task``, prompted and graded by the task."""
    graded = sample_and_grade(
        sampler,
        tokenizer,
        task.encode_prompts(tokenizer, problems),
        [p.answer for p in problems],
        n=n,
        key=key,
        temperature=temperature,
        top_p=top_p,
        inv_eta=inv_eta,
        guided=guided,
        grader=task.grader,
        problems_per_batch=problems_per_batch,
        progress=progress,
    )
    return graded.metrics(task.grader, rounds=rounds, seed=seed)
