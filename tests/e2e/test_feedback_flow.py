"""The `feedback` flow under a real (test) Prefect server, answered through Prefect's API as the UI
would: a, b and skip; an answer outside the form is refused; every answer is on disk before the
next question; a killed run's successor continues from the labels on disk without asking a pair
twice; θ̂ is refit at 1, 2, 4 labels; the collected set is a DVC-tracked preference dataset that
DPO then trains on as a DVC experiment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, set_params
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from flows.annotate import answer, find_open_run, open_question
from flows.feedback import feedback
from logitflow import tracking
from logitflow.config import DataSource, PrepareSection, load_params
from logitflow.data.load import load_preferences
from logitflow.data.schemas import BadRows
from logitflow.feedback.labels import LabelStore

LABELS = "data/feedback/default/labels.jsonl"


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _labels(root: Path) -> list:
    return LabelStore(root / LABELS).read()


def _answer_next(run_id, expected_number: int, choice: str, root: Path) -> dict:
    question = open_question(run_id, timeout_s=180)
    assert question is not None and question["number"] == expected_number
    assert len(_labels(root)) == expected_number - 1, "every earlier answer is on disk before the next question"
    answer(run_id, choice, annotator="test")
    return question


@pytest.mark.slow
def test_feedback_flow_answered_through_the_api_survives_a_kill(prefect_server: str, dvc_project: Path) -> None:
    root = dvc_project
    set_params(root, **{"feedback.demo": {"prompts": 24, "max_new_tokens": 12, "batch_size": 8}})
    set_params(root, **{"feedback.poll_interval_s": 0.2})
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "tiny project"], cwd=root, check=True, capture_output=True)

    # A first run in its own process, killed after two answers.
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.feedback", "--project", str(root), "--budget", "5"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        killed = find_open_run(timeout_s=240)
        asked = [_answer_next(killed, 1, "a", root), _answer_next(killed, 2, "skip", root)]
        deadline = time.monotonic() + 60
        while len(_labels(root)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert [r.answer for r in _labels(root)] == ["a", "skip"], "both answers survived the kill"

    # The next run continues at question 3; a bad answer is refused by the form.
    results: dict = {}
    params_before = (root / "params.yaml").read_text()
    thread = threading.Thread(target=lambda: results.update(feedback(project=str(root), budget=5, hand_off=True)))
    thread.start()
    try:
        run_id = find_open_run(exclude={killed}, timeout_s=240)
        question = open_question(run_id, timeout_s=180)
        assert question is not None and question["number"] == 3
        with pytest.raises(RuntimeError, match="Cannot resume.*not one of"):
            answer(run_id, "c")
        for number, choice in zip(range(3, 7), ["b", "a", "b", "a"], strict=True):
            asked.append(_answer_next(run_id, number, choice, root))
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive()

    records = _labels(root)
    assert [r.answer for r in records] == ["a", "skip", "b", "a", "b", "a"]
    pair_ids = [r.pair_id for r in records]
    assert len(set(pair_ids)) == len(pair_ids) == 6, "no pair asked twice across the restart"
    assert [q["pair_id"] for q in asked] == pair_ids
    assert [r.labels for r in records if r.refit] == [1, 2, 4], "θ̂ refit after 1, 2 and 4 labels (skips don't count)"
    assert results["labels"] == 5 and results["stopped"] == "label budget of 5 reached"
    assert results["theta_refits"] == [1, 2, 4]

    preferences = root / results["preferences"]
    assert (preferences.parent.parent / "dataset.dvc").is_file(), "the collected set is tracked by DVC"
    prepare = PrepareSection(preferences=DataSource(type="local", path=str(preferences)))
    loaded, _ = load_preferences(prepare, BadRows())
    assert len(loaded) == 5 and set(loaded["id"]) == {r.pair_id for r in records if r.answer != "skip"}
    first_label = loaded[0]
    pair = asked[0]
    assert (first_label["chosen"], first_label["rejected"]) == (pair["response_a"], pair["response_b"]), "a = A wins"

    # The hand-off: DPO on the collected set ran as a DVC experiment; params.yaml is unchanged.
    assert (root / "params.yaml").read_text() == params_before
    shown = json.loads(
        subprocess.run([str(REPO / ".venv/bin/dvc"), "exp", "show", "--json"], cwd=root, capture_output=True).stdout
    )
    [experiment] = [
        rev
        for baseline in shown
        for exp in (baseline.get("experiments") or [])
        for rev in exp.get("revs", [])[:1]
        if rev.get("name") == results["experiment"]
    ]
    [dpo] = [m["data"] for path, m in experiment["data"]["metrics"].items() if path.endswith("train_dpo/uniform.json")]
    assert dpo["pairs"] == 4, "DPO trained on the collected labels' train split (5 labels, 1 held out)"

    # Progress: one MLflow run for the session (continued after the kill) with a step per answer,
    # and the flow run's artifacts (progress bar, table of answers with the gain each pair was chosen for).
    params = load_params(root / "params.yaml")
    tracking.configure(params, root)
    [run] = mlflow.search_runs(filter_string="tags.`logitflow.stage` = 'feedback'", output_format="list")
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "gain")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in history] == pytest.approx([r.gain for r in records])
    assert run.data.metrics["labels"] == 5
    with get_client(sync_client=True) as client:
        [table] = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=["feedback-default-answers"]))
        )
        [progress] = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(
                key=ArtifactCollectionFilterKey(any_=["feedback-default-progress"])
            )
        )
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [row["pair"] for row in rows] == pair_ids and rows[0]["gain"] == round(records[0].gain, 4)
    assert float(progress.data) == 100.0
