"""Checking generations against an answer key (the demo tasks have one verifiable answer each)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def answer_found(text: str, answer: str) -> bool:
    """Whether `answer` appears in `text` as a whole token: "The answer is 42." contains 42, but
    420, 4.2 and -42 do not contain 42. Case-insensitive."""
    pattern = rf"(?<![\w.\-]){re.escape(answer.strip())}(?![\w]|\.\d)"
    return re.search(pattern, text, flags=re.IGNORECASE) is not None


def success_rate(texts: Sequence[str], answers: Sequence[str]) -> float:
    if len(texts) != len(answers):
        raise ValueError(f"{len(texts)} generations for {len(answers)} answers")
    if not texts:
        return 0.0
    return sum(answer_found(t, a) for t, a in zip(texts, answers, strict=True)) / len(texts)
