"""The task interface: what the Q# loop needs of a task.

A task supplies problems with a checkable final answer, turns each into a prompt, and grades
a response (a :class:`~qsharp_jax.tasks.grading.Grader`: extraction rule + matcher). The
loop never looks inside a task: GSM8K, MATH-500 (:mod:`qsharp_jax.tasks.word_problems`) and
the procedurally generated arithmetic task (:mod:`qsharp_jax.tasks.arithmetic`) implement it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence

from qsharp_jax.tasks.grading import Grader

PROMPT_TEMPLATE = "Problem:\n\n{question} Write your answer inside \\boxed{{}}.\n\nSolution:"  # spec 4.2
EVAL_SPLITS = ("test", "validation")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # gold final answer, compared with the answer extracted from a response
    solution: str = ""  # a reference solution, when the source has one
    source: str = ""  # "path:line" or generator id, for error messages and bookkeeping


class Task(abc.ABC):
    """Problems, prompts and a reward."""

    name: str = ""
    grader: Grader = Grader()

    @abc.abstractmethod
    def train_problems(self) -> list[Problem]:
        """Problems the guide is trained on (the collection pool)."""

    @abc.abstractmethod
    def eval_problems(self, split: str = "test") -> list[Problem]:
        """Held-out problems: ``test``, or ``validation`` (a slice held out of the training pool)."""

    def prompt_text(self, problem: Problem) -> str:
        """The user turn for ``problem`` (the authors' zero-shot template by default)."""
        return PROMPT_TEMPLATE.format(question=problem.question)

    def encode_prompts(self, tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
        """Chat-formatted prompt ids (one user turn + generation prompt), spec 4.2."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; the Q# prompts need an Instruct model's tokenizer.")
        out = []
        for p in problems:
            messages = [{"role": "user", "content": self.prompt_text(p)}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already holds BOS / role markers: adding special tokens would double them.
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        return out

    def reward(self, response_text: str, problem: Problem) -> float:
        return self.grader.reward(response_text, problem.answer)
