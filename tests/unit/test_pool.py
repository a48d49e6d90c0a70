"""The pair pool: rows validated as they stream in, repeated pairs and missing responses refused
with the row named, Arrow storage that round-trips and fingerprints its content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logitflow.config import DataSource
from logitflow.data.pool import BATCH_ROWS, iter_pool, read_pool, write_pool
from logitflow.data.records import read_records
from logitflow.data.schemas import BadRows
from logitflow.errors import DataError


def _row(i: int, a: str | None = None, b: str | None = None) -> dict:
    return {"id": f"r{i}", "prompt": f"question {i}?", "response_a": a or f"yes {i}", "response_b": b or f"no {i}"}


def _pool_file(tmp_path: Path, rows: list, extra: str = "") -> DataSource:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return DataSource(type="local", path=str(path))


def _rows(source: DataSource, on_bad_rows: str = "error", bad: BadRows | None = None) -> list[dict]:
    return list(iter_pool(read_records(source), on_bad_rows, bad or BadRows()))  # type: ignore[arg-type]


def test_a_repeated_pair_is_refused_with_both_rows_named(tmp_path: Path) -> None:
    swapped = {**_row(1), "id": "other", "response_a": "no 1", "response_b": "yes 1"}
    with pytest.raises(DataError, match=r"pool.jsonl line 3: the same pair .* as .*pool.jsonl line 1"):
        _rows(_pool_file(tmp_path, [_row(1), _row(2), swapped]))
    with pytest.raises(DataError, match=r"line 2: id 'r1' already used at .*line 1"):
        _rows(_pool_file(tmp_path, [_row(1), {**_row(2), "id": "r1"}]))


def test_a_missing_response_is_refused_with_the_row_and_field_named(tmp_path: Path) -> None:
    missing = {"id": "r2", "prompt": "q?", "response_a": "x"}
    with pytest.raises(DataError, match=r"pool.jsonl line 2, field 'response_b': missing field.*feedback.on_bad_rows"):
        _rows(_pool_file(tmp_path, [_row(1), missing]))
    bad = BadRows()
    assert [r["id"] for r in _rows(_pool_file(tmp_path, [_row(1), missing, _row(1)]), "skip", bad)] == ["r1"]
    assert bad.total == 2 and bad.counts["repeated pair"] == 1


def test_rows_stream_one_at_a_time(tmp_path: Path) -> None:
    rows = iter_pool(read_records(_pool_file(tmp_path, [_row(1), _row(2)], extra="{broken\n")), "error", BadRows())
    assert next(rows)["id"] == "r1" and next(rows)["id"] == "r2", "rows arrive before the bad line is read"
    with pytest.raises(DataError, match="line 3"):
        next(rows)


def test_the_pool_round_trips_through_arrow_batches(tmp_path: Path) -> None:
    rows = [_row(i) for i in range(BATCH_ROWS + 5)]
    manifest = write_pool(iter(_rows(_pool_file(tmp_path, rows))), tmp_path / "out", "pool.jsonl")
    pool = read_pool(tmp_path / "out")
    assert len(pool) == manifest["rows"] == BATCH_ROWS + 5
    assert pool.pairs[BATCH_ROWS + 4]["response_b"] == f"no {BATCH_ROWS + 4}"
    assert pool.pairs[0]["prompt"] == [{"role": "user", "content": "question 0?"}]
    again = write_pool(iter(_rows(_pool_file(tmp_path, rows))), tmp_path / "again", "pool.jsonl")
    assert again["fingerprint"] == manifest["fingerprint"]
    changed = write_pool(iter(_rows(_pool_file(tmp_path, rows[:-1]))), tmp_path / "changed", "pool.jsonl")
    assert changed["fingerprint"] != manifest["fingerprint"]
    with pytest.raises(DataError, match="no usable pool rows"):
        write_pool(iter([]), tmp_path / "empty", "empty.jsonl")
    with pytest.raises(DataError, match="run `logitflow stage pool`"):
        read_pool(tmp_path / "nothing")
