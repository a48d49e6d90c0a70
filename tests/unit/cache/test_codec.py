"""The rANS codec round-trips every (id, count) set exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from logitflow.cache.codec import decode_sets, encode_sets


def _random_sets(rng: np.random.Generator, positions: int, vocab: int, n: int, shape: str):
    num_unique, ids, counts, next_ids = [], [], [], []
    for _ in range(positions):
        kind = shape if shape != "mixed" else rng.choice(["dominant", "uniform", "peaked", "edges"])
        if kind == "dominant":
            k = 1
        elif kind == "uniform":
            k = min(n, vocab)
        else:
            k = int(rng.integers(1, min(n, vocab) + 1))
        chosen = rng.choice(vocab, size=k, replace=False)
        if kind == "edges":
            chosen[0] = 0
            if k > 1:
                chosen[1] = vocab - 1
            chosen = np.unique(chosen)
            k = chosen.size
        chosen.sort()
        split = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.array([], int)
        row_counts = np.diff(np.concatenate([[0], split, [n]]))
        num_unique.append(k)
        ids.append(chosen)
        counts.append(row_counts)
        next_ids.append(rng.choice(chosen) if rng.random() < 0.7 else rng.integers(0, vocab))
    return (np.array(num_unique), np.concatenate(ids), np.concatenate(counts), np.array(next_ids))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    positions=st.integers(1, 40),
    vocab=st.sampled_from([2, 3, 17, 300, 49_152, 65_536, 131_072]),
    n=st.integers(1, 100),
    shape=st.sampled_from(["dominant", "uniform", "peaked", "edges", "mixed"]),
)
def test_round_trip_is_exact(seed: int, positions: int, vocab: int, n: int, shape: str) -> None:
    rng = np.random.default_rng(seed)
    num_unique, ids, counts, next_ids = _random_sets(rng, positions, vocab, n, shape)
    encoded = encode_sets(num_unique, ids, counts, next_ids, n, vocab)
    got_k, got_ids, got_counts = decode_sets(encoded, next_ids, n, vocab)
    np.testing.assert_array_equal(got_k, num_unique)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_counts, counts)


def test_typical_sets_cost_well_under_two_bytes_per_entry() -> None:
    rng = np.random.default_rng(0)
    vocab, n = 49_152, 50
    zipf = 1.0 / np.arange(1, vocab + 1) ** 1.1
    num_unique, ids, counts, next_ids = [], [], [], []
    for _ in range(3000):
        draws = rng.choice(vocab, size=n, p=zipf / zipf.sum())
        values, row_counts = np.unique(draws, return_counts=True)
        num_unique.append(values.size)
        ids.append(values)
        counts.append(row_counts)
        next_ids.append(draws[0])
    arrays = np.array(num_unique), np.concatenate(ids), np.concatenate(counts), np.array(next_ids)
    encoded = encode_sets(*arrays, n, vocab)
    assert encoded.nbytes / arrays[1].size < 2.0
    np.testing.assert_array_equal(decode_sets(encoded, arrays[3], n, vocab)[1], arrays[1])
