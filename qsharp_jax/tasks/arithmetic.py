"""A procedurally generated arithmetic word-problem task, sized so that a small reference
model (SmolLM2-135M-Instruct) solves part of it: the task on which Q#'s effect can be
measured on a CPU within minutes.

Each problem is one short story around one operation: a product of two one-digit numbers
(``mul``), a sum (``add``) or a difference (``sub``) of two numbers up to ``max_operand``.
``kinds`` is the difficulty knob: which operations, in which proportion (repeat a kind to
weight it). Problems are drawn from a seeded generator; the test problems are drawn with
another seed and never repeat a training question. Answers are whole numbers, graded by
the last ``\\boxed{}`` or else the last number of the response (small models seldom box).
"""

from __future__ import annotations

import numpy as np

from qsharp_jax.tasks.base import EVAL_SPLITS, Problem, Task
from qsharp_jax.tasks.grading import Grader

KINDS = ("mul", "add", "sub")
NAMES = ("Tom", "Ana", "Sam", "Lea", "Max", "Ivy", "Ben", "Mia")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")
TEMPLATES = {
    "mul": "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?",
    "add": "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
    "sub": "{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?",
}


class Arithmetic(Task):
    name = "arithmetic"

    def __init__(
        self,
        *,
        num_train: int = 256,
        num_test: int = 128,
        kinds: tuple = ("mul",),
        max_operand: int = 20,
        seed: int = 47,
        validation_fraction: float = 0.1,
    ):
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise ValueError(f"arithmetic.kinds={tuple(kinds)!r}: each entry must be one of {KINDS}.")
        if max_operand < 3:
            raise ValueError(f"arithmetic.max_operand={max_operand}: must be >= 3.")
        if num_train < 1 or num_test < 1:
            raise ValueError("arithmetic.num_train and arithmetic.num_test must be >= 1.")
        self.kinds, self.max_operand, self.seed = tuple(kinds), int(max_operand), int(seed)
        self.grader = Grader(matcher="strict", extraction="boxed_or_last_number")
        pool = self._draw(num_train, self.seed, exclude=set())
        held = max(1, round(validation_fraction * len(pool)))
        self._train, self._validation = pool[held:], pool[:held]
        self._test = self._draw(num_test, self.seed + 1, exclude={p.question for p in pool})

    def capacity(self) -> int:
        """How many distinct questions the generator can write."""
        m = self.max_operand - 1  # operands 2..max_operand
        per_kind = {"mul": 8 * 8, "add": m * m, "sub": m * (m + 1) // 2}
        return len(NAMES) * len(ITEMS) * sum(per_kind[k] for k in set(self.kinds))

    def _draw(self, count: int, seed: int, exclude: set) -> list[Problem]:
        if count + len(exclude) > self.capacity():
            raise ValueError(
                f"only {self.capacity()} distinct arithmetic problems of kinds {self.kinds} with max_operand="
                f"{self.max_operand} exist, {count + len(exclude)} asked: lower num_train/num_test or raise "
                "max_operand or add kinds."
            )
        rng = np.random.default_rng(seed)
        out, seen = [], set(exclude)
        for _ in range(100 * count):
            if len(out) == count:
                break
            kind = self.kinds[int(rng.integers(len(self.kinds)))]
            if kind == "mul":  # one-digit factors: products a small model may know
                a, b = (int(x) for x in rng.integers(2, 10, size=2))
                answer = a * b
            else:
                a, b = (int(x) for x in rng.integers(2, self.max_operand + 1, size=2))
                if kind == "sub" and a < b:
                    a, b = b, a
                answer = a + b if kind == "add" else a - b
            question = TEMPLATES[kind].format(
                name=NAMES[int(rng.integers(len(NAMES)))], item=ITEMS[int(rng.integers(len(ITEMS)))], a=a, b=b
            )
            if question not in seen:
                seen.add(question)
                out.append(
                    Problem(question, str(answer), f"{a} {kind} {b} = {answer}", f"arithmetic:{seed}:{len(out)}")
                )
        if len(out) < count:
            raise ValueError(
                f"only {len(out)} distinct arithmetic problems of kinds {self.kinds} with max_operand="
                f"{self.max_operand} exist for this seed, {count} asked: lower num_train/num_test or raise max_operand."
            )
        return out

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self, split: str = "test") -> list[Problem]:
        if split not in EVAL_SPLITS:
            raise ValueError(f"eval split {split!r}: choose one of {EVAL_SPLITS}.")
        return list(self._test if split == "test" else self._validation)
