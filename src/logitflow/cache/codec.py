"""Lossless entropy coding of RS-KD (id, count) sets with rANS (`constriction`).

What a position stores is a *set* of unique ids with counts summing to N. The coder exploits:

1. The true next token (known to the decoder: it is the next input id) is in the set at ~3 of 4
   positions. A flag says whether it is; if so it is removed from the id list and its count is
   coded on its own (it is usually the largest).
2. The remaining ids, sorted ascending, are coded as gaps (first gap = id + 1). BPE vocabularies
   number tokens roughly by frequency, so gaps are small at the start of a set. Each gap is split
   into a symbol (its bit length and the bit below the leading one) and raw low bits (uniform).
   Symbols are entropy-coded by context: the entry's relative place in its set and the set size.
3. Counts − 1 are entropy-coded by context (set size, gap bit length); the last count of each set
   is implied by the sum N and not stored.

Per-shard histograms (the static models) are stored zlib-compressed beside the rANS words.
Decode order: flags, K, gap symbols, low bits, true-token counts, other counts; rANS is a stack,
so `encode_sets` pushes them in reverse.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import constriction
import numpy as np

SIZE_BUCKETS = 8  # set sizes grouped by ceil(log2 K)
PLACE_BUCKETS = 8  # relative place j / K of an entry in its set
GAP_BITS_CAP = 15  # gap bit lengths above this share a count context
_model = constriction.stream.model
_AnsCoder = constriction.stream.stack.AnsCoder


def _bit_length(values: np.ndarray) -> np.ndarray:
    """bit_length of non-negative integers, exactly (frexp's exponent); bit_length(0) = 0."""
    return np.frexp(np.asarray(values, dtype=np.float64))[1].astype(np.int64)


def _size_bucket(k: np.ndarray) -> np.ndarray:
    return np.minimum(_bit_length(k - 1), SIZE_BUCKETS - 1)  # ceil(log2 K)


@dataclass(frozen=True)
class Tables:
    """Per-shard histograms: the static entropy models."""

    flag: np.ndarray  # [2]
    size: np.ndarray  # [2, N]: K − 1 given the flag
    gap: np.ndarray  # [PLACE_BUCKETS * SIZE_BUCKETS, 2 * (max_bits + 1)]
    true_count: np.ndarray  # [SIZE_BUCKETS, N]
    count: np.ndarray  # [SIZE_BUCKETS * (GAP_BITS_CAP + 1), N]

    @staticmethod
    def empty(n_samples: int, vocab_size: int) -> Tables:
        max_bits = int(_bit_length(np.array([vocab_size]))[0])
        zeros = lambda *shape: np.zeros(shape, dtype=np.uint32)  # noqa: E731
        return Tables(
            zeros(2),
            zeros(2, n_samples),
            zeros(PLACE_BUCKETS * SIZE_BUCKETS, 2 * (max_bits + 1)),
            zeros(SIZE_BUCKETS, n_samples),
            zeros(SIZE_BUCKETS * (GAP_BITS_CAP + 1), n_samples),
        )

    def pack(self) -> np.ndarray:
        raw = np.concatenate([t.ravel() for t in (self.flag, self.size, self.gap, self.true_count, self.count)])
        return np.frombuffer(zlib.compress(raw.astype("<u4").tobytes(), 9), dtype=np.uint8)

    @staticmethod
    def unpack(packed: np.ndarray, n_samples: int, vocab_size: int) -> Tables:
        template = Tables.empty(n_samples, vocab_size)
        flat = np.frombuffer(zlib.decompress(packed.tobytes()), dtype="<u4").astype(np.uint32)
        parts, offset = [], 0
        for table in (template.flag, template.size, template.gap, template.true_count, template.count):
            parts.append(flat[offset : offset + table.size].reshape(table.shape))
            offset += table.size
        if offset != flat.size:
            raise ValueError("codec tables do not match n_samples / vocab_size")
        return Tables(*parts)


@dataclass(frozen=True)
class EncodedSets:
    words: np.ndarray  # uint32 [W], the rANS stream
    tables: np.ndarray  # uint8, zlib-compressed histograms

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.tables.nbytes


@dataclass(frozen=True)
class _Layout:
    """Where every non-true entry sits: its position, its index j in the rest list, contexts."""

    position: np.ndarray
    index: np.ndarray
    is_last: np.ndarray
    gap_context: np.ndarray


def _layout(rest_sizes: np.ndarray) -> _Layout:
    starts = np.cumsum(rest_sizes) - rest_sizes
    position = np.repeat(np.arange(rest_sizes.size), rest_sizes)
    index = np.arange(int(rest_sizes.sum())) - np.repeat(starts, rest_sizes)
    size = rest_sizes[position]
    place = np.minimum(index * PLACE_BUCKETS // np.maximum(size, 1), PLACE_BUCKETS - 1)
    return _Layout(position, index, index == size - 1, place * SIZE_BUCKETS + _size_bucket(size))


def _gap_symbols(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gap ≥ 1 -> (symbol = 2·bits + second-highest bit, raw low bits, raw alphabet size)."""
    bits = _bit_length(gaps)
    low_bits = np.maximum(bits - 2, 0)
    second = np.where(bits >= 2, (gaps >> low_bits) & 1, 0)
    return bits * 2 + second, gaps & ((1 << low_bits) - 1), 1 << low_bits


def _count_context(sizes: np.ndarray, gap_symbols: np.ndarray) -> np.ndarray:
    return _size_bucket(sizes) * (GAP_BITS_CAP + 1) + np.minimum(gap_symbols // 2, GAP_BITS_CAP)


def _push(coder, symbols: np.ndarray, contexts: np.ndarray | None, table: np.ndarray) -> None:
    table2d = table.reshape(-1, table.shape[-1])
    contexts = np.zeros(symbols.size, dtype=np.int64) if contexts is None else contexts
    np.add.at(table2d, (contexts, symbols), 1)
    for context in reversed(range(table2d.shape[0])):
        chosen = symbols[contexts == context]
        if chosen.size and table2d.shape[1] > 1:
            coder.encode_reverse(
                chosen.astype(np.int32), _model.Categorical(table2d[context].astype(np.float64), perfect=False)
            )


def _pop(coder, contexts: np.ndarray, table: np.ndarray) -> np.ndarray:
    table2d = table.reshape(-1, table.shape[-1])
    out = np.zeros(contexts.size, dtype=np.int64)
    for context in range(table2d.shape[0]):
        mask = contexts == context
        count = int(mask.sum())
        if count and table2d.shape[1] > 1:
            model = _model.Categorical(table2d[context].astype(np.float64), perfect=False)
            out[mask] = coder.decode(model, count)
    return out


def encode_sets(
    num_unique: np.ndarray,
    ids: np.ndarray,
    counts: np.ndarray,
    next_ids: np.ndarray,
    n_samples: int,
    vocab_size: int,
) -> EncodedSets:
    """num_unique: [P] ≥ 1; ids: [E] strictly ascending within each position; counts: [E] ≥ 1,
    summing to n_samples per position; next_ids: [P], the true next token of each position."""
    num_unique, ids, counts = (np.asarray(a, dtype=np.int64) for a in (num_unique, ids, counts))
    positions = np.repeat(np.arange(num_unique.size), num_unique)
    is_true = ids == np.asarray(next_ids, dtype=np.int64)[positions]
    has_true = np.zeros(num_unique.size, dtype=np.int64)
    has_true[positions[is_true]] = 1
    true_count = np.zeros(num_unique.size, dtype=np.int64)
    true_count[positions[is_true]] = counts[is_true]

    rest_ids, rest_counts = ids[~is_true], counts[~is_true]
    rest_sizes = num_unique - has_true
    layout = _layout(rest_sizes)
    previous = np.where(layout.index == 0, -1, np.roll(rest_ids, 1))
    gaps = rest_ids - previous
    if gaps.size and gaps.min() < 1:
        raise ValueError("ids must be strictly ascending within each position")
    symbols, low, low_sizes = _gap_symbols(gaps)

    tables = Tables.empty(n_samples, vocab_size)
    coder = _AnsCoder()
    coded = ~layout.is_last  # the last count of each rest list is implied by the sum
    _push(coder, rest_counts[coded] - 1, _count_context(num_unique[layout.position], symbols)[coded], tables.count)
    explicit_true = (has_true == 1) & (rest_sizes > 0)  # alone in its set, the true count is N
    _push(coder, true_count[explicit_true] - 1, _size_bucket(num_unique[explicit_true]), tables.true_count)
    raw = low_sizes >= 2
    if raw.any():
        coder.encode_reverse(low[raw].astype(np.int32), _model.Uniform(), low_sizes[raw].astype(np.int32))
    _push(coder, symbols, layout.gap_context, tables.gap)
    _push(coder, num_unique - 1, has_true, tables.size)
    _push(coder, has_true, None, tables.flag)
    return EncodedSets(coder.get_compressed().astype(np.uint32), tables.pack())


def decode_sets(
    encoded: EncodedSets, next_ids: np.ndarray, n_samples: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode_sets`: (num_unique [P], ids [E], counts [E]), ids ascending per position."""
    tables = Tables.unpack(encoded.tables, n_samples, vocab_size)
    next_ids = np.asarray(next_ids, dtype=np.int64)
    coder = _AnsCoder(encoded.words.astype(np.uint32))
    has_true = _pop(coder, np.zeros(next_ids.size, dtype=np.int64), tables.flag)
    num_unique = _pop(coder, has_true, tables.size) + 1
    rest_sizes = num_unique - has_true
    layout = _layout(rest_sizes)
    symbols = _pop(coder, layout.gap_context, tables.gap)
    bits, second = symbols // 2, symbols % 2
    low_bits = np.maximum(bits - 2, 0)
    gaps = np.where(bits >= 2, (1 << (bits - 1)) | (second << low_bits), 1)
    raw = (1 << low_bits) >= 2
    if raw.any():
        gaps[raw] += coder.decode(_model.Uniform(), (1 << low_bits[raw]).astype(np.int32)).astype(np.int64)
    running = np.cumsum(gaps)
    before = np.zeros(rest_sizes.size, dtype=np.int64)  # cumulative gap total before each position
    before[1:] = np.cumsum(np.bincount(layout.position, weights=gaps, minlength=rest_sizes.size))[:-1].astype(np.int64)
    rest_ids = running - before[layout.position] - 1

    explicit_true = (has_true == 1) & (rest_sizes > 0)
    true_count = np.where(has_true == 1, n_samples, 0)
    true_count[explicit_true] = _pop(coder, _size_bucket(num_unique[explicit_true]), tables.true_count) + 1
    coded = ~layout.is_last
    rest_counts = np.zeros(rest_ids.size, dtype=np.int64)
    rest_counts[coded] = _pop(coder, _count_context(num_unique[layout.position], symbols)[coded], tables.count) + 1
    partial = np.bincount(layout.position[coded], weights=rest_counts[coded], minlength=rest_sizes.size)
    rest_counts[layout.is_last] = (n_samples - true_count - partial.astype(np.int64))[layout.position[layout.is_last]]

    # Merge the true token back into each set, keeping ids ascending.
    all_ids = np.concatenate([rest_ids, next_ids[has_true == 1]])
    all_counts = np.concatenate([rest_counts, true_count[has_true == 1]])
    owner = np.concatenate([layout.position, np.flatnonzero(has_true)])
    order = np.lexsort((all_ids, owner))
    return num_unique, all_ids[order], all_counts[order]
