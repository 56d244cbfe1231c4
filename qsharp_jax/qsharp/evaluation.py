"""Evaluation metrics of spec 4.5 and a driver that samples and grades a problem set.

The metric functions take plain Python / numpy data (per-problem lists of n samples), so
they are testable without a model:

* pass@1: mean over ``rounds`` simulations of "one random sample per problem is correct";
* maj1@n: majority vote over the extracted answers, classes formed greedily with the
  answer matcher, empty answers ignored, ties broken uniformly at random;
* pass@n: any of the n samples is correct;
* KL: mean trajectory KL(pi || pi_ref) over all samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from qsharp_jax.tasks import data, grading

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


def maj_at_n(
    answers: Sequence[Sequence[str]],
    correct: Sequence[Sequence[bool]],
    matcher: Matcher | str = "symbolic",
    seed: int = 47,
) -> float:
    if not len(answers):
        return 0.0
    if isinstance(matcher, str):
        matcher = grading.get_matcher(matcher)
    rng = np.random.default_rng(seed)
    return float(np.mean([majority_vote_correct(a, c, matcher, rng) for a, c in zip(answers, correct)]))


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

    def metrics(self, matcher: str = "symbolic", rounds: int = 100, seed: int = 47) -> dict[str, float]:
        n = max((len(c) for c in self.correct), default=0)
        return {
            "pass@1": pass_at_1(self.correct, rounds=rounds, seed=seed),
            f"maj1@{n}": maj_at_n(self.answers, self.correct, matcher, seed=seed),
            f"pass@{n}": pass_at_n(self.correct),
            "kl": mean_kl(self.kl_traj),
            "mean_length": float(np.mean([n_tok for row in self.lengths for n_tok in row])) if n else 0.0,
            "num_problems": float(len(self.correct)),
        }


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
    matcher: str = "symbolic",
    extraction: str = "boxed",
    problems_per_batch: int = 8,
    progress: Callable | None = None,
) -> Graded:
    """Draw ``n`` responses per prompt with ``sampler`` and grade them against ``golds``."""
    match = grading.get_matcher(matcher)
    num = len(prompts)
    graded = Graded(*([[] for _ in range(num)] for _ in range(5)))
    chunks = range(0, num, problems_per_batch)
    for chunk_index, start in enumerate(progress(chunks) if progress else chunks):
        chunk = list(prompts[start : start + problems_per_batch])
        batch = sampler.generate(
            chunk,
            key=jax.random.fold_in(key, chunk_index),
            n=n,
            temperature=temperature,
            top_p=top_p,
            inv_eta=inv_eta,
            guided=guided,
        )
        texts = response_texts(batch, tokenizer)
        for row, text in enumerate(texts):
            p = start + int(batch.prompt_index[row])
            answer = grading.extract_answer(text, extraction)
            graded.responses[p].append(text)
            graded.answers[p].append(answer)
            graded.correct[p].append(match(golds[p], answer))
            graded.kl_traj[p].append(float(batch.kl_traj[row]))
            graded.lengths[p].append(int(batch.lengths[row]))
    return graded


def evaluate(
    sampler,
    tokenizer,
    problems: Sequence,
    *,
    n: int = 8,
    key,
    temperature: float = 0.8,
    top_p: float = 0.9,
    inv_eta: float = 10.0,
    guided: bool = True,
    matcher: str = "symbolic",
    extraction: str = "boxed",
    rounds: int = 100,
    seed: int = 47,
    problems_per_batch: int = 8,
    progress: Callable | None = None,
) -> dict[str, float]:
    """pass@1, maj1@n, pass@n, mean trajectory KL (and mean length) of the sampler's policy on
    ``problems`` (:class:`qsharp_jax.tasks.data.Problem`), prompted per spec 4.2."""
    graded = sample_and_grade(
        sampler,
        tokenizer,
        data.encode_prompts(tokenizer, problems),
        [p.answer for p in problems],
        n=n,
        key=key,
        temperature=temperature,
        top_p=top_p,
        inv_eta=inv_eta,
        guided=guided,
        matcher=matcher,
        extraction=extraction,
        problems_per_batch=problems_per_batch,
        progress=progress,
    )
    return graded.metrics(matcher=matcher, rounds=rounds, seed=seed)
