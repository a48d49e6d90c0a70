"""On-disk format of the teacher logit cache (no pickle anywhere).

A cache is a directory:
- `shard-00000.safetensors`, ...: each holds whole sequences: their token ids and the sparse
  targets of rows 0..L-2 of each (row t = the teacher's distribution of token t+1).
  RS-KD shards store the (id, count) sets rANS-coded (`codec.py`), plus fp16 normalised weights
  when the proposal power is not 1; Top-K shards store ids, fp16 probabilities t_i and the fp16
  tail mass 1 − Σ_K t. The safetensors metadata carries the cache key and the shard's counts.
- `manifest.json`, written last: what made the cache (the key), totals and, per shard, its
  sequence/token/entry counts, byte size and sha256. No manifest = an incomplete cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from logitflow.cache.codec import EncodedSets, decode_sets, encode_sets
from logitflow.cache.shards import CacheError, ShardEntry, read_manifest_file
from logitflow.fsio import atomic_write_json

SCHEMA_VERSION = 3
MANIFEST_FILE = "manifest.json"
Mode = Literal["rskd", "topk"]
SHARD_COUNTS = ("sequences", "tokens", "positions", "entries", "target_bytes")


class Manifest(BaseModel):
    """Everything a consumer checks before trusting the cache."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int
    mode: Mode
    key: dict[str, Any]
    key_sha256: str
    vocab_size: int
    n_samples: int  # RS-KD draws per position (0 for Top-K)
    sequences: int
    tokens: int
    positions: int
    entries: int
    bytes: int
    target_bytes: int
    shards: list[ShardEntry]

    @property
    def bytes_per_token(self) -> float:
        """Bytes of sparse targets (no token ids) per cached position."""
        return self.target_bytes / max(self.positions, 1)

    @property
    def bytes_per_entry(self) -> float:
        return self.target_bytes / max(self.entries, 1)

    @property
    def unique_per_position(self) -> float:
        return self.entries / max(self.positions, 1)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write_json(directory / MANIFEST_FILE, manifest.model_dump(mode="json"))


def read_manifest(directory: Path) -> Manifest:
    if not (directory / MANIFEST_FILE).is_file() and any(directory.glob("shard-*.safetensors")):
        raise CacheError(f"{directory}: incomplete cache (shards but no manifest); rerun cache_teacher to finish it")
    missing = f"{directory}: no teacher cache here; run `logitflow stage cache_teacher`"
    return read_manifest_file(directory / MANIFEST_FILE, Manifest, missing)


# ---------------------------------------------------------------- shard contents


@dataclass(frozen=True)
class ShardTargets:
    """Decoded sparse targets of one shard, row-major over its sequences' rows.

    RS-KD: num_unique [P], ids [E], counts [E] (and weights [E] when τ ≠ 1): position p owns
    entries [offsets[p], offsets[p+1]). Top-K: ids [P, k], probs [P, k], tail [P].
    """

    num_unique: np.ndarray
    ids: np.ndarray
    counts: np.ndarray | None
    weights: np.ndarray | None
    topk_probs: np.ndarray | None
    tail: np.ndarray | None


@dataclass(frozen=True)
class Shard:
    input_ids: np.ndarray  # int32 [T], the sequences concatenated
    lengths: np.ndarray  # int64 [S]
    targets: ShardTargets

    @property
    def positions(self) -> int:
        return int((self.lengths - 1).sum())

    def next_ids(self) -> np.ndarray:
        """[P]: the true next token of every row (row t of a sequence -> its token t+1)."""
        return next_tokens(self.input_ids, self.lengths)


def next_tokens(input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    is_first = np.zeros(input_ids.size, dtype=bool)
    is_first[np.cumsum(lengths) - lengths] = True
    return input_ids[~is_first].astype(np.int64)


def encode_shard(
    shard: Shard, *, mode: Mode, n_samples: int, vocab_size: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The shard file's tensors and its counts (sequences, tokens, positions, entries, target_bytes;
    `units` = tokens, for progress)."""
    tensors: dict[str, np.ndarray] = {
        "input_ids": shard.input_ids.astype(np.int32),
        "lengths": shard.lengths.astype(np.int32),
    }
    targets = shard.targets
    if mode == "rskd":
        assert targets.counts is not None
        encoded = encode_sets(targets.num_unique, targets.ids, targets.counts, shard.next_ids(), n_samples, vocab_size)
        tensors.update(rskd_words=encoded.words, rskd_tables=encoded.tables)
        if targets.weights is not None:
            tensors["rskd_weights"] = targets.weights.astype(np.float16)
        entries = int(targets.num_unique.sum())
    else:
        assert targets.topk_probs is not None and targets.tail is not None
        id_dtype = np.uint16 if vocab_size <= 65_536 else np.int32
        tensors.update(
            topk_ids=targets.ids.astype(id_dtype),
            topk_probs=targets.topk_probs.astype(np.float16),
            topk_tail=targets.tail.astype(np.float16),
        )
        entries = int(targets.ids.size)
    target_bytes = sum(v.nbytes for k, v in tensors.items() if k not in ("input_ids", "lengths"))
    counts = {
        "sequences": len(shard.lengths),
        "tokens": int(shard.lengths.sum()),
        "positions": shard.positions,
        "entries": entries,
        "target_bytes": target_bytes,
        "units": int(shard.lengths.sum()),
    }
    return tensors, counts


def decode_shard(data: bytes, *, mode: Mode, n_samples: int, vocab_size: int, origin: str) -> Shard:
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise CacheError(f"{origin}: not a readable shard: {err}") from None
    lengths = tensors["lengths"].astype(np.int64)
    positions = int((lengths - 1).sum())
    if mode == "rskd":
        encoded = EncodedSets(tensors["rskd_words"], tensors["rskd_tables"])
        next_ids = next_tokens(tensors["input_ids"], lengths)
        num_unique, ids, counts = decode_sets(encoded, next_ids, n_samples, vocab_size)
        weights = tensors.get("rskd_weights")
        targets = ShardTargets(num_unique, ids, counts, weights, None, None)
    else:
        ids = tensors["topk_ids"].astype(np.int64)
        targets = ShardTargets(
            np.full(positions, ids.shape[1]), ids, None, None, tensors["topk_probs"], tensors["topk_tail"]
        )
    return Shard(tensors["input_ids"].astype(np.int64), lengths, targets)
