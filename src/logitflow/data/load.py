"""Load a corpus, preference pairs or an unlabelled pair pool as validated `datasets.Dataset`s,
split them deterministically and fingerprint their content."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import datasets
import torch

from logitflow.config import DataSource, PrepareSection
from logitflow.data import demo
from logitflow.data.records import read_records
from logitflow.data.schemas import (
    BadRows,
    check_unique_ids,
    corpus_normaliser,
    pool_normaliser,
    preference_normaliser,
    validate_records,
)
from logitflow.errors import DataError


def _to_dataset(rows: list[dict[str, Any]], source: DataSource, what: str) -> datasets.Dataset:
    if not rows:
        raise DataError(f"{source.describe()}: no usable {what} rows")
    return datasets.Dataset.from_list(rows)


def load_corpus(
    section: PrepareSection, bad_rows: BadRows, base_dir: str | os.PathLike[str] = "."
) -> datasets.Dataset:
    source = section.corpus
    if source.type == "demo":
        rows = [{"text": text} for text in demo.corpus_documents(section.demo.corpus_documents)]
    else:
        records = read_records(source, base_dir)
        rows = validate_records(records, corpus_normaliser(section.text_field), section.on_bad_rows, bad_rows)
    return _to_dataset(rows, source, "corpus")


def load_preferences(
    section: PrepareSection, bad_rows: BadRows, base_dir: str | os.PathLike[str] = "."
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Preference pairs in normal form, and the answer key when the source has one (demo)."""
    source = section.preferences
    if source.type == "demo":
        rows, key = demo.demo_preferences(section.demo.preference_pairs, list(section.demo.tasks), section.seed)
        return _to_dataset(rows, source, "preference"), datasets.Dataset.from_list(key)
    records = read_records(source, base_dir)
    normalise = preference_normaliser(section.preference_format)
    rows = validate_records(records, normalise, section.on_bad_rows, bad_rows)
    check_unique_ids(rows, source.describe())
    return _to_dataset(rows, source, "preference"), None


def load_pool(
    source: DataSource,
    on_bad_rows: Literal["error", "skip"],
    bad_rows: BadRows,
    base_dir: str | os.PathLike[str] = ".",
) -> datasets.Dataset:
    rows = validate_records(read_records(source, base_dir), pool_normaliser(), on_bad_rows, bad_rows)
    check_unique_ids(rows, source.describe())
    return _to_dataset(rows, source, "pool")


def split_indices(n: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/held-out split of `n` rows: a seeded permutation, both parts sorted."""
    if n < 2:
        raise DataError(f"need at least 2 rows to split into train and held-out, got {n}")
    heldout = min(max(1, round(n * heldout_fraction)), n - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    return sorted(order[heldout:]), sorted(order[:heldout])


def fingerprint(dataset: datasets.Dataset) -> str:
    """sha256 of the rows' canonical JSON: equal content ⇔ equal fingerprint."""
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
