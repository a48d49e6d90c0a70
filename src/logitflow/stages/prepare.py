"""prepare: load, validate and split the corpus and the preference pairs (demo data by default).

Outputs (`paths.prepared`, one directory written atomically): corpus_{train,heldout}.parquet,
prefs_{train,heldout}.parquet, answer_key.parquet (demo data only) and report.json (row counts,
skipped bad rows by reason, content fingerprints of every split).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

from logitflow import tracking
from logitflow.config import Params
from logitflow.data.load import fingerprint, load_corpus, load_preferences, split_indices
from logitflow.data.schemas import BadRows
from logitflow.errors import DataError
from logitflow.fsio import atomic_directory, atomic_write_json, atomic_write_with

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"


def _write_parquet(dataset: datasets.Dataset, path: Path) -> None:
    datasets.disable_progress_bars()
    atomic_write_with(path, lambda tmp: dataset.to_parquet(str(tmp)))


def run(params: Params, root: Path) -> dict[str, Any]:
    section = params.prepare
    corpus_bad, prefs_bad = BadRows(), BadRows()
    corpus = load_corpus(section, corpus_bad, base_dir=root)
    prefs, answer_key = load_preferences(section, prefs_bad, base_dir=root)

    splits: dict[str, datasets.Dataset] = {}
    for name, dataset in (("corpus", corpus), ("prefs", prefs)):
        train, heldout = split_indices(len(dataset), section.heldout_fraction, section.seed)
        splits[f"{name}_train"], splits[f"{name}_heldout"] = dataset.select(train), dataset.select(heldout)
    if answer_key is not None:
        splits["answer_key"] = answer_key

    report: dict[str, Any] = {
        "sources": {"corpus": section.corpus.describe(), "preferences": section.preferences.describe()},
        "rows": {name: len(dataset) for name, dataset in splits.items()},
        "fingerprints": {name: fingerprint(dataset) for name, dataset in splits.items()},
        "bad_rows": {"corpus": corpus_bad.as_dict(), "preferences": prefs_bad.as_dict()},
        "corpus_characters": sum(len(text) for text in corpus["text"]),
    }
    out_dir = root / params.paths.prepared
    with atomic_directory(out_dir) as tmp:
        for name, dataset in splits.items():
            _write_parquet(dataset, tmp / f"{name}.parquet")
        atomic_write_json(tmp / REPORT_FILE, report)

    metrics = {
        **{f"rows_{name}": count for name, count in report["rows"].items()},
        "bad_rows_skipped": corpus_bad.total + prefs_bad.total,
        "corpus_characters": report["corpus_characters"],
    }
    atomic_write_json(root / params.paths.reports / "prepare.json", metrics)
    with tracking.start_run(params, root, stage="prepare"):
        tracking.log_metrics(metrics)
        tracking.log_dict(report, "prepare_report.json")
    for name, count in report["rows"].items():
        log.info("prepare: %-15s %6d rows", name, count)
    if corpus_bad.total + prefs_bad.total:
        log.warning("prepare: skipped %d bad rows (see %s)", corpus_bad.total + prefs_bad.total, out_dir / REPORT_FILE)
    return metrics


def read_split(params: Params, root: Path, name: str) -> datasets.Dataset:
    """One split written by this stage, e.g. `prefs_train`."""
    path = root / params.paths.prepared / f"{name}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: missing; run `logitflow stage prepare` first")
    return datasets.Dataset.from_parquet(str(path))
