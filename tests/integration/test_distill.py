"""distill on a tiny teacher: every loss trains from its cache, only the primary registers, a cache
from another teacher is refused, and an interrupted run resumes onto the same trajectory."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM

from logitflow import tracking
from logitflow.cache.shards import CacheError
from logitflow.config import load_params
from logitflow.stages import cache_teacher, distill, models
from logitflow.student import build_student
from logitflow.train.distill import LOSSES, DistillSettings, DistillTask
from logitflow.train.loop import train
from tests.conftest import set_params
from tests.helpers.torchrun import torchrun_logitflow

CPU = torch.device("cpu")


@pytest.fixture
def cached_project(prepared_project: Path) -> Path:
    params = load_params(prepared_project / "params.yaml")
    for mode in cache_teacher.MODES:
        cache_teacher.run(params, prepared_project, mode)
    return prepared_project


def test_every_loss_trains_and_only_the_primary_registers(cached_project: Path) -> None:
    params = load_params(cached_project / "params.yaml")
    results = {loss: distill.run(params, cached_project, loss) for loss in LOSSES}
    for loss, metrics in results.items():
        assert metrics["sequences"] == 8 and metrics["steps"] == 2, loss
        assert metrics["heldout_positions"] > 0
        assert 0.0 <= metrics["heldout_ece"] <= 1.0 and 0.0 <= metrics["heldout_top1_agreement"] <= 1.0
        assert metrics["heldout_kl_to_teacher"] > 0
        assert ("registered_version" in metrics) == (loss == "rskd")
        report = json.loads((cached_project / f"reports/distill/{loss}.json").read_text())
        assert report["heldout_lm_loss"] == pytest.approx(metrics["heldout_lm_loss"])
        model = AutoModelForCausalLM.from_pretrained(cached_project / f"models/student_{loss}")
        assert model.config.num_hidden_layers == 1
    assert results["ce"]["train_loss"] == pytest.approx(results["ce"]["train_lm_loss"])
    assert results["rskd"]["train_loss"] != pytest.approx(results["topk"]["train_loss"])
    with (cached_project / "reports/distill/rskd_reliability.csv").open() as handle:
        bins = list(csv.DictReader(handle))
    assert len(bins) == 15 and sum(float(b["count"]) for b in bins) == results["rskd"]["heldout_positions"]
    assert not list((cached_project / "checkpoints").glob("*")), "checkpoints are removed after success"

    tracking.configure(params, cached_project)
    client = MlflowClient()
    version = client.get_model_version_by_alias(distill.REGISTERED_STUDENT, "challenger")
    assert version.run_id == results["rskd"]["mlflow_run_id"]
    run = client.get_run(results["topk_ghost"]["mlflow_run_id"])
    assert run.data.tags["cache_mode"] == "topk" and "eval/kl_to_teacher" in run.data.metrics
    assert "cache_manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"teacher_cache_topk", "corpus_heldout"}
    manifest = json.loads((cached_project / "cache/teacher_topk/manifest.json").read_text())
    assert manifest["key_sha256"].startswith(inputs["teacher_cache_topk"].dataset.digest)


def test_cache_of_another_teacher_is_refused(cached_project: Path) -> None:
    set_params(cached_project, **{"models.teacher.tiny.seed": 7})
    params = load_params(cached_project / "params.yaml")
    models.run(params, cached_project)
    with pytest.raises(CacheError, match="another teacher"):
        distill.run(params, cached_project, "rskd")
    assert not (cached_project / "models/student_rskd").exists()


def test_interrupted_distillation_resumes_on_the_same_trajectory(cached_project: Path, tmp_path: Path) -> None:
    params = load_params(cached_project / "params.yaml")
    card = json.loads((cached_project / "models/teacher/logitflow_model.json").read_text())
    from logitflow.models import load_materialized

    teacher = load_materialized(cached_project / "models/teacher").model
    cache = distill.open_cache(params, cached_project, "rskd", card)
    settings = DistillSettings(loss="rskd", lr=1e-3, batch_size=2, checkpoint_every=1, seed=0)

    def run(checkpoints: Path, max_steps: int | None = None) -> list[dict]:
        student = build_student(teacher, params.distill.student, seed=0)
        task = DistillTask(cache, settings, pad_id=0, device=CPU, max_sequences=8)
        return train(
            student,
            task,
            settings,
            name="distill@rskd",
            autocast=contextlib.nullcontext,
            checkpoint_dir=checkpoints,
            max_steps=max_steps,
        )

    full = run(tmp_path / "a")
    assert len(full) == 4
    run(tmp_path / "b", max_steps=2)
    resumed = run(tmp_path / "b")
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]


@pytest.mark.slow
def test_stage_under_torchrun_with_two_gloo_processes_matches_one_process(cached_project: Path) -> None:
    params = load_params(cached_project / "params.yaml")
    single = distill.run(params, cached_project, "rskd")
    result = torchrun_logitflow(cached_project, "stage", "distill", "rskd")
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((cached_project / "reports/distill/rskd.json").read_text())
    assert double["registered_version"] == 2, "rank 0 registered once, after the single-process run's version 1"
    for key in ("train_loss", "heldout_lm_loss", "heldout_kl_to_teacher"):
        assert double[key] == pytest.approx(single[key], rel=1e-4), key


@pytest.mark.slow
def test_fsdp_under_torchrun_resumes_a_killed_run_and_matches_one_process(
    cached_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `full`: the frozen teacher runs beside the sharded student in every process
    set_params(cached_project, **{"compute.distributed": "fsdp"})
    params = load_params(cached_project / "params.yaml")
    single = distill.run(params, cached_project, "full")  # one process, uninterrupted

    class Killed(Exception):
        pass

    def killed_after_one_step(*args, **kwargs):
        train(*args, **{**kwargs, "max_steps": 1})
        raise Killed

    monkeypatch.setattr(distill, "train", killed_after_one_step)
    with pytest.raises(Killed):
        distill.run(params, cached_project, "full")
    assert len(list((cached_project / "checkpoints").glob("distill_full_*/trainer_state.json"))) == 1
    result = torchrun_logitflow(cached_project, "stage", "distill", "full")  # resumes the checkpoint, sharded
    assert result.returncode == 0, result.stderr[-3000:]
    logged = " ".join(result.stderr.split())  # the console handler wraps long lines
    assert "resuming at step 1 of 2" in logged and "FSDP, the model sharded over 2 processes" in logged
    double = json.loads((cached_project / "reports/distill/full.json").read_text())
    assert double["steps"] == single["steps"] == 2
    for key in ("train_loss", "heldout_lm_loss", "heldout_kl_to_teacher", "heldout_ece"):
        assert double[key] == pytest.approx(single[key], rel=1e-4), key
    assert not list((cached_project / "checkpoints").glob("*")), "checkpoints are removed after success"
