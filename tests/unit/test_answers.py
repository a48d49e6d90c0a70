"""Answer checking by hand."""

from __future__ import annotations

import pytest

from logitflow.evaluation.answers import answer_found, success_rate


@pytest.mark.parametrize(
    ("text", "answer", "found"),
    [
        ("The answer is 42.", "42", True),
        ("The answer is 420.", "42", False),
        ("The answer is 4.2.", "2", False),
        ("The answer is -42.", "42", False),
        ("The answer is -42.", "-42", True),
        ("42", "42", True),
        ("The answer is 3.5 km", "3.5", True),
        ("The answer is 3.55", "3.5", False),
        ("Reversed: OLLEH!", "olleh", True),
        ("hello", "olleh", False),
    ],
)
def test_answer_found(text: str, answer: str, found: bool) -> None:
    assert answer_found(text, answer) is found


def test_success_rate() -> None:
    assert success_rate(["The answer is 7.", "It is 8", "no idea"], ["7", "8", "9"]) == pytest.approx(2 / 3)
    assert success_rate([], []) == 0.0
    with pytest.raises(ValueError, match="2 generations for 1 answers"):
        success_rate(["a", "b"], ["a"])
