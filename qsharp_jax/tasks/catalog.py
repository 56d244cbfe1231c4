"""The tasks a config can name (``task = "gsm8k" | "math" | "arithmetic"``), built from its
sections; relative data paths are relative to the repository root."""

from __future__ import annotations

import os

from qsharp_jax.tasks.arithmetic import Arithmetic
from qsharp_jax.tasks.base import Task
from qsharp_jax.tasks.grading import Grader
from qsharp_jax.tasks.word_problems import WordProblems

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILE_TASKS = ("gsm8k", "math")
TASKS = FILE_TASKS + ("arithmetic",)


def data_path(cfg, name: str) -> str:
    """A data file path: relative ``data.dir`` values are relative to the repository root."""
    root = cfg.data.dir if os.path.isabs(cfg.data.dir) else os.path.join(REPO_ROOT, cfg.data.dir)
    return os.path.normpath(os.path.join(root, name))


def from_config(cfg) -> Task:
    """The task of a job config (its ``task`` name and ``data`` / ``arithmetic`` sections)."""
    d = cfg.data
    grader = Grader(matcher=d.matcher, extraction=d.answer_extraction)
    if cfg.task in FILE_TASKS:
        return WordProblems(
            cfg.task,
            data_path(cfg, d.train_file),
            data_path(cfg, d.eval_file),
            answer_format=d.answer_format,
            grader=grader,
            split_seed=d.split_seed,
            validation_fraction=d.validation_fraction,
        )
    if cfg.task == "arithmetic":
        a = cfg.arithmetic
        return Arithmetic(
            num_train=a.num_train,
            num_test=a.num_test,
            kinds=tuple(a.kinds),
            max_operand=a.max_operand,
            seed=a.seed,
            validation_fraction=d.validation_fraction,
        )
    raise ValueError(f"task={cfg.task!r}: choose one of {TASKS}.")
