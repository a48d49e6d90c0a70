"""score_prefs and select on a tiny reference policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logitflow.cache.ref_scores import load_scores
from logitflow.cache.shards import CacheError
from logitflow.config import load_params
from logitflow.data.tokenize import tokenize_pair
from logitflow.errors import DataError
from logitflow.models import load_materialized
from logitflow.stages import score_prefs, select
from logitflow.stages.prepare import read_split
from tests.conftest import set_params


@pytest.fixture
def scored_project(prepared_project: Path) -> Path:
    set_params(
        prepared_project, **{"score_prefs.pairs_per_shard": 8, "score_prefs.batch_pairs": 3, "select.budget": 10}
    )
    score_prefs.run(load_params(prepared_project / "params.yaml"), prepared_project)
    return prepared_project


def _direct(model, tokenizer, row, response: str, max_length: int, pooling: str):
    pair = tokenize_pair(tokenizer, row["prompt"], response, max_length)
    ids = torch.tensor([pair.input_ids])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logps = out.logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    token_logps = logps[pair.prompt_length - 1 :]
    hidden = out.hidden_states[-1][0]
    feature = hidden[-1] if pooling == "last" else hidden[pair.prompt_length :].mean(0)
    return token_logps, feature


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_scores_equal_a_direct_recomputation(prepared_project: Path, pooling: str) -> None:
    set_params(
        prepared_project,
        **{"score_prefs.pairs_per_shard": 8, "score_prefs.batch_pairs": 3, "score_prefs.pooling": pooling},
    )
    params = load_params(prepared_project / "params.yaml")
    score_prefs.run(params, prepared_project)
    policy = load_materialized(prepared_project / "models/policy")
    for split in ("train", "heldout"):
        scores = load_scores(score_prefs.scores_dir(params, prepared_project), split)
        rows = read_split(params, prepared_project, f"prefs_{split}")
        assert len(scores) == len(rows)
        for index in (0, len(rows) - 1):
            for side in ("chosen", "rejected"):
                token_logps, feature = _direct(
                    policy.model, policy.tokenizer, rows[index], rows[index][side], 64, pooling
                )
                stored_tokens = getattr(scores, f"{side}_token_logps")[index]
                assert torch.allclose(stored_tokens, token_logps, atol=1e-4)
                assert getattr(scores, f"{side}_logp")[index] == pytest.approx(float(token_logps.sum()), abs=1e-3)
                assert torch.allclose(getattr(scores, f"{side}_features")[index], feature, atol=1e-4)


def test_scores_refuse_another_policy_or_data(scored_project: Path) -> None:
    directory = scored_project / "cache/ref_scores"
    with pytest.raises(CacheError, match="made with policy_weights_sha256 = .* but this run needs 'other'"):
        load_scores(directory, "train", expect={"policy_weights_sha256": "other"})
    with pytest.raises(CacheError, match="no split 'test'"):
        load_scores(directory, "test")
    set_params(scored_project, **{"data.max_length": 48})
    with pytest.raises(CacheError, match="made with max_length = '64', but this run needs '48'"):
        select.run(load_params(scored_project / "params.yaml"), scored_project, "apo")


@pytest.mark.parametrize("method", ["uniform", "apo", "adpo", "adpo_plus"])
def test_select_writes_picks_metrics_and_curve(scored_project: Path, method: str) -> None:
    params = load_params(scored_project / "params.yaml")
    metrics = select.run(params, scored_project, method)
    output = json.loads(select.selection_path(params, scored_project, method).read_text())
    ids = set(read_split(params, scored_project, "prefs_train")["id"])
    picks = output["picks"]
    assert [p["rank"] for p in picks] == list(range(1, 11)) and len({p["pair_id"] for p in picks}) == 10
    assert {p["pair_id"] for p in picks} <= ids
    curve = (scored_project / "reports/select" / f"{method}.csv").read_text().splitlines()
    assert curve[0] == "budget,logdet" and len(curve) == 11
    values = [float(line.split(",")[1]) for line in curve[1:]]
    assert values == sorted(values) and metrics["fisher_logdet"] == pytest.approx(values[-1], abs=1e-3)


def test_budget_larger_than_pool_is_refused(scored_project: Path) -> None:
    set_params(scored_project, **{"select.budget": 10_000})
    with pytest.raises(DataError, match=r"select.budget = 10000 is larger than the training pool \(36 pairs\)"):
        select.run(load_params(scored_project / "params.yaml"), scored_project, "adpo_plus")


def test_duplicate_pairs_are_refused(scored_project: Path) -> None:
    import datasets

    params = load_params(scored_project / "params.yaml")
    rows = read_split(params, scored_project, "prefs_train").to_list()
    rows[5] = {**rows[2], "id": "copy-of-2"}
    datasets.Dataset.from_list(rows).to_parquet(str(scored_project / "data/prepared/prefs_train.parquet"))
    with pytest.raises(DataError, match=f"pairs '{rows[2]['id']}' and 'copy-of-2' are the same pair"):
        select.run(params, scored_project, "apo")


def test_score_pass_resumes_from_complete_shards(scored_project: Path) -> None:
    directory = scored_project / "cache/ref_scores"
    manifest_before = (directory / "manifest.json").read_bytes()
    shards = sorted(directory.glob("shard-*.safetensors"))
    assert len(shards) >= 3
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    (directory / "manifest.json").unlink()  # as if killed before the end
    shards[-1].unlink()
    score_prefs.run(load_params(scored_project / "params.yaml"), scored_project)
    assert {p.name: p.stat().st_mtime_ns for p in shards[:-1]} == kept, "complete shards were reused"
    assert (directory / "manifest.json").read_bytes() == manifest_before
