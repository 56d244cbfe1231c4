import types

import numpy as np
import pytest

from qsharp_jax.qsharp import evaluation
from qsharp_jax.tasks import grading


def test_pass_at_1_is_mean_accuracy_when_all_or_nothing():
    correct = [[True] * 8, [False] * 8, [True] * 8, [False] * 8]
    assert evaluation.pass_at_1(correct) == pytest.approx(0.5)


def test_pass_at_1_estimates_per_sample_accuracy():
    correct = [[True, False, False, False]] * 50  # 25% per sample
    assert evaluation.pass_at_1(correct, rounds=100, seed=0) == pytest.approx(0.25, abs=0.02)
    # Seeded: the same value every time.
    assert evaluation.pass_at_1(correct, seed=3) == evaluation.pass_at_1(correct, seed=3)


def test_pass_at_n():
    assert evaluation.pass_at_n([[False, True], [False, False]]) == 0.5
    assert evaluation.pass_at_n([]) == 0.0


def test_answer_classes_are_greedy_with_the_matcher():
    answers = ["0.5", "\\frac{1}{2}", "", "3", "1/2", "3.0"]
    classes = evaluation.answer_classes(answers, grading.symbolic_match)
    assert classes == [[0, 1, 4], [3, 5]]  # the empty answer never votes


def test_majority_vote_clear_winner():
    rng = np.random.default_rng(0)
    answers = ["7", "7", "8", "", "7", "9", "8", "7"]
    correct = [a == "8" for a in answers]
    assert evaluation.majority_vote_correct(answers, correct, grading.strict_match, rng) is False
    correct = [a == "7" for a in answers]
    assert evaluation.majority_vote_correct(answers, correct, grading.strict_match, rng) is True


def test_majority_vote_no_valid_answer_is_incorrect():
    rng = np.random.default_rng(0)
    assert evaluation.majority_vote_correct([""] * 8, [False] * 8, grading.strict_match, rng) is False


def test_majority_vote_ties_are_broken_uniformly_at_random():
    answers = ["1", "1", "2", "2", "", "", "", ""]
    correct = [True, True, False, False, False, False, False, False]
    rng = np.random.default_rng(123)
    votes = [evaluation.majority_vote_correct(answers, correct, grading.strict_match, rng) for _ in range(2000)]
    assert 0.45 < np.mean(votes) < 0.55
    # maj1@8 with a fixed seed is reproducible, and averages the tie over problems.
    many = [answers] * 400
    many_correct = [correct] * 400
    value = evaluation.maj_at_n(many, many_correct, "strict", seed=7)
    assert value == evaluation.maj_at_n(many, many_correct, "strict", seed=7)
    assert 0.4 < value < 0.6


def test_maj_at_n_uses_the_representative_correctness():
    # The class {"0.5", "1/2"} wins; its first member decides.
    answers = [["0.5", "1/2", "3"]]
    assert evaluation.maj_at_n(answers, [[True, True, False]], "symbolic") == 1.0
    assert evaluation.maj_at_n(answers, [[True, True, False]], "strict") in (0.0, 1.0)  # 3-way tie under strict


def test_mean_kl():
    assert evaluation.mean_kl([[1.0, 3.0], [2.0]]) == pytest.approx(2.0)
    assert evaluation.mean_kl([]) == 0.0


class FakeTokenizer:
    """Characters as ids; the "chat template" keeps only the problem's first character."""

    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return messages[0]["content"][len("Problem:\n\n")]

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


class FakeSampler:
    """Returns fixed responses: problem p answers \\boxed{p} on even samples, \\boxed{x} otherwise."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, *, key, n, temperature, top_p, inv_eta, guided):
        self.calls.append(dict(num=len(prompts), n=n, inv_eta=inv_eta, guided=guided))
        rows, index = [], []
        for p, prompt in enumerate(prompts):
            for s in range(n):
                rows.append("\\boxed{%s}" % (chr(prompt[0]) if s % 2 == 0 else "x"))
                index.append(p)
        width = max(len(r) for r in rows) + 1
        tokens = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = [ord(c) for c in r]
        lengths = np.array([len(r) + 1 for r in rows])  # + EOS (id 0)
        return types.SimpleNamespace(
            tokens=tokens, lengths=lengths, prompt_index=np.array(index), kl_traj=np.full(len(rows), 2.0)
        )


def test_evaluate_with_a_fake_sampler():
    import jax

    from qsharp_jax.tasks.base import Problem
    from qsharp_jax.tasks.word_problems import WordProblems

    sampler = FakeSampler()
    problems = [Problem(question=str(d), answer=str(d), solution="") for d in range(5)]
    problems[4] = Problem(question="4", answer="9", solution="")  # never right
    task = WordProblems("fake", "unused.jsonl", "unused.jsonl")  # prompts and grading only: no file is read
    metrics = evaluation.evaluate(
        sampler,
        FakeTokenizer(),
        task,
        problems,
        n=4,
        key=jax.random.key(0),
        inv_eta=10.0,
        guided=True,
        problems_per_batch=2,
    )
    assert [c["num"] for c in sampler.calls] == [2, 2, 1]
    assert metrics["pass@4"] == pytest.approx(0.8)
    assert metrics["kl"] == 2.0
    # Both metrics are seeded (seed 47): derive their exact values from the protocol (spec 4.5).
    # pass@1: per round, one uniform sample index per problem; even indices are the right ones.
    rng = np.random.default_rng(47)
    right = sum((rng.integers(0, 4, size=100) % 2 == 0).astype(float) for _ in range(4))
    rng.integers(0, 4, size=100)  # problem 4's draws: never right
    assert metrics["pass@1"] == pytest.approx(float(np.mean(right / 5)), abs=1e-12)
    # maj1@4: every problem is a 2-2 tie between its first answer's class and "x", broken by one
    # uniform draw per problem in order; drawing the first class is right for problems 0-3.
    rng = np.random.default_rng(47)
    wins = sum(int(rng.integers(2)) == 0 for _ in range(4))
    assert metrics["maj1@4"] == pytest.approx(wins / 5, abs=1e-12)
    assert 0 < wins < 4  # this seed breaks ties both ways, so the check is not vacuous


def test_standard_error_is_the_sample_sd_over_root_n():
    # values 1, 0, 1, 1: mean 0.75, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, sd 0.5
    assert evaluation.standard_error([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.5 / 2)
    assert np.isnan(evaluation.standard_error([1.0]))


def test_best_of_n_and_value_weighted_vote():
    rng = np.random.default_rng(0)
    answers, correct = ["7", "8", "8"], [True, False, False]
    # best of n: the highest value wins, whatever the majority says
    assert evaluation.best_of_n_correct(correct, [0.9, 0.3, 0.2], rng) is True
    assert evaluation.best_of_n_correct(correct, [0.1, 0.3, 0.2], rng) is False
    # weighted vote: class "7" weighs 0.9 against 0.3 + 0.3 = 0.6 for "8"; plain majority says "8"
    assert evaluation.weighted_vote_correct(answers, correct, [0.9, 0.3, 0.3], grading.strict_match, rng) is True
    assert evaluation.weighted_vote_correct(answers, correct, [0.5, 0.3, 0.3], grading.strict_match, rng) is False
    assert evaluation.majority_vote_correct(answers, correct, grading.strict_match, rng) is False
    # empty answers never vote, even with a large weight
    assert evaluation.weighted_vote_correct(["", "8"], [True, False], [5.0, 0.1], grading.strict_match, rng) is False


def test_graded_metrics_with_standard_errors_and_reward_model():
    g = evaluation.Graded(
        responses=[["a", "b"], ["c", "d"], ["e", "f"]],
        answers=[["1", "2"], ["3", "3"], ["", "5"]],
        correct=[[True, False], [True, True], [False, False]],
        kl_traj=[[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]],
        lengths=[[4, 6], [5, 5], [3, 7]],
        response_ids=[[[1], [2]], [[3], [3]], [[4], [5]]],
        values=[[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]],
    )
    m = g.metrics(grading.Grader(matcher="strict"), rounds=1000, seed=0)
    accuracy = [0.5, 1.0, 0.0]
    assert m["pass@1_se"] == pytest.approx(np.std(accuracy, ddof=1) / np.sqrt(3))
    assert m["pass@2"] == pytest.approx(2 / 3)
    assert m["kl"] == pytest.approx(2.0) and m["kl_se"] == pytest.approx(0.0)
    assert m["mean_length"] == pytest.approx(5.0)
    # best of 2 by value: problem 0 picks "2" (wrong), problem 1 a tie of two right answers,
    # problem 2 picks "" (wrong): 1/3. Weighted vote: problem 0 "2" (0.8 > 0.2) wrong,
    # problem 1 right, problem 2 only "5" votes, wrong: 1/3.
    assert m["rm_best_of_2"] == pytest.approx(1 / 3)
    assert m["rm_maj1@2"] == pytest.approx(1 / 3)
    assert m["rm_best_of_2_se"] == pytest.approx(np.std([0, 1, 0], ddof=1) / np.sqrt(3))


def test_paired_difference_by_hand():
    a = [[True, True], [False, True], [False, False]]  # per-problem accuracies 1, 1/2, 0
    b = [[True, False], [False, False], [False, False]]  # 1/2, 0, 0
    mean, se = evaluation.paired_difference(a, b)
    # differences 1/2, 1/2, 0: mean 1/3, sample std sqrt(((1/6)^2 * 2 + (1/3)^2) / 2) = sqrt(1/12)
    assert mean == pytest.approx(1 / 3, abs=1e-15)
    assert se == pytest.approx(np.sqrt(1 / 12) / np.sqrt(3), abs=1e-15)
    with pytest.raises(ValueError, match="same problems"):
        evaluation.paired_difference(a, b[:2])
