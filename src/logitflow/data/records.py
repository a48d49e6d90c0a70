"""Reading raw records from local files (jsonl/json/csv/parquet) or a hub dataset.

Text formats are read here line by line so a bad row (undecodable bytes, broken JSON) is named
by its line; parquet goes through pyarrow and hub datasets through `datasets`. JSON Lines and
parquet are streamed, so a file larger than memory can be read. Every record keeps where it came
from (`origin`, `row`) so validation errors can point at it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitflow.config import DataSource
from logitflow.errors import DataError

LOCAL_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class RawRecord:
    origin: str
    row: int  # 1-based line (jsonl/csv) or item number (json/parquet/hub)
    value: dict[str, Any] | None
    problem: str | None = None  # set when the row could not even be parsed

    def where(self, field: str | None = None) -> str:
        unit = "line" if self.origin.endswith((".jsonl", ".csv")) else "row"
        return f"{self.origin} {unit} {self.row}" + (f", field '{field}'" if field else "")


def read_records(source: DataSource, base_dir: str | os.PathLike[str] = ".") -> Iterator[RawRecord]:
    if source.type == "hub":
        yield from _read_hub(source)
        return
    if source.type != "local":
        raise ValueError(f"read_records reads local or hub sources, not '{source.type}'")
    assert source.path is not None
    path = Path(source.path)
    if not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise DataError(f"{source.path}: data file not found")
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{source.path}: unsupported file type '{path.suffix}' (use {', '.join(LOCAL_FORMATS)})")
    origin = str(source.path)
    if kind == "parquet":
        yield from _read_parquet(path, origin)
        return
    if kind == "jsonl":
        with path.open("rb") as lines:  # streamed: a file larger than memory is read line by line
            yield from _read_jsonl(lines, origin)
        return
    data = path.read_bytes()
    if kind == "json":
        yield from _read_json(data, origin)
    else:
        yield from _read_csv(data, origin)


def _read_jsonl(lines: Iterable[bytes], origin: str) -> Iterator[RawRecord]:
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield RawRecord(origin, line_number, None, f"undecodable bytes (not UTF-8) at column {err.start + 1}")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            yield RawRecord(origin, line_number, None, f"not valid JSON: {err.msg}")
            continue
        if not isinstance(value, dict):
            yield RawRecord(origin, line_number, None, f"expected a JSON object, got {type(value).__name__}")
            continue
        yield RawRecord(origin, line_number, value)


def _decode_whole(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{origin} line {line}: undecodable bytes (not UTF-8)") from None


def _read_json(data: bytes, origin: str) -> Iterator[RawRecord]:
    text = _decode_whole(data, origin)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        # Like `datasets`, accept JSON Lines saved under a .json name.
        yield from _read_jsonl(data.split(b"\n"), origin)
        return
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} layout
    if not isinstance(value, list):
        raise DataError(f"{origin}: expected a JSON list of objects (or JSON Lines), got {type(value).__name__}")
    for index, item in enumerate(value, start=1):
        if isinstance(item, dict):
            yield RawRecord(origin, index, item)
        else:
            yield RawRecord(origin, index, None, f"expected a JSON object, got {type(item).__name__}")


def _read_csv(data: bytes, origin: str) -> Iterator[RawRecord]:
    reader = csv.DictReader(io.StringIO(_decode_whole(data, origin), newline=""))
    for row in reader:
        extra = row.pop(None, None)  # type: ignore[call-overload]
        if extra:
            yield RawRecord(origin, reader.line_num, None, f"{len(extra)} more cells than the header has columns")
            continue
        yield RawRecord(origin, reader.line_num, dict(row))


def _read_parquet(path: Path, origin: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"{origin}: not a readable parquet file: {err}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):  # streamed, one record batch at a time
        for item in batch.to_pylist():
            index += 1
            yield RawRecord(origin, index, item)


def _read_hub(source: DataSource) -> Iterator[RawRecord]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.name, source.subset, split=source.split)
    except Exception as err:  # datasets wraps network/cache failures in many types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{source.describe()}: cannot load the hub dataset ({first_line}); "
            "offline runs need it in the HF cache, or use a local file"
        ) from None
    origin = source.describe()
    for index, item in enumerate(dataset, start=1):
        yield RawRecord(origin, index, dict(item))
