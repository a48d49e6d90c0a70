"""The promotion gate: its decision by hand, then against real registries: a temporary SQLite store
and an `mlflow server`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from logitflow import tracking
from logitflow.config import GateSettings
from logitflow.errors import LogitflowError
from logitflow.promotion import decide
from tests.helpers.net import free_port

HIGHER = GateSettings(metric="acc", direction="higher", margin=0.01, floor=0.5)
LOWER = GateSettings(metric="loss", direction="lower", margin=0.0, floor=3.0)


@pytest.mark.parametrize(
    ("challenger", "champion", "gate", "outcome", "phrase"),
    [
        (0.80, 0.70, HIGHER, "promoted", "beats"),
        (0.60, 0.70, HIGHER, "rejected", "is worse than"),
        (0.70, 0.70, HIGHER, "rejected", "ties"),
        (0.705, 0.70, HIGHER, "rejected", "within the margin"),
        (0.60, None, HIGHER, "promoted", "passes the floor"),
        (0.40, None, HIGHER, "rejected", "does not pass the floor"),
        (2.0, 2.5, LOWER, "promoted", "beats"),
        (2.6, 2.5, LOWER, "rejected", "is worse than"),
        (3.5, None, LOWER, "rejected", "does not pass the floor"),
        (math.nan, 0.7, HIGHER, "rejected", "NaN"),
    ],
)
def test_decide(challenger, champion, gate, outcome, phrase) -> None:
    decision = decide(challenger, champion, gate)
    assert decision.outcome == outcome and phrase in decision.reason


def test_forced_promotes_a_loser() -> None:
    assert decide(0.1, 0.9, HIGHER, force=True).outcome == "promoted"


def test_values_from_different_heldout_data_are_not_compared() -> None:
    decision = decide(0.9, 0.1, HIGHER, comparable=False)
    assert decision.outcome == "rejected" and "not comparable" in decision.reason
    assert decide(0.9, 0.1, HIGHER, comparable=False, force=True).promoted


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` (one worker) on 127.0.0.1, as a team would run it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(params=["sqlite", "server"])
def registry(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri = (
        f"sqlite:///{tmp_path / 'mlflow.db'}" if request.param == "sqlite" else request.getfixturevalue("mlflow_server")
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    name = f"m{uuid.uuid4().hex[:8]}"  # the server outlives one test
    # Its own experiment: not one left active by an earlier test, and no ./mlruns in the working directory.
    artifacts = (tmp_path / "artifacts").as_uri() if request.param == "sqlite" else None
    mlflow.set_experiment(experiment_id=client.create_experiment(name, artifact_location=artifacts))
    client.create_registered_model(name)
    (tmp_path / "model.txt").write_text("weights")

    def add_version(metrics: dict[str, float], alias: str | None = "challenger", heldout: str = "same") -> str:
        with mlflow.start_run(tags={tracking.HELDOUT_TAG: heldout}) as run:
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(tmp_path / "model.txt"), "model")
        source = f"{run.info.artifact_uri}/model"
        version = str(client.create_model_version(name, source, run.info.run_id).version)
        if alias:
            client.set_registered_model_alias(name, alias, version)
        return version

    yield client, add_version, name
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exports it


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_gate_against_a_registry(registry) -> None:
    client, add_version, m = registry
    first = add_version({"acc": 0.4})
    result = tracking.promote(m, HIGHER)
    assert result.decision.outcome == "rejected" and "champion" not in _aliases(client, m)
    assert client.get_model_version(m, first).tags["promotion.decision"] == "rejected"

    second = add_version({"acc": 0.6})
    assert tracking.promote(m, HIGHER).decision.outcome == "promoted"
    assert _aliases(client, m)["champion"] == second
    assert tracking.promote(m, HIGHER).decision.outcome == "already_champion"

    third = add_version({"acc": 0.6})
    result = tracking.promote(m, HIGHER)
    assert result.decision.outcome == "rejected" and _aliases(client, m)["champion"] == second
    tags = client.get_model_version(m, third).tags
    assert tags["promotion.champion_value"] == "0.6" and tags["promotion.champion_version"] == second

    other_data = add_version({"acc": 0.99}, heldout="other")
    result = tracking.promote(m, HIGHER)
    assert result.decision.outcome == "rejected" and "not comparable" in result.decision.reason
    assert _aliases(client, m)["champion"] == second
    client.set_registered_model_alias(m, "challenger", third)
    assert other_data != third
    assert tracking.promote(m, HIGHER, force=True).decision.outcome == "promoted"
    assert _aliases(client, m)["champion"] == third
    assert tracking.promote(m, HIGHER, version=int(first), force=True).challenger_version == first


def test_bad_requests_leave_the_registry_unchanged(registry) -> None:
    client, add_version, m = registry
    version = add_version({"acc": 0.9}, alias=None)
    before = (_aliases(client, m), client.get_model_version(m, version).tags)
    with pytest.raises(LogitflowError, match="has no 'challenger' alias"):
        tracking.promote(m, HIGHER)
    with pytest.raises(LogitflowError, match=rf"version 7 of '{m}' does not exist \(versions: \[1\]\)"):
        tracking.promote(m, HIGHER, version=7)
    with pytest.raises(LogitflowError, match="gate metric 'loss' is not in run .* it has: acc"):
        tracking.promote(m, LOWER, version=int(version))
    with pytest.raises(LogitflowError, match="no registered model 'nope'"):
        tracking.promote("nope", HIGHER)
    assert (_aliases(client, m), client.get_model_version(m, version).tags) == before
