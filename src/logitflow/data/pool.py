"""The unlabelled pair pool of the feedback flow: (prompt, response_a, response_b) rows.

Rows are validated one at a time as they stream in and written in record batches to an Arrow
stream file, which `datasets` memory-maps: a pool larger than memory never has to fit in it. A pool
whose pairs repeat (the same id, or the same prompt with the same two responses in either order)
is refused with both rows named; only a 16-byte digest per pair is kept to find repeats.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa

from logitflow.data.records import RawRecord
from logitflow.data.schemas import BadRows, iter_valid_records, pool_normaliser
from logitflow.errors import DataError
from logitflow.fsio import atomic_write_json, atomic_write_with

PAIRS_FILE = "pairs.arrow"
MANIFEST_FILE = "manifest.json"
BATCH_ROWS = 1024
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [("id", pa.string()), ("prompt", pa.list_(MESSAGE)), ("response_a", pa.string()), ("response_b", pa.string())]
)


def pair_digest(row: dict[str, Any]) -> bytes:
    """Equal for the same prompt and the same two responses, in either order."""
    responses = sorted([row["response_a"].strip(), row["response_b"].strip()])
    payload = json.dumps([row["prompt"], responses], sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).digest()


def iter_pool(
    records: Iterable[RawRecord],
    on_bad_rows: Literal["error", "skip"],
    bad_rows: BadRows,
    setting: str = "feedback.on_bad_rows",
) -> Iterator[dict[str, Any]]:
    """Normal-form pool rows, one at a time; bad rows and repeated pairs follow `on_bad_rows`."""
    ids: dict[str, str] = {}
    pairs: dict[bytes, str] = {}
    for record, row in iter_valid_records(records, pool_normaliser(), on_bad_rows, bad_rows, setting):
        where = record.where()
        digest = pair_digest(row)
        if row["id"] in ids or digest in pairs:
            reason = (
                f"id '{row['id']}' already used at {ids[row['id']]}"
                if row["id"] in ids
                else f"the same pair (prompt and both responses) as {pairs[digest]}"
            )
            if on_bad_rows == "error":
                raise DataError(f"{where}: {reason}; deduplicate the pool (or set {setting}: skip)")
            bad_rows.add(where, "repeated pair")
            continue
        ids[row["id"]], pairs[digest] = where, where
        yield row


@dataclass
class PoolWriter:
    """Counts and fingerprints the rows it writes (sha256 of their canonical JSON, in order)."""

    rows: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def write(self, rows: Iterable[dict[str, Any]], path: Path) -> None:
        def write_stream(tmp: Path) -> None:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as stream:
                batch: list[dict[str, Any]] = []
                for row in rows:
                    self.rows += 1
                    self.digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
                    batch.append(row)
                    if len(batch) == BATCH_ROWS:
                        stream.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
                        batch = []
                if batch:
                    stream.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))

        atomic_write_with(path, write_stream)


def write_pool(rows: Iterable[dict[str, Any]], directory: Path, source: str) -> dict[str, Any]:
    """Write the pool and its manifest (rows, fingerprint, source); returns the manifest."""
    writer = PoolWriter()
    writer.write(rows, directory / PAIRS_FILE)
    if writer.rows == 0:
        raise DataError(f"{source}: no usable pool rows")
    manifest = {"rows": writer.rows, "fingerprint": writer.digest.hexdigest(), "source": source}
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return manifest


@dataclass(frozen=True)
class Pool:
    pairs: datasets.Dataset  # memory-mapped: id, prompt, response_a, response_b
    fingerprint: str

    def __len__(self) -> int:
        return len(self.pairs)


def read_pool(directory: Path) -> Pool:
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise DataError(f"{directory}: no pair pool here; run `logitflow stage pool` (or `dvc repro pool`)")
    manifest = json.loads(manifest_path.read_text())
    pairs = datasets.Dataset.from_file(str(directory / PAIRS_FILE), in_memory=False)
    if len(pairs) != manifest["rows"]:
        raise DataError(f"{directory}: {len(pairs)} pairs on disk but the manifest says {manifest['rows']}; rerun pool")
    return Pool(pairs, manifest["fingerprint"])
