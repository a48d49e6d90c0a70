"""Reading a teacher cache: random access by sequence index, padded training batches.

Shards are opened lazily, checked against the manifest's sha256, decoded whole (vectorised) and
kept in a small LRU, so a reader never loads the whole cache. The cache refuses a consumer whose
tokenizer or vocabulary differs from the teacher's.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from logitflow.cache.format import Manifest, Shard, decode_shard, read_manifest
from logitflow.cache.shards import CacheError, read_checked
from logitflow.ops.sparse_kd import SparseTargets


@dataclass(frozen=True)
class CacheBatch:
    """input_ids, attention_mask: [B, L]; targets: [B, L−1, K] (row t = distribution of token t+1);
    padded rows have all-zero probs. For Top-K caches `tail` [B, L−1] is the teacher's tail mass."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: SparseTargets
    tail: torch.Tensor | None


class TeacherCache:
    def __init__(
        self,
        directory: str | Path,
        *,
        expect_tokenizer_sha256: str | None = None,
        expect_vocab_size: int | None = None,
        max_open_shards: int = 2,
    ):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        key = self.manifest.key
        if expect_tokenizer_sha256 is not None and key.get("tokenizer_sha256") != expect_tokenizer_sha256:
            raise CacheError(
                f"{self.directory}: made with tokenizer {str(key.get('tokenizer_sha256'))[:12]}…, "
                f"but the student's tokenizer is {expect_tokenizer_sha256[:12]}…: the token ids would not match"
            )
        if expect_vocab_size is not None and self.manifest.vocab_size != expect_vocab_size:
            raise CacheError(
                f"{self.directory}: teacher vocabulary has {self.manifest.vocab_size} ids, "
                f"the student's has {expect_vocab_size}"
            )
        self._first_sequence = np.cumsum([0] + [s.counts["sequences"] for s in self.manifest.shards]).tolist()
        self._open: OrderedDict[int, tuple[Shard, np.ndarray, np.ndarray]] = OrderedDict()
        self._max_open = max_open_shards

    def __len__(self) -> int:
        return self.manifest.sequences

    @property
    def mode(self) -> str:
        return self.manifest.mode

    def lengths(self) -> np.ndarray:
        """Token count of every sequence [S], read from the shards' `lengths` tensors alone."""
        parts = []
        for entry in self.manifest.shards:
            try:
                with safe_open(self.directory / entry.file, framework="numpy") as handle:
                    parts.append(handle.get_tensor("lengths").astype(np.int64))
            except (OSError, SafetensorError) as err:
                raise CacheError(f"{self.directory / entry.file}: not a readable shard: {err}") from None
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _shard(self, index: int) -> tuple[Shard, np.ndarray, np.ndarray]:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        entry = self.manifest.shards[index]
        path = self.directory / entry.file
        data = read_checked(self.directory, entry)
        shard = decode_shard(
            data,
            mode=self.manifest.mode,
            n_samples=self.manifest.n_samples,
            vocab_size=self.manifest.vocab_size,
            origin=str(path),
        )
        token_starts = np.concatenate([[0], np.cumsum(shard.lengths)])
        entry_starts = np.concatenate([[0], np.cumsum(shard.targets.num_unique)])
        self._open[index] = (shard, token_starts, entry_starts)
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return self._open[index]

    def _locate(self, sequence: int) -> tuple[int, int]:
        if not 0 <= sequence < len(self):
            raise IndexError(f"sequence {sequence} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._first_sequence, sequence) - 1
        return shard, sequence - self._first_sequence[shard]

    def sequence(self, index: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(token ids [L], per-row target arrays): RS-KD → [ids, probs] as [L−1, K] each,
        Top-K → [ids, probs, tail]."""
        shard_index, local = self._locate(index)
        shard, token_starts, entry_starts = self._shard(shard_index)
        ids = shard.input_ids[token_starts[local] : token_starts[local + 1]]
        first_row = int(token_starts[local] - local)  # each earlier sequence has L−1 rows
        rows = slice(first_row, first_row + len(ids) - 1)
        targets = shard.targets
        if self.manifest.mode == "topk":
            assert targets.topk_probs is not None and targets.tail is not None
            return ids, [
                targets.ids[rows],
                targets.topk_probs[rows].astype(np.float32),
                targets.tail[rows].astype(np.float32),
            ]
        k = targets.num_unique[rows]
        lo, hi = int(entry_starts[rows.start]), int(entry_starts[rows.stop])
        width = int(k.max()) if k.size else 0
        slot = np.arange(hi - lo) - np.repeat(entry_starts[rows.start : rows.stop] - lo, k)
        row_of = np.repeat(np.arange(len(k)), k)
        dense_ids = np.zeros((len(k), width), dtype=np.int64)
        dense_probs = np.zeros((len(k), width), dtype=np.float32)
        dense_ids[row_of, slot] = targets.ids[lo:hi]
        if targets.weights is not None:
            dense_probs[row_of, slot] = targets.weights[lo:hi].astype(np.float32)
            dense_probs /= dense_probs.sum(-1, keepdims=True).clip(min=np.finfo(np.float32).tiny)
        else:
            assert targets.counts is not None
            dense_probs[row_of, slot] = targets.counts[lo:hi] / self.manifest.n_samples
        return ids, [dense_ids, dense_probs]

    def batch(self, indices: list[int], pad_id: int = 0) -> CacheBatch:
        """Sequences padded on the right to the longest; targets padded to the widest row."""
        items = [self.sequence(i) for i in indices]
        length = max(len(ids) for ids, _ in items)
        width = max(parts[0].shape[1] for _, parts in items)
        input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        target_ids = torch.zeros((len(items), length - 1, width), dtype=torch.long)
        target_probs = torch.zeros((len(items), length - 1, width), dtype=torch.float32)
        tail = torch.zeros((len(items), length - 1)) if self.manifest.mode == "topk" else None
        for row, (ids, parts) in enumerate(items):
            n, k = parts[0].shape
            input_ids[row, : len(ids)] = torch.from_numpy(ids)
            mask[row, : len(ids)] = 1
            target_ids[row, :n, :k] = torch.from_numpy(parts[0])
            target_probs[row, :n, :k] = torch.from_numpy(parts[1])
            if tail is not None:
                tail[row, :n] = torch.from_numpy(parts[2])
        return CacheBatch(input_ids, mask, SparseTargets(target_ids, target_probs), tail)
