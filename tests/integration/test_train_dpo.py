"""train_dpo on a tiny policy: trains, refuses mismatches, registers only the primary method."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from logitflow import tracking
from logitflow.config import load_params
from logitflow.errors import DataError, ParamsError
from logitflow.stages import score_prefs, select, train_dpo
from tests.conftest import set_params
from tests.helpers.torchrun import torchrun_logitflow


@pytest.fixture
def selected_project(prepared_project: Path) -> Path:
    params = load_params(prepared_project / "params.yaml")
    score_prefs.run(params, prepared_project)
    for method in ("uniform", "adpo_plus"):
        select.run(params, prepared_project, method)
    return prepared_project


def test_primary_registers_challenger_and_comparison_does_not(selected_project: Path) -> None:
    params = load_params(selected_project / "params.yaml")
    baseline = train_dpo.run(params, selected_project, "uniform")
    primary = train_dpo.run(params, selected_project, "adpo_plus")
    assert "registered_version" not in baseline and primary["registered_version"] == 1
    for metrics in (baseline, primary):
        assert metrics["pairs"] == 8 and metrics["steps"] == 2
        assert 0.0 <= metrics["heldout_accuracy"] <= 1.0
    report = json.loads((selected_project / "reports/train_dpo/adpo_plus.json").read_text())
    assert report["heldout_margin"] == pytest.approx(primary["heldout_margin"])
    curve = (selected_project / "reports/train_dpo/uniform.csv").read_text().splitlines()
    assert curve[0] == "step,loss,margin,accuracy,logps_chosen" and len(curve) == 3
    assert not list((selected_project / "checkpoints").glob("*")), "checkpoints are removed after success"

    tracking.configure(params, selected_project)
    client = MlflowClient()
    version = client.get_model_version_by_alias(train_dpo.REGISTERED_POLICY, "challenger")
    assert version.run_id == primary["mlflow_run_id"]
    run = client.get_run(primary["mlflow_run_id"])
    assert run.data.tags["method"] == "adpo_plus" and "rewards/margins" in run.data.metrics
    assert len(run.data.tags["data_fingerprint_heldout"]) == 64
    inputs = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert inputs == {"selection_adpo_plus", "prefs_train", "prefs_heldout"}
    history = client.get_metric_history(primary["mlflow_run_id"], "loss")
    assert [m.step for m in history] == [1, 2]

    components = mlflow.transformers.load_model(
        f"models:/{train_dpo.REGISTERED_POLICY}@challenger", return_type="components"
    )
    tokenizer, model = components["tokenizer"], components["model"]
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    saved = selected_project / "models/dpo_adpo_plus"
    with safe_open(str(saved / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert AutoModelForCausalLM.from_pretrained(saved).config.vocab_size == len(tokenizer)


def test_refuses_scores_from_another_setup_and_missing_selection(selected_project: Path) -> None:
    set_params(selected_project, **{"data.max_length": 48})
    with pytest.raises(DataError, match="made from other reference scores than the current ones; rerun select"):
        train_dpo.run(load_params(selected_project / "params.yaml"), selected_project, "uniform")
    with pytest.raises(DataError, match=r"apo.json: missing; run `logitflow stage select apo` first"):
        train_dpo.run(load_params(selected_project / "params.yaml"), selected_project, "apo")


def test_lora_trains_adapters_and_saves_a_merged_model(selected_project: Path) -> None:
    from safetensors import safe_open

    set_params(selected_project, **{"train_dpo.lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1}})
    params = load_params(selected_project / "params.yaml")
    metrics = train_dpo.run(params, selected_project, "uniform")
    assert metrics["steps"] == 2
    with (
        safe_open(str(selected_project / "models/dpo_uniform/model.safetensors"), "pt") as trained,
        safe_open(str(selected_project / "models/policy/model.safetensors"), "pt") as base,
    ):
        names = set(trained.keys())
        assert not any("lora" in name for name in names), "adapters are merged into plain weights"
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(trained.get_tensor(name), base.get_tensor(name))
        assert torch.equal(trained.get_tensor("model.norm.weight"), base.get_tensor("model.norm.weight"))


def test_lora_with_unknown_target_modules_is_a_clear_error(selected_project: Path) -> None:
    from logitflow.errors import LogitflowError

    set_params(selected_project, **{"train_dpo.lora": {"enabled": True, "target_modules": ["nope_proj"]}})
    with pytest.raises(LogitflowError, match=r"train_dpo.lora.target_modules = \['nope_proj'\]"):
        train_dpo.run(load_params(selected_project / "params.yaml"), selected_project, "uniform")
    set_params(selected_project, **{"compute.distributed": "fsdp"})
    with pytest.raises(ParamsError, match=r"compute.distributed = 'fsdp' with train_dpo.lora.enabled = true"):
        train_dpo.run(load_params(selected_project / "params.yaml"), selected_project, "uniform")


@pytest.mark.slow
def test_stage_under_torchrun_with_two_gloo_processes_matches_one_process(selected_project: Path) -> None:
    params = load_params(selected_project / "params.yaml")
    single = train_dpo.run(params, selected_project, "adpo_plus")
    result = torchrun_logitflow(selected_project, "stage", "train_dpo", "adpo_plus")
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((selected_project / "reports/train_dpo/adpo_plus.json").read_text())
    assert double["registered_version"] == 2, "rank 0 registered once, after the single-process run's version 1"
    for key in ("train_loss", "heldout_margin", "heldout_dpo_nll"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_stage_under_torchrun_with_fsdp_matches_one_process(selected_project: Path) -> None:
    from safetensors.torch import load_file

    # 3 steps of 3 pairs in micro-batches of 1: the 2 processes take 2 + 1 pairs, so the second runs a
    # pass at weight 0 to join FSDP's collective gathers; the last step's 2 pairs split evenly
    updates = {"compute.distributed": "fsdp", "train_dpo.batch_size": 1, "train_dpo.grad_accum": 3}
    set_params(selected_project, **updates)
    params = load_params(selected_project / "params.yaml")
    single = train_dpo.run(params, selected_project, "adpo_plus")  # one process: no sharding
    single_weights = load_file(str(selected_project / "models/dpo_adpo_plus/model.safetensors"))
    result = torchrun_logitflow(selected_project, "stage", "train_dpo", "adpo_plus")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP, the model sharded over 2 processes" in " ".join(result.stderr.split())  # unwrap the log lines
    double = json.loads((selected_project / "reports/train_dpo/adpo_plus.json").read_text())
    assert double["steps"] == single["steps"] == 3
    assert double["registered_version"] == 2, "rank 0 registered once, after the single-process run's version 1"
    # the same update up to summation order (gradients summed over processes and shards, not in one pass)
    for key in ("train_loss", "train_margin", "heldout_accuracy", "heldout_margin", "heldout_dpo_nll"):
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
    tracking.configure(params, selected_project)
    client = MlflowClient()
    sharded_run = client.get_model_version(train_dpo.REGISTERED_POLICY, "2").run_id
    norms = {
        run: [m.value for m in client.get_metric_history(run, "grad_norm")]
        for run in (sharded_run, single["mlflow_run_id"])
    }
    # Adam hardly sees a gradient's scale, the norm does: the shards' gradients are summed, not averaged
    assert len(norms[sharded_run]) == 3
    assert norms[sharded_run] == pytest.approx(norms[single["mlflow_run_id"]], rel=1e-4)
    weights = load_file(str(selected_project / "models/dpo_adpo_plus/model.safetensors"))
    assert weights.keys() == single_weights.keys(), "the same model format as one process writes"
    for name, tensor in weights.items():  # bf16 on disk: a rounding flip is one bf16 step
        assert tensor.dtype == torch.bfloat16, name
        assert torch.allclose(tensor.float(), single_weights[name].float(), atol=1e-3), name
