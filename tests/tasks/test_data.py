import json
import os

import pytest

from qsharp_jax.tasks import data

from conftest import ROOT

SHARED = os.path.join(ROOT, "..", "shared", "data")


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_gsm8k_and_math_answers():
    assert data.final_answer("a\nb = <<1+1=2>>2\n#### 1,234") == "1234"
    assert data.final_answer("so $\\boxed{\\frac{1}{2}}$.The answer is: \\frac{1}{2}") == "\\frac{1}{2}"
    assert data.final_answer("so $\\boxed{\\frac{1}{2}}$.", "math") == "\\frac{1}{2}"
    assert data.final_answer("#### 5", "math") == ""
    with pytest.raises(ValueError):
        data.final_answer("#### 5", "csv")


def test_load_problems(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}),
            "",
            json.dumps({"question": "2+2?", "answer": "#### 4"}),
        ],
    )
    problems = data.load_problems(path)
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "4")]
    assert problems[1].source.endswith(":3")
    assert len(data.load_problems(path, limit=1)) == 1


@pytest.mark.parametrize(
    "bad_line,message",
    [
        ('{"question": "q", "answer": "#### 1"', r"d\.jsonl:2: bad JSON"),
        ('{"answer": "#### 1"}', r"d\.jsonl:2: missing key 'question'"),
        ('{"question": "q"}', r"d\.jsonl:2: missing key 'answer'"),
        ('["q", "a"]', r"d\.jsonl:2: expected a JSON object"),
        ('{"question": "", "answer": "#### 1"}', r"d\.jsonl:2: 'question' must be a non-empty string"),
        ('{"question": "q", "answer": "no final answer"}', r"d\.jsonl:2: no final answer"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, [json.dumps({"question": "ok", "answer": "#### 1"}), bad_line])
    with pytest.raises(data.DataFormatError, match=message) as info:
        data.load_problems(path)
    assert info.value.line_number == 2


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_problems(str(tmp_path / "nope.jsonl"))


def test_split_is_stable_seeded_and_about_ten_percent():
    questions = [f"problem number {i}" for i in range(2000)]
    splits = [data.split_of(q, seed=47) for q in questions]
    assert splits == [data.split_of(q, seed=47) for q in questions]  # deterministic
    assert 0.07 < splits.count("validation") / len(splits) < 0.13
    assert splits != [data.split_of(q, seed=48) for q in questions]  # the seed matters
    # A problem's split does not depend on which other problems are present.
    problems = [data.Problem(q, "1", "") for q in questions]
    full = data.split_problems(problems)
    part = data.split_problems(problems[::3])
    assert set(p.question for p in part["validation"]) <= set(p.question for p in full["validation"])


def test_split_value_is_pinned():
    # A changed hash would silently move problems between train and validation.
    assert [data.split_of(f"q{i}", 47) for i in range(20)].count("validation") == 2


class FakeChatTokenizer:
    chat_template = "fake"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "<s>user:" + messages[0]["content"] + "|assistant:"

    def __call__(self, text, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


def _task():
    from qsharp_jax.tasks.word_problems import WordProblems

    return WordProblems("gsm8k", "unused.jsonl", "unused.jsonl")  # prompts only: no file is read


def test_prompt_template_and_encoding():
    from qsharp_jax.tasks.base import Problem

    task, problem = _task(), Problem("What is 1+1?", "2")
    assert task.prompt_text(problem) == "Problem:\n\nWhat is 1+1? Write your answer inside \\boxed{}.\n\nSolution:"
    tok = FakeChatTokenizer()
    (ids,) = task.encode_prompts(tok, [problem])
    ((messages, tokenize, gen),) = tok.calls
    assert messages == [{"role": "user", "content": task.prompt_text(problem)}]
    assert tokenize is False and gen is True
    assert "".join(map(chr, ids)) == "<s>user:" + task.prompt_text(problem) + "|assistant:"


def test_prompt_needs_chat_template():
    from qsharp_jax.tasks.base import Problem

    tok = FakeChatTokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        _task().encode_prompts(tok, [Problem("q", "1")])


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "gsm8k", "test.jsonl")), reason="shared data absent")
def test_shared_files_parse():
    test = data.load_problems(os.path.join(SHARED, "gsm8k", "test.jsonl"))
    assert len(test) == 1319 and all(p.answer for p in test)
    math500 = data.load_problems(os.path.join(SHARED, "math500", "test.jsonl"), "math")
    assert len(math500) == 500 and math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_tfds_builder_writes_array_record_and_reads_back(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": f"q{i}?", "answer": f"work\n#### {i},000"}) for i in range(5)])
    builder = data.tfds_builder("TinyMath", {"train": path}, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    assert list((tmp_path / "tfds" / "tiny_math" / "1.0.0").glob("*.array_record*"))
    source = builder.as_data_source()["train"]
    problems = data.problems_from_records(source[i] for i in range(len(source)))
    assert sorted((p.question, p.answer) for p in problems) == [(f"q{i}?", f"{i}000") for i in range(5)]


def test_tfds_builder_reports_malformed_lines(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": "q", "answer": "#### 1"}), "{not json"])
    builder = data.tfds_builder("BadMath", {"train": path}, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(data.DataFormatError, match=r"d\.jsonl:2: bad JSON"):
        builder.download_and_prepare()
