"""Row schemas, validation and normalisation.

Normal forms (what every later stage reads):
- corpus:     {"text": str}
- preference: {"id": str, "prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str}
- pool:       {"id": str, "prompt": [{"role", "content"}, ...], "response_a": str, "response_b": str}

Accepted preference layouts: plain (`prompt` str or message list; `chosen`/`rejected` str),
hh-rlhf (`chosen`/`rejected` whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts sharing the
prompt), UltraFeedback-binarized (`chosen`/`rejected` message lists ending with the assistant turn).

A bad row raises `DataError` naming file, row and field, or with `on_bad_rows="skip"` is counted
in the `BadRows` report; it is never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from logitflow.data.records import RawRecord
from logitflow.errors import DataError

PreferenceFormat = Literal["auto", "plain", "hh_rlhf", "ultrafeedback"]
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
MAX_EXAMPLES = 20


class BadRow(Exception):
    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass
class BadRows:
    """What validation refused, by reason, with the first few locations."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": self.examples}


def iter_valid_records(
    records: Iterable[RawRecord],
    normalise: Callable[[dict[str, Any], RawRecord], dict[str, Any]],
    on_bad_rows: Literal["error", "skip"],
    bad_rows: BadRows,
    setting: str = "prepare.on_bad_rows",
) -> Iterator[tuple[RawRecord, dict[str, Any]]]:
    """(record, normal-form row) for every good record, one at a time; `setting` is the params key
    that lets bad rows be skipped (named in the error)."""
    for record in records:
        try:
            if record.problem is not None:
                raise BadRow(None, record.problem)
            assert record.value is not None
            row = normalise(record.value, record)
        except BadRow as bad:
            where = record.where(bad.field)
            if on_bad_rows == "error":
                raise DataError(f"{where}: {bad.reason} (set {setting}: skip to skip such rows)") from None
            bad_rows.add(where, bad.reason)
            continue
        yield record, row


def validate_records(
    records: Iterable[RawRecord],
    normalise: Callable[[dict[str, Any], RawRecord], dict[str, Any]],
    on_bad_rows: Literal["error", "skip"],
    bad_rows: BadRows,
) -> list[dict[str, Any]]:
    return [row for _, row in iter_valid_records(records, normalise, on_bad_rows, bad_rows)]


# ---------------------------------------------------------------- field checks


def _text(value: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    if name not in value or value[name] is None:
        raise BadRow(name, "missing field")
    text = value[name]
    if isinstance(text, bytes | bytearray):
        raise BadRow(name, "not text (bytes)")
    if not isinstance(text, str):
        raise BadRow(name, f"not text ({type(text).__name__})")
    if not allow_empty and not text.strip():
        raise BadRow(name, "empty")
    return text


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow(name, "expected a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise BadRow(name, f"message {index} is not a {{'role': str, 'content': str}} object")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _prompt(value: dict[str, Any]) -> list[dict[str, str]]:
    if "prompt" not in value or value["prompt"] is None:
        raise BadRow("prompt", "missing field")
    prompt = value["prompt"]
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt")
        if not any(m["content"].strip() for m in messages):
            raise BadRow("prompt", "empty")
        return messages
    return [{"role": "user", "content": _text(value, "prompt")}]


def _row_id(value: dict[str, Any], record: RawRecord) -> str:
    given = value.get("id")
    if isinstance(given, str | int) and not isinstance(given, bool) and str(given).strip():
        return str(given)
    return f"row-{record.row:07d}"


# ---------------------------------------------------------------- corpus


def corpus_normaliser(text_field: str) -> Callable[[dict[str, Any], RawRecord], dict[str, Any]]:
    def normalise(value: dict[str, Any], record: RawRecord) -> dict[str, Any]:
        return {"text": _text(value, text_field)}

    return normalise


# ---------------------------------------------------------------- preferences


def detect_preference_format(value: dict[str, Any]) -> PreferenceFormat:
    chosen = value.get("chosen")
    if isinstance(chosen, list):
        return "ultrafeedback"
    if "prompt" not in value and isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "hh_rlhf"
    return "plain"


def _split_hh(transcript: str, name: str) -> tuple[list[dict[str, str]], str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow(name, "hh-rlhf transcript has no '\\n\\nAssistant:' turn")
    prompt_text, response = transcript[:cut], transcript[cut + len(HH_ASSISTANT) :].strip()
    messages = []
    for chunk in prompt_text.split(HH_HUMAN):
        if not chunk.strip():
            continue
        human, *assistant = chunk.split(HH_ASSISTANT)
        messages.append({"role": "user", "content": human.strip()})
        messages.extend({"role": "assistant", "content": turn.strip()} for turn in assistant)
    if not messages:
        raise BadRow(name, "hh-rlhf transcript has no '\\n\\nHuman:' turn before the answer")
    return messages, response


def _split_conversation(value: dict[str, Any], name: str) -> tuple[list[dict[str, str]], str]:
    if name not in value or value[name] is None:
        raise BadRow(name, "missing field")
    messages = _messages(value[name], name)
    if messages[-1]["role"] != "assistant":
        raise BadRow(name, "the last message is not the assistant's response")
    return messages[:-1], messages[-1]["content"]


def preference_normaliser(
    layout: PreferenceFormat = "auto",
) -> Callable[[dict[str, Any], RawRecord], dict[str, Any]]:
    def normalise(value: dict[str, Any], record: RawRecord) -> dict[str, Any]:
        kind = detect_preference_format(value) if layout == "auto" else layout
        if kind == "plain":
            prompt = _prompt(value)
            chosen, rejected = _text(value, "chosen"), _text(value, "rejected")
        elif kind == "hh_rlhf":
            prompt, chosen = _split_hh(_text(value, "chosen"), "chosen")
            rejected_prompt, rejected = _split_hh(_text(value, "rejected"), "rejected")
            if rejected_prompt != prompt:
                raise BadRow("rejected", "the rejected transcript has a different prompt than the chosen one")
        else:
            prompt, chosen = _split_conversation(value, "chosen")
            rejected_prompt, rejected = _split_conversation(value, "rejected")
            if not prompt:  # the lists hold only the answer; the prompt is its own field
                prompt = _prompt(value)
            if rejected_prompt and rejected_prompt != prompt:
                raise BadRow("rejected", "the rejected conversation has a different prompt than the chosen one")
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            if not response.strip():
                raise BadRow(name, "empty response")
        if chosen.strip() == rejected.strip():
            raise BadRow("rejected", "chosen and rejected are the same response")
        return {"id": _row_id(value, record), "prompt": prompt, "chosen": chosen, "rejected": rejected}

    return normalise


# ---------------------------------------------------------------- unlabelled pair pool


def pool_normaliser() -> Callable[[dict[str, Any], RawRecord], dict[str, Any]]:
    def normalise(value: dict[str, Any], record: RawRecord) -> dict[str, Any]:
        prompt = _prompt(value)
        a, b = _text(value, "response_a"), _text(value, "response_b")
        if a.strip() == b.strip():
            raise BadRow("response_b", "response_a and response_b are the same response")
        return {"id": _row_id(value, record), "prompt": prompt, "response_a": a, "response_b": b}

    return normalise


def check_unique_ids(rows: list[dict[str, Any]], origin: str) -> None:
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if row["id"] in seen:
            raise DataError(f"{origin}: id '{row['id']}' appears twice (rows {seen[row['id']] + 1} and {index + 1})")
        seen[row["id"]] = index
