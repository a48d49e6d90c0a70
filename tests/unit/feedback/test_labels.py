"""The label store: answers survive as written, a write torn by a crash is dropped (and cut off by
the next append), and corruption elsewhere is refused with its line number."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitflow.errors import DataError
from logitflow.feedback.labels import LabelRecord, LabelStore


def _record(question: int, answer: str = "a") -> LabelRecord:
    labels = question if answer != "skip" else question - 1
    return LabelRecord(
        question=question, row=question * 10, pair_id=f"p{question}", answer=answer, gain=0.5, logdet=1.0,
        labels=labels, refit=False,
    )  # fmt: skip


def test_appended_records_read_back_in_order(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "s" / "labels.jsonl")
    assert store.read() == []
    written = [_record(1), _record(2, "skip"), _record(3, "b")]
    for record in written:
        store.append(record)
    assert store.read() == written
    assert store.path.read_text().count("\n") == 3


def test_a_torn_last_line_is_dropped_and_cut_off_by_the_next_append(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.jsonl")
    store.append(_record(1))
    with open(store.path, "ab") as handle:
        handle.write(_record(2).model_dump_json().encode()[:25])  # a crash mid-write
    assert store.read() == [_record(1)]
    store.append(_record(2, "b"))
    assert store.read() == [_record(1), _record(2, "b")]
    assert store.path.read_text().count("\n") == 2


def test_a_broken_complete_line_is_corruption(tmp_path: Path) -> None:
    store = LabelStore(tmp_path / "labels.jsonl")
    store.append(_record(1))
    with open(store.path, "a") as handle:
        handle.write('{"question": 2, "answer": "maybe"}\n')
    with pytest.raises(DataError, match=r"labels.jsonl line 2: not a label record"):
        store.read()
    with pytest.raises(DataError, match="line 2"):
        store.append(_record(3))
    assert store.path.read_text().count("\n") == 2, "nothing written on top of corruption"


def test_an_answer_outside_a_b_skip_is_not_a_record() -> None:
    with pytest.raises(ValueError, match="answer"):
        _record(1, "c")
