"""The generated arithmetic task: deterministic, correct answers, disjoint splits, clear errors."""

import pytest

from qsharp_jax.tasks.arithmetic import KINDS, Arithmetic
from qsharp_jax.tasks.base import Problem, Task


def _operands(p: Problem) -> tuple[int, str, int, int]:
    a, kind, b, _, answer = p.solution.split()
    return int(a), kind, int(b), int(answer)


def test_answers_are_the_arithmetic_of_the_question():
    task = Arithmetic(num_train=60, num_test=30, kinds=KINDS, max_operand=30, seed=3)
    seen = set()
    for p in task.train_problems() + task.eval_problems("test") + task.eval_problems("validation"):
        a, kind, b, answer = _operands(p)
        seen.add(kind)
        assert str(a) in p.question and str(b) in p.question
        assert answer == {"mul": a * b, "add": a + b, "sub": a - b}[kind] and str(answer) == p.answer
        assert answer >= 0
        if kind == "mul":
            assert 2 <= a <= 9 and 2 <= b <= 9
        else:
            assert min(a, b) >= 2 and max(a, b) <= 30
    assert seen == set(KINDS)


def test_deterministic_by_seed_and_splits_are_disjoint():
    one, two = Arithmetic(seed=5, num_train=50, num_test=20), Arithmetic(seed=5, num_train=50, num_test=20)
    assert one.train_problems() == two.train_problems() and one.eval_problems() == two.eval_problems()
    assert Arithmetic(seed=6, num_train=50, num_test=20).train_problems() != one.train_problems()
    train = {p.question for p in one.train_problems()}
    validation = {p.question for p in one.eval_problems("validation")}
    test = {p.question for p in one.eval_problems("test")}
    assert len(train) + len(validation) == 50 and len(test) == 20
    assert not (train & test) and not (validation & test) and not (train & validation)


def test_reward_reads_the_boxed_or_last_number():
    task = Arithmetic(num_train=4, num_test=2)
    p = task.eval_problems()[0]
    assert isinstance(task, Task)
    assert task.reward(f"so the total is {p.answer}.", p) == 1.0
    assert task.reward(f"\\boxed{{{p.answer}}} and then 3", p) == 1.0  # a boxed answer wins
    assert task.reward(f"{p.answer} ... no, {int(p.answer) + 1}", p) == 0.0
    assert "\\boxed{}" in task.prompt_text(p)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kinds=("div",)), "each entry must be one of"),
        (dict(kinds=()), "each entry must be one of"),
        (dict(max_operand=2), "max_operand=2: must be >= 3"),
        (dict(num_train=0), "num_train and arithmetic.num_test must be >= 1"),
        (dict(kinds=("mul",), num_train=100, num_test=10_000), "distinct arithmetic problems"),
    ],
)
def test_impossible_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Arithmetic(**kwargs)
