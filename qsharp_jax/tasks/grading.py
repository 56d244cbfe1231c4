"""Final-answer extraction and answer matching (spec 4.4).

* :func:`last_boxed` returns the content of the last ``\\boxed{...}`` in a text, with
  braces matched by depth counting ("" when there is none).
* Matchers compare a gold answer with a predicted one: ``strict`` is string equality,
  ``symbolic`` (the authors' default) is string equality or else math-verify's
  ``verify(parse(gold), parse(pred))`` with the gold first.

Training labels and evaluation use the same functions, so a reward of 1 during data
collection means exactly what "correct" means in the reported metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading

MATCHERS = ("symbolic", "strict")
# "boxed" is the authors' rule. "boxed_or_last_number" falls back to the last number of the
# response when nothing is boxed: small models (e.g. the SmolLM2-135M default) seldom box.
EXTRACTIONS = ("boxed", "boxed_or_last_number")
_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_boxed(text: str | None) -> str:
    """Content of the last ``\\boxed{`` in ``text``; "" if none or if it is never closed
    (a generation cut off inside its answer has no answer)."""
    if not text:
        return ""
    start = text.rfind(_BOXED)
    if start < 0:
        return ""
    depth = 1
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return ""


def last_number(text: str | None) -> str:
    """The last number in ``text`` with thousands separators removed ("" if none)."""
    found = _NUMBER.findall(text or "")
    return found[-1].replace(",", "") if found else ""


def extract_answer(text: str | None, extraction: str = "boxed") -> str:
    """The final answer of a generated response by the rule ``extraction`` (see EXTRACTIONS)."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"unknown answer extraction {extraction!r}; choose one of {EXTRACTIONS}.")
    answer = last_boxed(text)
    if not answer and extraction == "boxed_or_last_number":
        answer = last_number(text)
    return answer


def strict_match(gold: str | None, pred: str | None) -> bool:
    return bool(gold) and bool(pred) and gold == pred


@functools.lru_cache(maxsize=65536)
def _math_verify_match(gold: str, pred: str) -> bool:
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere we
    # run without its timeout rather than crash.
    from math_verify import parse, verify  # imported lazily: sympy import is slow

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse("$" + gold + "$", parsing_timeout=timeout)
        pred_parsed = parse("$" + pred + "$", parsing_timeout=timeout)
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:
        return False


def symbolic_match(gold: str | None, pred: str | None) -> bool:
    if not gold or not pred:
        return False
    gold, pred = gold.strip(), pred.strip()
    if gold == pred:
        return True
    return _math_verify_match(gold, pred)


def get_matcher(name: str):
    """The matcher function ``(gold, pred) -> bool`` called ``name``."""
    if name == "symbolic":
        return symbolic_match
    if name == "strict":
        return strict_match
    raise ValueError(f"unknown answer matcher {name!r}; choose one of {MATCHERS}.")


def is_correct(response_text: str, gold: str, matcher: str = "symbolic", extraction: str = "boxed") -> bool:
    """Whether the extracted final answer of a generated response matches the gold answer."""
    return get_matcher(matcher)(gold, extract_answer(response_text, extraction))


@dataclasses.dataclass(frozen=True)
class Grader:
    """A task's answer rule: how the final answer is read off a response and compared."""

    matcher: str = "symbolic"
    extraction: str = "boxed"

    def __post_init__(self):
        get_matcher(self.matcher)  # unknown names fail here, not mid-run
        if self.extraction not in EXTRACTIONS:
            raise ValueError(f"unknown answer extraction {self.extraction!r}; choose one of {EXTRACTIONS}.")

    def extract(self, response_text: str | None) -> str:
        return extract_answer(response_text, self.extraction)

    def same(self, gold: str | None, answer: str | None) -> bool:
        return get_matcher(self.matcher)(gold, answer)

    def reward(self, response_text: str | None, gold: str) -> float:
        """1.0 when the response's final answer matches ``gold``, else 0.0 (sparse reward)."""
        return float(self.same(gold, self.extract(response_text)))
