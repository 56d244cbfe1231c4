"""GSM8K and MATH-500 as tasks: problems from local JSONL files (``../shared/data``), the
training pool split 90/10 into train / validation by a seeded hash of the problem text
(spec 4.1), the authors' prompt (spec 4.2) and answer rule (spec 4.4)."""

from __future__ import annotations

import os

from qsharp_jax.tasks import data
from qsharp_jax.tasks.base import EVAL_SPLITS, Problem, Task
from qsharp_jax.tasks.grading import Grader


class WordProblems(Task):
    """Math word problems read from a train file and a test file."""

    def __init__(
        self,
        name: str,
        train_file: str,
        eval_file: str,
        *,
        answer_format: str = "auto",
        grader: Grader = Grader(),
        split_seed: int = 47,
        validation_fraction: float = 0.1,
    ):
        self.name, self.train_file, self.eval_file = name, os.fspath(train_file), os.fspath(eval_file)
        self.answer_format, self.grader = answer_format, grader
        self.split_seed, self.validation_fraction = split_seed, validation_fraction
        self._pool: dict[str, list[Problem]] | None = None

    def _split(self) -> dict[str, list[Problem]]:
        if self._pool is None:
            pool = data.load_problems(self.train_file, self.answer_format)
            self._pool = data.split_problems(pool, self.split_seed, self.validation_fraction)
        return self._pool

    def train_problems(self) -> list[Problem]:
        return self._split()["train"]

    def eval_problems(self, split: str = "test") -> list[Problem]:
        if split not in EVAL_SPLITS:
            raise ValueError(f"eval split {split!r}: choose one of {EVAL_SPLITS}.")
        if split == "validation":
            return self._split()["validation"]
        return data.load_problems(self.eval_file, self.answer_format)
