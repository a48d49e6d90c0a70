"""Offline demo data, built deterministically from what ships with Python (nothing downloaded).

- Corpus: CPython's own documentation topics (`pydoc_data.topics`, 79 documents, ~465k characters
  of real English).
- Preferences: short tasks whose answer a rule can verify (arithmetic, unit conversion, string
  manipulation). chosen = the correct answer, rejected = a plausible wrong one (an off-by-one, a
  carry slip, a factor-of-ten unit error, a swapped letter). Every prompt has an answer-key row so
  later stages can check the model's own generations.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from logitflow.errors import ParamsError

def corpus_documents(limit: int | None = None) -> list[str]:
    """The pydoc topic texts, in a fixed (sorted-key) order."""
    from pydoc_data.topics import topics

    texts = [topics[key].strip() for key in sorted(topics)]
    texts = [text for text in texts if text]
    return texts[:limit] if limit else texts


@dataclass(frozen=True)
class DemoTask:
    task: str
    question: str
    answer: str
    wrong: str

    def response(self, value: str) -> str:
        return f"The answer is {value}."


def _arithmetic(rng: random.Random) -> DemoTask:
    op = rng.choice(["+", "-", "*"])
    if op == "*":
        a, b = rng.randint(3, 19), rng.randint(3, 19)
        answer = a * b
        wrong = answer + rng.choice([-a, a, -b, b])
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        wrong = answer + rng.choice([-10, -1, 1, 10])
    symbol = {"+": "+", "-": "-", "*": "×"}[op]
    return DemoTask("arithmetic", f"What is {a} {symbol} {b}?", str(answer), str(wrong))


UNITS = [
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("meters", "centimeters", 100),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
]


def _units(rng: random.Random) -> DemoTask:
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(2, 250)
    answer = amount * factor
    wrong_factor = {1000: rng.choice([100, 10_000]), 100: rng.choice([10, 1000]), 60: 100, 24: 12}[factor]
    question = f"How many {small} are in {amount} {big}?"
    return DemoTask("units", question, str(answer), str(amount * wrong_factor))


def _swap_two_letters(word: str, rng: random.Random) -> str:
    for _ in range(20):
        i = rng.randrange(len(word) - 1)
        swapped = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        if swapped != word:
            return swapped
    return word[1:] + word[0]


@functools.cache
def demo_words() -> tuple[str, ...]:
    """Plain lowercase English words of 5-9 letters from the corpus, sorted."""
    words = {word for text in corpus_documents() for word in re.findall(r"\b[a-z]{5,9}\b", text)}
    return tuple(sorted(words))


def _strings(rng: random.Random) -> DemoTask:
    word = rng.choice(demo_words())
    kind = rng.choice(["reverse", "length", "upper"])
    if kind == "reverse":
        answer = word[::-1]
        return DemoTask("strings", f"Reverse the word '{word}'.", answer, _swap_two_letters(answer, rng))
    if kind == "length":
        return DemoTask(
            "strings",
            f"How many letters are in the word '{word}'?",
            str(len(word)),
            str(len(word) + rng.choice([-1, 1])),
        )
    return DemoTask("strings", f"Write the word '{word}' in uppercase.", word.upper(), word.capitalize())


TASK_MAKERS: dict[str, Callable[[random.Random], DemoTask]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "strings": _strings,
}


def demo_tasks(n: int, tasks: list[str], seed: int) -> Iterator[DemoTask]:
    """`n` tasks with distinct questions, cycling through `tasks`; deterministic in `seed`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    misses = 0  # consecutive draws that repeated a question: the task space is nearly exhausted
    while len(seen) < n:
        task = TASK_MAKERS[tasks[len(seen) % len(tasks)]](rng)
        if task.question in seen or task.answer == task.wrong:
            misses += 1
            if misses > 5_000:
                raise ParamsError(
                    f"prepare.demo.preference_pairs = {n}: cannot make that many distinct questions from tasks {tasks}"
                )
            continue
        misses = 0
        seen.add(task.question)
        yield task


def demo_preferences(n: int, tasks: list[str], seed: int) -> tuple[list[dict], list[dict]]:
    """Preference rows (normal form) and their answer key, row for row."""
    preferences, answer_key = [], []
    for index, task in enumerate(demo_tasks(n, tasks, seed)):
        row_id = f"demo-{index:06d}"
        preferences.append(
            {
                "id": row_id,
                "prompt": [{"role": "user", "content": task.question}],
                "chosen": task.response(task.answer),
                "rejected": task.response(task.wrong),
            }
        )
        answer_key.append({"id": row_id, "task": task.task, "question": task.question, "answer": task.answer})
    return preferences, answer_key
