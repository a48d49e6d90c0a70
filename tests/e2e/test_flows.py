"""The Prefect `pipeline` flow runs every stage through DVC on tiny models: DVC agrees afterwards
(nothing to rerun), MLflow has one parent run with a child per stage carrying the lineage tags, and
a run with overridden params becomes a DVC experiment without touching params.yaml."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import changed_params, distill_flow, pipeline, select_flow
from logitflow import tracking
from logitflow.config import load_params

REPO = Path(__file__).resolve().parents[2]
DVC = str(REPO / ".venv/bin/dvc")


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _dvc(root: Path, *args: str) -> str:
    result = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_changed_params_are_dotted_leaves() -> None:
    defaults = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    assert changed_params(defaults, {"a": {"b": 1, "c": [1, 3]}, "d": "y"}) == {"a.c": [1, 3], "d": "y"}
    assert changed_params(defaults, defaults) == {}
    assert changed_params({"m": None}, {"m": {"n": {"o": 1}}}) == {"m.n.o": 1}, "mappings become leaves"


@pytest.mark.slow
def test_pipeline_flow_then_dvc_agrees_and_mlflow_has_the_lineage(prefect_server, dvc_project: Path) -> None:
    subprocess.run(["git", "add", "-A"], cwd=dvc_project, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "tiny project"], cwd=dvc_project, check=True, capture_output=True)
    done = pipeline(project=str(dvc_project))
    assert done[:2] == ["prepare", "models"] and done[-1] == "evaluate" and "distill@rskd" in done
    assert "Data and pipelines are up to date" in _dvc(dvc_project, "status")
    assert "Running stage" not in _dvc(dvc_project, "repro")
    assert (dvc_project / "reports/report/index.html").is_file()
    assert distill_flow(project=str(dvc_project)) == [
        f"distill@{loss}" for loss in ("rskd", "topk", "topk_ghost", "ce")
    ]
    assert select_flow(project=str(dvc_project)) == [f"select@{m}" for m in ("uniform", "apo", "adpo", "adpo_plus")]
    assert "Data and pipelines are up to date" in _dvc(dvc_project, "status"), "family flows rerun nothing"

    params = load_params(dvc_project / "params.yaml")
    tracking.configure(params, dvc_project)
    flow_runs = "tags.`logitflow.stage` = 'flow' and tags.`logitflow.flow` = '{}'"
    [parent] = mlflow.search_runs(filter_string=flow_runs.format("pipeline"), output_format="list")
    [family] = mlflow.search_runs(filter_string=flow_runs.format("distill"), output_format="list")
    assert family.info.run_id != parent.info.run_id
    children = mlflow.search_runs(
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", output_format="list"
    )
    stages = {run.data.tags["logitflow.stage"] for run in children}
    assert all(run.data.tags["logitflow.flow"] == "pipeline" for run in children)
    assert {"cache_teacher", "select", "train_dpo", "distill", "evaluate", "report"} <= stages
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dvc_project, capture_output=True, text=True).stdout
    for run in [parent, *children]:
        assert run.data.tags["git.commit"] == commit.strip()
        assert run.data.tags["dvc.experiment"] == "workspace"
        assert run.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"] != "none"

    before = (dvc_project / "params.yaml").read_text()
    overridden = params.model_copy(update={"select": params.select.model_copy(update={"seed": 7})})
    [experiment] = pipeline(params=overridden, project=str(dvc_project))
    assert (dvc_project / "params.yaml").read_text() == before, "committed defaults unchanged"
    shown = json.loads(_dvc(dvc_project, "exp", "show", "--json"))
    names = [
        exp.get("name")
        for baseline in shown
        for exp in (baseline.get("experiments") or [])
        for exp in [exp.get("revs", [{}])[0]]
    ]
    assert experiment in names, shown
    runs = mlflow.search_runs(filter_string=f"tags.`dvc.experiment` = '{experiment}'", output_format="list")
    seeds = {r.data.params.get("select.seed") for r in runs if r.data.tags.get("logitflow.stage") == "select"}
    assert seeds == {"7"}, "the experiment's stage runs carry its effective params"
