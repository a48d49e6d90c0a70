from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from logitflow import tracking
from logitflow.config import load_params
from logitflow.models import load_pretrained


@pytest.fixture
def params(tiny_project: Path):
    return load_params(tiny_project / "params.yaml")


def test_embedded_store_is_absolute_sqlite_under_the_project(tiny_project: Path, params, monkeypatch) -> None:
    monkeypatch.chdir("/")
    target = tracking.resolve_target(params, tiny_project)
    assert target.tracking_uri == f"sqlite:///{tiny_project}/.mlflow/mlflow.db"
    assert target.artifact_root == (tiny_project / ".mlflow" / "artifacts").as_uri()


def test_dvc_temp_workspace_logs_to_the_main_repository(tmp_path: Path) -> None:
    assert tracking.shared_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12") == tmp_path
    assert tracking.shared_root(tmp_path / "sub") == tmp_path / "sub"


def test_environment_and_params_switch_to_a_server(tiny_project: Path, params, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_target(params, tiny_project).tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    data = yaml.safe_load((tiny_project / "params.yaml").read_text())
    data["tracking"]["uri"] = "http://127.0.0.1:5998"
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(data))
    server_params = load_params(tiny_project / "params.yaml")
    assert tracking.resolve_target(server_params, tiny_project) == tracking.TrackingTarget(
        "http://127.0.0.1:5998", None
    )


def test_flatten_params_respects_mlflow_limits() -> None:
    flat = tracking.flatten_params({"a": {"b": 1, "c": {"d": None}}, "long": "x" * 10_000, "empty": {}})
    assert flat["a.b"] == "1" and flat["a.c.d"] == "null" and flat["empty"] == "{}"
    assert len(flat["long"]) == 6000


def test_run_round_trip_with_nesting_metrics_and_model(tiny_project: Path, params, monkeypatch) -> None:
    with tracking.start_run(params, tiny_project, stage="parent") as parent:
        pass
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.info.run_id)
    loaded = load_pretrained(params.models.teacher)
    with tracking.start_run(params, tiny_project, stage="child", tags={"extra": "yes"}) as run:
        for step in range(3):
            tracking.log_metrics({"loss": 1.0 / (step + 1), "rewards/chosen": 0.5, "skip_nan": float("nan")}, step=step)
        tracking.log_dict({"a": 1}, "report.json")
        info = tracking.log_transformers_model(loaded.model, loaded.tokenizer, registered_model_name="logitflow-test")

    client = MlflowClient(tracking.resolve_target(params, tiny_project).tracking_uri)
    child = client.get_run(run.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["logitflow.stage"] == "child" and child.data.tags["extra"] == "yes"
    assert child.data.params["data.max_length"] == "64"
    assert child.data.params["models.teacher.tiny.hidden_size"] == "32"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3]
    assert "rewards/chosen" in child.data.metrics and "skip_nan" not in child.data.metrics
    artifacts = Path(child.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tiny_project / ".mlflow" / "artifacts")
    assert (artifacts / "report.json").is_file()

    (version,) = client.search_model_versions("name='logitflow-test'")
    assert version.run_id == run.info.run_id
    components = mlflow.transformers.load_model(info.model_uri, return_type="components")
    ids = loaded.tokenizer("hello", return_tensors="pt")["input_ids"]
    assert (components["model"](ids).logits - loaded.model(ids).logits).abs().max() < 1e-5
