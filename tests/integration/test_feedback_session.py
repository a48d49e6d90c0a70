"""A labelling session on a tiny model: the demo pool, the reference scores, the ActiveSelector with
its refit schedule, replay from disk after a restart, export as a preference dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import set_params

from logitflow.config import DataSource, PrepareSection, load_params
from logitflow.data.load import load_preferences
from logitflow.data.pool import read_pool
from logitflow.data.schemas import BadRows
from logitflow.errors import DataError
from logitflow.feedback.pool_scores import score_pool
from logitflow.feedback.session import open_session
from logitflow.stages import STAGES
from logitflow.stages.pool import read_answer_key


@pytest.fixture
def pool_project(prepared_project: Path) -> Path:
    set_params(prepared_project, **{"feedback.demo": {"prompts": 16, "max_new_tokens": 10, "batch_size": 8}})
    STAGES["pool"](load_params(prepared_project / "params.yaml"), prepared_project)
    return prepared_project


def _open(root: Path):
    params = load_params(root / "params.yaml")
    pool = read_pool(root / params.paths.pool)
    return open_session(params, root, pool, score_pool(params, root, pool))


def test_demo_pool_is_reproducible_and_has_an_answer_key(pool_project: Path) -> None:
    params = load_params(pool_project / "params.yaml")
    first = json.loads((pool_project / "data/pool/manifest.json").read_text())
    assert first["rows"] == 16 - json.loads((pool_project / "reports/pool.json").read_text())["dropped_equal_or_empty"]
    pool = read_pool(pool_project / params.paths.pool)
    assert set(read_answer_key(params, pool_project)) == set(pool.pairs["id"])
    STAGES["pool"](params, pool_project)
    assert json.loads((pool_project / "data/pool/manifest.json").read_text())["fingerprint"] == first["fingerprint"]


def test_refits_follow_the_label_count_and_a_restart_replays_to_the_same_state(pool_project: Path) -> None:
    session = _open(pool_project)
    answers = ["a", "skip", "b", "a", "skip", "b", "a"]
    for answer in answers:
        record = session.answer(session.next_question(), answer)  # type: ignore[arg-type]
        assert record.refit == (record.labels in (1, 2, 4) and answer != "skip")
    assert session.selector.refits == [1, 2, 4] and session.labels == 5

    restarted = _open(pool_project)
    assert [r.pair_id for r in restarted.records] == [r.pair_id for r in session.records]
    assert restarted.selector.refits == [1, 2, 4]
    assert torch.equal(restarted.selector.theta, session.selector.theta)
    assert restarted.logdet == pytest.approx(session.logdet, rel=1e-12)
    assert restarted.next_question() == session.next_question()

    asked = {r.pair_id for r in restarted.records}
    while (question := restarted.next_question()) is not None:
        assert question.pair_id not in asked, "never the same pair twice"
        asked.add(question.pair_id)
        restarted.answer(question, "a")
    assert asked == set(read_pool(pool_project / "data/pool").pairs["id"])


def test_only_the_open_question_can_be_answered(pool_project: Path) -> None:
    session = _open(pool_project)
    question = session.next_question()
    session.answer(question, "a")
    with pytest.raises(DataError, match="is not the open question"):
        session.answer(question, "b")
    assert len(session.store.read()) == 1


def test_labels_of_another_pool_are_refused(pool_project: Path) -> None:
    session = _open(pool_project)
    session.answer(session.next_question(), "a")
    set_params(pool_project, **{"feedback.demo.seed": 1})
    STAGES["pool"](load_params(pool_project / "params.yaml"), pool_project)
    with pytest.raises(DataError, match=r"session.json: session 'default' labels pool .* set feedback.session"):
        _open(pool_project)
    set_params(pool_project, **{"feedback.session": "second"})
    assert _open(pool_project).records == [], "a new session name starts a new campaign"


def test_the_export_loads_as_preferences(pool_project: Path) -> None:
    session = _open(pool_project)
    asked = []
    for answer in ["b", "skip", "a"]:
        question = session.next_question()
        asked.append(question)
        session.answer(question, answer)  # type: ignore[arg-type]
    path = session.export()
    loaded, _ = load_preferences(PrepareSection(preferences=DataSource(type="local", path=str(path))), BadRows())
    assert loaded["id"] == [asked[0].pair_id, asked[2].pair_id]
    assert (loaded[0]["chosen"], loaded[0]["rejected"]) == (asked[0].response_b, asked[0].response_a)
    assert (loaded[1]["chosen"], loaded[1]["rejected"]) == (asked[2].response_a, asked[2].response_b)
