"""Lossless entropy coding of RS-KD (id, count) sets with rANS (`constriction`).

Per position the unique ids form a *set*, so they are sorted ascending and coded as gaps
(first gap = id + 1, then id_j − id_{j−1} ≥ 1); BPE vocabularies number tokens roughly by
frequency, so the gaps of frequent tokens are small. Each gap is split Elias-gamma style into a
bucket b = bit_length(gap), entropy-coded with a per-shard histogram chosen by the entry's index
in its position (min(j, 7): early gaps are small, late ones large), and b − 1 raw low bits (a
uniform model). Counts − 1 are entropy-coded with histograms chosen by the position's number of
unique ids (peaked positions have large counts). The number of unique ids K per position has its
own histogram. Histograms are stored beside the compressed words (a few hundred integers).

Decode order = K, gap buckets by context, low bits, counts by context; rANS is a stack, so
`encode` pushes them in the reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

GAP_CONTEXTS = 8
COUNT_CONTEXTS = 8
_model = constriction.stream.model
_AnsCoder = constriction.stream.stack.AnsCoder


@dataclass(frozen=True)
class EncodedSets:
    """What a shard stores for its RS-KD targets."""

    words: np.ndarray  # uint32 [W], the rANS stream
    k_hist: np.ndarray  # uint32 [n_samples]: histogram of K − 1
    gap_hist: np.ndarray  # uint32 [GAP_CONTEXTS, max_bucket + 1]
    count_hist: np.ndarray  # uint32 [COUNT_CONTEXTS, n_samples]: histograms of count − 1

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.k_hist.nbytes + self.gap_hist.nbytes + self.count_hist.nbytes


def _bit_length(values: np.ndarray) -> np.ndarray:
    """bit_length of positive integers, exactly (frexp's exponent)."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _entry_layout(num_unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each entry: its index j within its position, and its position's K."""
    starts = np.cumsum(num_unique) - num_unique
    index_in_position = np.arange(int(num_unique.sum())) - np.repeat(starts, num_unique)
    return index_in_position, np.repeat(num_unique, num_unique)


def _count_context(k_per_entry: np.ndarray) -> np.ndarray:
    return np.minimum(_bit_length(k_per_entry - 1), COUNT_CONTEXTS - 1)  # ceil(log2 K)


def _categorical(hist: np.ndarray):
    return _model.Categorical(hist.astype(np.float64), perfect=False)


def _encode_with(coder, symbols: np.ndarray, hist: np.ndarray) -> None:
    if symbols.size and hist.size > 1:
        coder.encode_reverse(symbols.astype(np.int32), _categorical(hist))


def _decode_with(coder, count: int, hist: np.ndarray) -> np.ndarray:
    if count == 0 or hist.size == 1:
        return np.zeros(count, dtype=np.int64)
    return coder.decode(_categorical(hist), count).astype(np.int64)


def encode_sets(num_unique: np.ndarray, ids: np.ndarray, counts: np.ndarray, n_samples: int, vocab_size: int) -> EncodedSets:
    """num_unique: [P] ≥ 1; ids: [E] ascending within each position; counts: [E] ≥ 1, summing to
    n_samples per position; E = Σ num_unique."""
    num_unique = num_unique.astype(np.int64)
    ids, counts = ids.astype(np.int64), counts.astype(np.int64)
    index_in_position, k_per_entry = _entry_layout(num_unique)
    previous = np.where(index_in_position == 0, -1, np.roll(ids, 1))
    gaps = ids - previous
    if gaps.size and gaps.min() < 1:
        raise ValueError("ids must be strictly ascending within each position")
    buckets = _bit_length(gaps)
    gap_context = np.minimum(index_in_position, GAP_CONTEXTS - 1)
    count_context = _count_context(k_per_entry)
    max_bucket = int(_bit_length(np.array([vocab_size]))[0])

    k_hist = np.bincount(num_unique - 1, minlength=n_samples).astype(np.uint32)
    gap_hist = np.zeros((GAP_CONTEXTS, max_bucket + 1), dtype=np.uint32)
    np.add.at(gap_hist, (gap_context, buckets), 1)
    count_hist = np.zeros((COUNT_CONTEXTS, n_samples), dtype=np.uint32)
    np.add.at(count_hist, (count_context, counts - 1), 1)

    coder = _AnsCoder()
    for context in reversed(range(COUNT_CONTEXTS)):
        _encode_with(coder, counts[count_context == context] - 1, count_hist[context])
    sizes = np.left_shift(1, buckets - 1)
    raw = sizes >= 2
    if raw.any():
        coder.encode_reverse((gaps - sizes)[raw].astype(np.int32), _model.Uniform(), sizes[raw].astype(np.int32))
    for context in reversed(range(GAP_CONTEXTS)):
        _encode_with(coder, buckets[gap_context == context], gap_hist[context])
    _encode_with(coder, num_unique - 1, k_hist)
    return EncodedSets(coder.get_compressed().astype(np.uint32), k_hist, gap_hist, count_hist)


def decode_sets(encoded: EncodedSets, num_positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode_sets`: (num_unique [P], ids [E], counts [E]) as int64."""
    coder = _AnsCoder(encoded.words.astype(np.uint32))
    num_unique = _decode_with(coder, num_positions, encoded.k_hist) + 1
    index_in_position, k_per_entry = _entry_layout(num_unique)
    gap_context = np.minimum(index_in_position, GAP_CONTEXTS - 1)
    buckets = np.zeros(index_in_position.size, dtype=np.int64)
    for context in range(GAP_CONTEXTS):
        mask = gap_context == context
        buckets[mask] = _decode_with(coder, int(mask.sum()), encoded.gap_hist[context])
    sizes = np.left_shift(1, buckets - 1)
    gaps = sizes.copy()
    raw = sizes >= 2
    if raw.any():
        gaps[raw] += coder.decode(_model.Uniform(), sizes[raw].astype(np.int32)).astype(np.int64)
    running = np.cumsum(gaps)
    starts = np.cumsum(num_unique) - num_unique
    ids = running - np.repeat(running[starts] - gaps[starts], num_unique) - 1
    count_context = _count_context(k_per_entry)
    counts = np.zeros(index_in_position.size, dtype=np.int64)
    for context in range(COUNT_CONTEXTS):
        mask = count_context == context
        counts[mask] = _decode_with(coder, int(mask.sum()), encoded.count_hist[context]) + 1
    return num_unique, ids, counts
