"""Math word problems: reading the local JSONL files, gold answers, prompts, splits.

Files hold one ``{"question": str, "answer": str}`` object per line (see
``../shared/data/README.md``). The gold final answer is read from the reference solution:

* GSM8K: the number after the last ``####`` line, commas removed;
* MATH-500: the text after the last ``The answer is:``, else the last ``\\boxed{}``.

Prompts are built by the task (:meth:`qsharp_jax.tasks.base.Task.encode_prompts`, spec 4.2).
The train/validation split is a seeded hash of the problem text, so a problem keeps its
split whatever the file order or the other problems.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence

from qsharp_jax.tasks.base import Problem
from qsharp_jax.tasks.grading import last_boxed

ANSWER_FORMATS = ("auto", "gsm8k", "math")
SPLITS = ("train", "validation")


class DataFormatError(ValueError):
    """A data file line that is not a usable problem record."""

    def __init__(self, path: str, line_number: int, problem: str):
        super().__init__(f"{path}:{line_number}: {problem}")
        self.path, self.line_number = path, line_number


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line, one at a time."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist (data.dir / the file name in the config?).")
    with open(path, encoding="utf-8") as f:
        yield from parse_jsonl(f, path)


def parse_jsonl(lines: Iterable[str], path: str) -> Iterator[tuple[int, dict]]:
    """:func:`read_jsonl` of lines already read (``path`` names them in errors)."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, line_number, f"bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, line_number, f"expected a JSON object, got {type(record).__name__}")
        yield line_number, record


def final_answer(solution: str, answer_format: str = "auto") -> str:
    """The gold final answer inside a reference solution ("" if it has none)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not one of {ANSWER_FORMATS}.")
    if answer_format in ("auto", "gsm8k") and "####" in solution:
        return solution.rsplit("####", 1)[1].strip().replace(",", "")
    if answer_format in ("auto", "math"):
        if "The answer is:" in solution:
            return solution.rsplit("The answer is:", 1)[1].strip()
        return last_boxed(solution).strip()
    return ""


def load_problems(path: str | os.PathLike, answer_format: str = "auto", limit: int | None = None) -> list[Problem]:
    """Problems of one JSONL file, in file order (the first ``limit`` if given)."""
    problems = []
    path = os.fspath(path)
    for line_number, record in read_jsonl(path):
        if limit is not None and len(problems) >= limit:
            break
        for key in ("question", "answer"):
            if key not in record:
                raise DataFormatError(path, line_number, f"missing key {key!r} (keys present: {sorted(record)})")
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataFormatError(path, line_number, f"{key!r} must be a non-empty string")
        gold = final_answer(record["answer"], answer_format)
        if not gold:
            raise DataFormatError(
                path,
                line_number,
                f"no final answer in 'answer' (answer_format={answer_format!r}: expected a "
                "'#### <number>' line, 'The answer is: ...' or a \\boxed{...})",
            )
        problems.append(Problem(record["question"], gold, record["answer"], f"{path}:{line_number}"))
    return problems


# ---- splits -----------------------------------------------------------------------


def split_of(question: str, seed: int = 47, validation_fraction: float = 0.1) -> str:
    """ "train" or "validation" for one problem, from a seeded SHA-256 of its text
    (Python's ``hash`` is salted per process, so it cannot give a stable split)."""
    digest = hashlib.sha256(f"{seed}\0{question}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < validation_fraction else "train"


def split_problems(
    problems: Sequence[Problem],
    seed: int = 47,
    validation_fraction: float = 0.1,
) -> dict[str, list[Problem]]:
    """``{"train": [...], "validation": [...]}``, each in input order."""
    out = {name: [] for name in SPLITS}
    for p in problems:
        out[split_of(p.question, seed, validation_fraction)].append(p)
    return out


# ---- tfds (array_record) view of the same files -------------------------------------------


def tfds_builder(name: str, split_files: dict[str, str], data_dir: str, answer_format: str = "auto"):
    """A tfds ``GeneratorBasedBuilder`` over local JSONL files, writing ``array_record`` (no
    TensorFlow or internet needed). ``name`` is CamelCase (tfds derives the dataset
    directory from it), ``split_files`` maps split names to JSONL paths. Call
    ``download_and_prepare()`` once, then ``as_data_source()`` gives random-access sources
    for grain. Records hold question, answer (gold final answer) and solution."""
    import types

    import tensorflow_datasets as tfds  # heavy import: only when a tfds view is asked for

    def body(ns):
        ns["VERSION"] = tfds.core.Version("1.0.0")

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs would look for metadata files
            # next to this module.
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"question": text, "answer": text, "solution": text})
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(path) for split, path in split_files.items()}

        def _generate_examples(self, path):
            for p in load_problems(path, answer_format):  # same validation as the plain reader
                yield (
                    int(p.source.rsplit(":", 1)[1]),
                    {"question": p.question, "answer": p.answer, "solution": p.solution},
                )

        ns.update(_info=_info, _split_generators=_split_generators, _generate_examples=_generate_examples)

    cls = types.new_class(name, (tfds.core.GeneratorBasedBuilder,), {"skip_registration": True}, body)
    return cls(data_dir=data_dir, file_format="array_record")


def problems_from_records(records) -> list[Problem]:
    """Problems from tfds records (bytes or str fields), e.g. a data source's items."""

    def text(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    return [Problem(text(r["question"]), text(r["answer"]), text(r["solution"])) for r in records]
