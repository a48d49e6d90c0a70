"""The prepare and models stages end to end on a tiny setup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from logitflow import tracking
from logitflow.config import load_params
from logitflow.errors import DataError
from logitflow.models import load_materialized, read_model_card
from logitflow.stages import models as models_stage
from logitflow.stages import prepare
from logitflow.stages.prepare import read_split


def test_prepare_writes_splits_report_metrics_and_a_run(tiny_project: Path) -> None:
    params = load_params(tiny_project / "params.yaml")
    metrics = prepare.run(params, tiny_project)
    assert metrics["rows_prefs_train"] + metrics["rows_prefs_heldout"] == 40
    assert metrics["rows_corpus_train"] + metrics["rows_corpus_heldout"] == 6
    report = json.loads((tiny_project / "data/prepared/report.json").read_text())
    assert set(report["fingerprints"]) == {
        "corpus_train",
        "corpus_heldout",
        "prefs_train",
        "prefs_heldout",
        "answer_key",
    }
    train, heldout = read_split(params, tiny_project, "prefs_train"), read_split(params, tiny_project, "prefs_heldout")
    assert not set(train["id"]) & set(heldout["id"])
    assert json.loads((tiny_project / "reports/prepare.json").read_text()) == metrics
    runs = MlflowClient(tracking.resolve_target(params, tiny_project).tracking_uri).search_runs(
        [tracking.configure(params, tiny_project)]
    )
    assert [r.data.tags["logitflow.stage"] for r in runs] == ["prepare"]

    first = (tiny_project / "data/prepared/prefs_train.parquet").read_bytes()
    prepare.run(params, tiny_project)
    assert (tiny_project / "data/prepared/prefs_train.parquet").read_bytes() == first, "deterministic"


def test_prepare_bad_input_keeps_previous_output(tiny_project: Path) -> None:
    params = load_params(tiny_project / "params.yaml")
    prepare.run(params, tiny_project)
    before = {p.name: p.read_bytes() for p in (tiny_project / "data/prepared").iterdir()}

    (tiny_project / "prefs.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    data = yaml.safe_load((tiny_project / "params.yaml").read_text())
    data["prepare"]["preferences"] = {"type": "local", "path": "prefs.jsonl"}
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match="prefs.jsonl line 2, field 'chosen': missing field"):
        prepare.run(load_params(tiny_project / "params.yaml"), tiny_project)
    assert {p.name: p.read_bytes() for p in (tiny_project / "data/prepared").iterdir()} == before


def test_prepare_skips_and_reports_bad_rows(tiny_project: Path) -> None:
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)] + [{"prompt": "q", "chosen": ""}]
    (tiny_project / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = yaml.safe_load((tiny_project / "params.yaml").read_text())
    data["prepare"]["preferences"] = {"type": "local", "path": "prefs.jsonl"}
    data["prepare"]["on_bad_rows"] = "skip"
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(data))
    metrics = prepare.run(load_params(tiny_project / "params.yaml"), tiny_project)
    assert metrics["bad_rows_skipped"] == 1 and "rows_answer_key" not in metrics
    report = json.loads((tiny_project / "data/prepared/report.json").read_text())
    assert report["bad_rows"]["preferences"]["examples"] == ["prefs.jsonl line 11, field 'chosen': empty"]


def test_models_stage_materialises_once_and_links_identical_specs(tiny_project: Path) -> None:
    params = load_params(tiny_project / "params.yaml")
    metrics = models_stage.run(params, tiny_project)
    teacher, policy = tiny_project / "models/teacher", tiny_project / "models/policy"
    assert metrics["teacher_parameters"] == metrics["policy_parameters"] > 0
    assert os.stat(teacher / "model.safetensors").st_ino == os.stat(policy / "model.safetensors").st_ino
    assert read_model_card(policy) == read_model_card(teacher)
    assert load_materialized(policy).tokenizer.chat_template
