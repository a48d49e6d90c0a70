"""The promotion gate: its decision by hand, then against a real (temporary SQLite) MLflow registry."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from logitflow import tracking
from logitflow.config import GateSettings
from logitflow.errors import LogitflowError
from logitflow.promotion import decide

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


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("m")

    def add_version(metrics: dict[str, float], alias: str | None = "challenger") -> str:
        with mlflow.start_run() as run:
            mlflow.log_metrics(metrics)
        version = str(client.create_model_version("m", str(tmp_path / "artifact"), run.info.run_id).version)
        if alias:
            client.set_registered_model_alias("m", alias, version)
        return version

    yield client, add_version
    mlflow.set_tracking_uri(None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set_tracking_uri exports it


def _aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model("m").aliases.items()}


def test_gate_against_a_registry(registry) -> None:
    client, add_version = registry
    first = add_version({"acc": 0.4})
    result = tracking.promote("m", HIGHER)
    assert result.decision.outcome == "rejected" and "champion" not in _aliases(client)
    assert client.get_model_version("m", first).tags["promotion.decision"] == "rejected"

    second = add_version({"acc": 0.6})
    assert tracking.promote("m", HIGHER).decision.outcome == "promoted"
    assert _aliases(client)["champion"] == second
    assert tracking.promote("m", HIGHER).decision.outcome == "already_champion"

    third = add_version({"acc": 0.6})
    result = tracking.promote("m", HIGHER)
    assert result.decision.outcome == "rejected" and _aliases(client)["champion"] == second
    tags = client.get_model_version("m", third).tags
    assert tags["promotion.champion_value"] == "0.6" and tags["promotion.champion_version"] == second

    assert tracking.promote("m", HIGHER, force=True).decision.outcome == "promoted"
    assert _aliases(client)["champion"] == third
    assert tracking.promote("m", HIGHER, version=int(first), force=True).challenger_version == first


def test_bad_requests_leave_the_registry_unchanged(registry) -> None:
    client, add_version = registry
    version = add_version({"acc": 0.9}, alias=None)
    before = (_aliases(client), client.get_model_version("m", version).tags)
    with pytest.raises(LogitflowError, match="has no 'challenger' alias"):
        tracking.promote("m", HIGHER)
    with pytest.raises(LogitflowError, match=r"version 7 of 'm' does not exist \(versions: \[1\]\)"):
        tracking.promote("m", HIGHER, version=7)
    with pytest.raises(LogitflowError, match="gate metric 'loss' is not in run .* it has: acc"):
        tracking.promote("m", LOWER, version=int(version))
    with pytest.raises(LogitflowError, match="no registered model 'nope'"):
        tracking.promote("nope", HIGHER)
    assert (_aliases(client), client.get_model_version("m", version).tags) == before
