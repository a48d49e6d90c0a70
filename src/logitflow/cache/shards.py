"""The resumable shard loop shared by every scoring pass (teacher cache, reference scores).

A pass is split into shards, each an independent unit of work with its own seed. A shard file is
written atomically with a one-entry JSON header (the cache key digest and its counts), so after a
kill the complete shards of the same key are reused and the rest recomputed. The caller removes
its manifest before the loop and writes it after, so an unfinished pass never looks complete.

Shards are computed in this process (`ShardedPass.compute`) or by a `ShardExecutor` (Ray workers,
`ray_shards.py`) that returns each shard's tensors: either way this process encodes and writes
every shard file, so where a shard ran never changes its bytes or the resume rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors
from tqdm.auto import tqdm

from logitflow.errors import LogitflowError
from logitflow.fsio import atomic_write_bytes

METADATA_KEY = "logitflow"
ManifestT = TypeVar("ManifestT", bound=BaseModel)
# A computed shard: its tensors and its counts (`units` moves the progress bar).
ShardResult = tuple[dict[str, np.ndarray], dict[str, int]]


class CacheError(LogitflowError):
    """A cache that is missing, incomplete, corrupted or made for another model/tokenizer/data."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    bytes: int
    sha256: str
    counts: dict[str, int]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def encode_tensors(tensors: dict[str, np.ndarray], header: dict[str, Any]) -> bytes:
    # One canonical JSON entry: safetensors writes a metadata *map* in arbitrary order, which
    # would make equal shards differ byte for byte between processes.
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def shard_header(path: Path) -> dict[str, Any] | None:
    """The header a complete shard file was written with (None if unreadable)."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return json.loads((handle.metadata() or {})[METADATA_KEY])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None


class ShardExecutor(Protocol):
    """Computes shards elsewhere (e.g. on Ray workers) and hands their tensors back."""

    def map(self, indices: list[int], inputs: Callable[[int], Any]) -> Generator[tuple[int, ShardResult], None, None]:
        """Compute the shards `indices` (shard i gets `inputs(i)`); yield (index, result) as each
        finishes, in any order. Closing the iterator early stops the work still running."""
        ...


@dataclass(frozen=True)
class ShardedPass:
    directory: Path
    key_sha256: str
    schema_version: int
    num_shards: int
    total_units: int  # for the progress bar (tokens, pairs, ...)
    unit: str
    description: str
    # compute(index, advance) -> (tensors, counts) in this process; `advance(n)` moves the progress bar.
    compute: Callable[[int, Callable[[int], None]], ShardResult]
    # inputs(index): what an executor's worker needs to compute shard `index` (its slice of the data).
    inputs: Callable[[int], Any] = lambda index: None


def _entry(path: Path, data: bytes, counts: dict[str, int]) -> ShardEntry:
    return ShardEntry(file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), counts=counts)


def run_sharded(
    job: ShardedPass, manifest_file: str, executor: ShardExecutor | None = None
) -> tuple[list[ShardEntry], dict[str, float]]:
    """Compute or reuse every shard; returns their entries and {computed_units, seconds}.

    With an `executor` the missing shards are computed by it (in any order); this process still
    encodes and atomically writes each shard as it arrives, so a lost worker leaves no partial file."""
    directory = job.directory
    directory.mkdir(parents=True, exist_ok=True)
    (directory / manifest_file).unlink(missing_ok=True)
    for leftover in directory.glob(".*.tmp"):
        leftover.unlink()
    computed, started = 0, time.perf_counter()
    entries: dict[int, ShardEntry] = {}
    with tqdm(total=job.total_units, unit=job.unit, unit_scale=True, desc=job.description) as bar:
        missing: list[int] = []
        for index in range(job.num_shards):
            path = directory / shard_name(index)
            header = shard_header(path) if path.is_file() else None
            if (
                header is not None
                and header.get("key_sha256") == job.key_sha256
                and header.get("schema_version") == job.schema_version
            ):
                entries[index] = _entry(path, path.read_bytes(), header["counts"])
                bar.update(header["counts"].get("units", 0))
            else:
                missing.append(index)

        def store(index: int, tensors: dict[str, np.ndarray], counts: dict[str, int]) -> None:
            nonlocal computed
            path = directory / shard_name(index)
            header = {"schema_version": job.schema_version, "key_sha256": job.key_sha256, "counts": counts}
            data = encode_tensors(tensors, header)
            try:
                atomic_write_bytes(path, data)
            except OSError as err:
                raise CacheError(
                    f"{path}: cannot write shard ({err.strerror or err}); the {len(entries)} complete shard(s) "
                    "are kept; fix the cause and rerun to resume"
                ) from None
            entries[index] = _entry(path, data, counts)
            computed += counts.get("units", 0)
            rate = computed / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(shard=f"{len(entries)}/{job.num_shards}", rate=f"{rate:,.0f} {job.unit}/s")

        if executor is None:
            for index in missing:
                store(index, *job.compute(index, bar.update))
        else:
            with contextlib.closing(executor.map(missing, job.inputs)) as results:
                for index, (tensors, counts) in results:
                    bar.update(counts.get("units", 0))
                    store(index, tensors, counts)
    ordered = [entries[index] for index in range(job.num_shards)]
    for stale in directory.glob("shard-*.safetensors"):
        if stale.name not in {entry.file for entry in ordered}:
            stale.unlink()
    return ordered, {"computed_units": computed, "seconds": time.perf_counter() - started}


def read_manifest_file(path: Path, model: type[ManifestT], missing: str) -> ManifestT:
    """A manifest (pydantic model) from JSON; `missing` is the error when there is none."""
    if not path.is_file():
        raise CacheError(missing)
    try:
        return model.model_validate_json(path.read_text())
    except ValueError as err:
        raise CacheError(f"{path}: unreadable manifest: {str(err).splitlines()[0]}") from None


def read_checked(directory: Path, entry: ShardEntry) -> bytes:
    """A shard's bytes, verified against the manifest's checksum."""
    path = directory / entry.file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"{path}: shard listed in the manifest is missing") from None
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise CacheError(f"{path}: checksum mismatch (corrupted or modified); rerun the stage to rebuild it")
    return data
