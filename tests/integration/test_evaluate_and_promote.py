"""evaluate scores every trained model on the same held-out data; promote moves `champion` when the
gate says so, and `models:/<name>@champion` loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from logitflow import tracking
from logitflow.cli import app
from logitflow.config import load_params
from logitflow.stages import STAGES
from tests.conftest import set_params


@pytest.fixture
def trained_project(prepared_project: Path) -> Path:
    set_params(prepared_project, **{"distill.losses": ["rskd", "ce"], "evaluate.generation_prompts": 6})
    params = load_params(prepared_project / "params.yaml")
    for mode in ("rskd", "topk"):
        STAGES["cache_teacher"](params, prepared_project, mode)
    STAGES["score_prefs"](params, prepared_project)
    for method in params.train_dpo.methods:
        STAGES["select"](params, prepared_project, method)
        STAGES["train_dpo"](params, prepared_project, method)
    for loss in params.distill.losses:
        STAGES["distill"](params, prepared_project, loss)
    return prepared_project


def test_evaluate_then_promote_then_load_champions(trained_project: Path) -> None:
    params = load_params(trained_project / "params.yaml")
    metrics = STAGES["evaluate"](params, trained_project)
    report = json.loads((trained_project / "reports/evaluate.json").read_text())
    assert set(report["policies"]) == {"reference", "uniform", "adpo_plus"}
    assert set(report["students"]) == {"teacher", "rskd", "ce"}
    reference = report["policies"]["reference"]
    assert reference["heldout_margin"] == 0.0 and reference["heldout_accuracy"] == 0.0  # policy == reference
    for values in report["policies"].values():
        assert 0.0 <= values["answer_success_rate"] <= 1.0
    for loss in ("rskd", "ce"):
        student = report["students"][loss]
        assert student["kl_to_teacher"] > 0 and student["generation_tokens_per_second"] > 0
    train_report = json.loads((trained_project / "reports/distill/rskd.json").read_text())
    assert report["students"]["rskd"]["lm_loss"] == pytest.approx(train_report["heldout_lm_loss"], rel=1e-4)
    assert len(report["heldout_fingerprints"]["prefs_heldout"]) == 64
    with (trained_project / "reports/evaluate/reliability_teacher.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 15
    assert metrics["mlflow_run_id"]

    set_params(trained_project, **{"promote.policy.floor": 0.0, "promote.student.floor": 100.0})
    runner = CliRunner()
    result = runner.invoke(app, ["promote", "all", "--params", str(trained_project / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert result.output.count("promoted") == 2
    again = runner.invoke(app, ["promote", "policy", "--params", str(trained_project / "params.yaml")])
    assert again.exit_code == 0 and "already_champion" in again.output
    missing = runner.invoke(
        app, ["promote", "student", "--version", "9", "--params", str(trained_project / "params.yaml")]
    )
    assert missing.exit_code == 2 and "version 9 of 'logitflow-student' does not exist" in missing.output

    for name in ("logitflow-policy", "logitflow-student"):
        components = mlflow.transformers.load_model(f"models:/{name}@champion", return_type="components")
        assert components["model"].config.vocab_size == len(components["tokenizer"])


SECTIONS = (
    "Held-out quality of each student",
    "Cache size",
    "Training curves",
    "Calibration",
    "Step time and gradient fidelity (benchmark)",
    "Information of the selected pairs",
    "Logit error vs budget (log-linear benchmark)",
    "DPO at equal budget",
    "DPO step cost (benchmark)",
)


def test_report_has_every_section_and_says_not_run_where_inputs_are_missing(prepared_project: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--params", str(prepared_project / "params.yaml")])
    assert result.exit_code == 0, result.output
    page = (prepared_project / "reports/report/index.html").read_text()
    for title in SECTIONS:
        assert title in page, title
    assert page.count("not run:") == len(SECTIONS)
    assert "dvc repro evaluate" in page and "make bench" in page


def test_report_after_the_pipeline_draws_what_ran(trained_project: Path) -> None:
    params = load_params(trained_project / "params.yaml")
    STAGES["evaluate"](params, trained_project)
    result = CliRunner().invoke(app, ["report", "--params", str(trained_project / "params.yaml")])
    assert result.exit_code == 0, result.output
    out = trained_project / "reports/report"
    page = (out / "index.html").read_text()
    assert page.count("not run:") == 3, "only the three benchmark sections are missing"
    for png in ("distill_curves", "reliability", "logdet_vs_budget"):
        assert f'src="{png}.png"' in page and (out / f"{png}.png").stat().st_size > 1000
    assert "<td>rskd</td>" in page and "<td>adpo_plus</td>" in page
    tracking.configure(params, trained_project)
    [run] = mlflow.search_runs(filter_string="tags.`logitflow.stage` = 'report'", output_format="list")
    logged = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "report")]
    assert "report/index.html" in logged and "report/reliability.png" in logged
