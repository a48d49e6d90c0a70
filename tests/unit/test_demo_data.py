from __future__ import annotations

import re

import pytest

from logitflow.data.demo import corpus_documents, demo_preferences
from logitflow.errors import ParamsError

TASKS = ["arithmetic", "units", "strings"]


def _true_answer(question: str) -> str:
    """An independent solver for the demo questions."""
    if m := re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "×": a * b}[op])
    if m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question):
        factor = {
            ("meters", "kilometers"): 1000,
            ("grams", "kilograms"): 1000,
            ("minutes", "hours"): 60,
            ("seconds", "minutes"): 60,
            ("centimeters", "meters"): 100,
            ("milliliters", "liters"): 1000,
            ("hours", "days"): 24,
        }[(m[1], m[3])]
        return str(int(m[2]) * factor)
    if m := re.fullmatch(r"Reverse the word '(\w+)'\.", question):
        return m[1][::-1]
    if m := re.fullmatch(r"How many letters are in the word '(\w+)'\?", question):
        return str(len(m[1]))
    if m := re.fullmatch(r"Write the word '(\w+)' in uppercase\.", question):
        return m[1].upper()
    raise AssertionError(f"unknown question {question!r}")


def test_demo_preferences_are_correct_wrong_and_deterministic() -> None:
    prefs, key = demo_preferences(300, TASKS, seed=1)
    assert (prefs, key) == demo_preferences(300, TASKS, seed=1)
    assert prefs != demo_preferences(300, TASKS, seed=2)[0]
    assert len({row["prompt"][0]["content"] for row in prefs}) == 300
    assert {row["task"] for row in key} == set(TASKS)
    for row, answer in zip(prefs, key, strict=True):
        question = row["prompt"][0]["content"]
        truth = _true_answer(question)
        assert answer["answer"] == truth and answer["id"] == row["id"]
        assert row["chosen"] == f"The answer is {truth}."
        assert row["rejected"] != row["chosen"] and not row["rejected"].endswith(f" {truth}.")


def test_too_many_pairs_for_one_task_is_a_params_error() -> None:
    with pytest.raises(ParamsError, match="prepare.demo.preference_pairs"):
        list(demo_preferences(100_000, ["units"], seed=0))


def test_corpus_is_real_text_of_known_size() -> None:
    documents = corpus_documents()
    assert len(documents) >= 70
    assert sum(map(len, documents)) > 400_000
    assert corpus_documents(5) == documents[:5]
