import threading

import pytest

from qsharp_jax.tasks import grading


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("x \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("no box here", ""),
        ("", ""),
        (None, ""),
        ("\\boxed{12", ""),  # cut off inside the box: no answer
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert grading.last_boxed(text) == expected


@pytest.mark.parametrize(
    "gold,pred,expected",
    [
        ("72", "72", True),
        ("\\frac{1}{2}", "0.5", True),  # math-verify compares values
        ("1000", "1,000", True),  # math-verify reads the thousands separator
        ("1,000", "1000", True),
        ("72", "72.0", True),
        ("72", "73", False),
        ("3", "x=3", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", True),
        ("5", "", False),
        ("", "", False),
        ("5", None, False),
    ],
)
def test_symbolic_matcher(gold, pred, expected):
    assert grading.symbolic_match(gold, pred) is expected


@pytest.mark.parametrize(
    "gold,pred,expected",
    [
        ("72", "72", True),
        ("\\frac{1}{2}", "0.5", False),
        ("1000", "1,000", False),
        ("", "", False),
        ("1", None, False),
    ],
)
def test_strict_matcher(gold, pred, expected):
    assert grading.strict_match(gold, pred) is expected


def test_symbolic_matcher_off_main_thread():
    # math-verify's SIGALRM timeout is main-thread only: we must not crash elsewhere.
    result = {}
    grading._math_verify_match.cache_clear()
    t = threading.Thread(target=lambda: result.setdefault("v", grading.symbolic_match("\\frac{1}{4}", "0.25")))
    t.start()
    t.join()
    assert result["v"] is True


def test_math_verify_errors_are_no_match(monkeypatch):
    import math_verify

    def boom(*a, **k):
        raise TimeoutError("timed out")

    grading._math_verify_match.cache_clear()
    monkeypatch.setattr(math_verify, "verify", boom)
    assert grading.symbolic_match("2", "3") is False
    grading._math_verify_match.cache_clear()


def test_is_correct_and_unknown_matcher():
    assert grading.is_correct("... so the answer is \\boxed{\\dfrac{1}{2}}", "0.5")
    assert not grading.is_correct("the answer is 0.5", "0.5")
    with pytest.raises(ValueError, match="unknown answer matcher"):
        grading.get_matcher("fuzzy")


def test_extraction_falls_back_to_the_last_number_only_when_asked():
    from qsharp_jax.tasks import grading

    text = "She pays 3 * 4 = 12 dollars, so the answer is 1,250 bolts."
    assert grading.extract_answer(text, "boxed") == ""
    assert grading.extract_answer(text, "boxed_or_last_number") == "1250"
    boxed = "Total 7, so \\boxed{12}. Check: 12 - 5 = 7"
    assert grading.extract_answer(boxed, "boxed_or_last_number") == "12"  # a boxed answer wins
    assert grading.extract_answer("no digits here", "boxed_or_last_number") == ""
    assert grading.is_correct(text, "1250", extraction="boxed_or_last_number")
    assert not grading.is_correct(text, "1250")
    with pytest.raises(ValueError, match="unknown answer extraction 'last'"):
        grading.extract_answer(text, "last")
