"""train_dpo: DPO on the pairs a selection method chose (a DVC matrix over methods).

Reference log-probs come from score_prefs (refused if made by another model/tokenizer/data/
max_length). Output: `paths.models`/dpo_<method>/ (a plain transformers directory),
reports/train_dpo/<method>.json (metrics) and .csv (curves). Every run is an MLflow run with the
trained model logged; only the run of `select.primary` registers `logitflow-policy` @challenger.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from logitflow import tracking
from logitflow.cache.ref_scores import load_scores
from logitflow.compute import apply_threads, autocast, distributed, fsdp, resolve_device, seed_everything
from logitflow.config import LoraSettings, Params
from logitflow.data.tokenize import TruncationCounter, tokenize_pair
from logitflow.errors import DataError, LogitflowError, ParamsError
from logitflow.fsio import atomic_directory, atomic_write_json, atomic_write_text
from logitflow.models import load_materialized, read_model_card
from logitflow.ops.active_dpo import METHODS
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import read_split
from logitflow.stages.score_prefs import scores_dir, scores_key
from logitflow.stages.select import selection_path
from logitflow.train.dpo import DpoData, DpoSettings, train_dpo

log = logging.getLogger(__name__)
REGISTERED_POLICY = "logitflow-policy"
CURVE_COLUMNS = ("step", "loss", "rewards/margins", "rewards/accuracies", "logps/chosen")


def policy_dir(params: Params, root: Path, method: str) -> Path:
    return root / params.paths.models / f"dpo_{method}"


def dpo_data(
    rows: Any, indices: list[int], scores: Any, tokenizer: Any, max_length: int, counter: TruncationCounter
) -> DpoData:
    pairs = [
        (
            tokenize_pair(tokenizer, rows[i]["prompt"], rows[i]["chosen"], max_length, counter),
            tokenize_pair(tokenizer, rows[i]["prompt"], rows[i]["rejected"], max_length, counter),
        )
        for i in indices
    ]
    index = torch.tensor(indices, dtype=torch.long)
    return DpoData(pairs, scores.chosen_logp[index].double(), scores.rejected_logp[index].double())


def with_lora(model: torch.nn.Module, lora: LoraSettings) -> torch.nn.Module:
    """The model wrapped with trainable LoRA adapters (base weights frozen), or unchanged."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise LogitflowError(f"train_dpo.lora.target_modules = {list(lora.target_modules)}: {err}") from None


def run(params: Params, root: Path, variant: str | None = None) -> dict[str, Any]:
    """Under torchrun every process trains its share; rank 0 alone tracks and writes outputs."""
    with distributed(params.compute) as rank:
        return _run(params, root, variant, rank)


def _run(params: Params, root: Path, variant: str | None, rank: int) -> dict[str, Any]:
    method = variant or params.select.primary
    if method not in METHODS:
        raise LogitflowError(f"train_dpo: unknown selection method '{method}' (methods: {', '.join(METHODS)})")
    section = params.train_dpo
    if section.lora.enabled and params.compute.distributed == "fsdp":
        raise ParamsError(
            "compute.distributed = 'fsdp' with train_dpo.lora.enabled = true is not supported: LoRA's few trainable "
            "weights gain little from sharding; use compute.distributed = 'ddp' or disable train_dpo.lora"
        )
    selection_file = selection_path(params, root, method)
    if not selection_file.is_file():
        raise DataError(f"{selection_file}: missing; run `logitflow stage select {method}` first")
    selection = json.loads(selection_file.read_text())
    if not selection["picks"]:
        raise DataError(f"{selection_file}: the selection is empty")
    key = {k: v for k, v in scores_key(params, root).items() if k != "precision"}
    if selection["scores_key"] != key:
        raise DataError(f"{selection_file}: made from other reference scores than the current ones; rerun select")
    train_scores = load_scores(scores_dir(params, root), "train", expect=key)
    heldout_scores = load_scores(scores_dir(params, root), "heldout", expect=key)

    apply_threads(params.compute)
    seed_everything(section.seed)
    device = resolve_device(params.compute)
    policy = load_materialized(model_dir(params, root, "policy"))
    tokenizer = policy.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    counter = TruncationCounter()
    train_rows = read_split(params, root, "prefs_train")
    heldout_rows = read_split(params, root, "prefs_heldout")
    picked = [pick["row"] for pick in selection["picks"]]
    data = dpo_data(train_rows, picked, train_scores, tokenizer, params.data.max_length, counter)
    heldout = dpo_data(
        heldout_rows, list(range(len(heldout_rows))), heldout_scores, tokenizer, params.data.max_length, counter
    )

    settings = DpoSettings(beta=params.dpo.beta, **section.model_dump(exclude={"lora", "methods"}))
    run_key = hashlib.sha256(
        json.dumps(
            [section.model_dump(), params.dpo.beta, picked, read_model_card(model_dir(params, root, "policy"))],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    checkpoint_dir = root / params.paths.checkpoints / f"train_dpo_{method}_{run_key}"
    selection_sha256 = hashlib.sha256(selection_file.read_bytes()).hexdigest()
    sharding = fsdp(params.compute, device)
    model = with_lora(policy.model, section.lora)
    if sharding is None:  # under FSDP this full copy stays on the CPU; the loop trains a sharded one
        model = model.to(device)
    with tracking.start_run(
        params,
        root,
        enabled=rank == 0,
        stage="train_dpo",
        run_name=f"train_dpo@{method}",
        tags={
            "method": method,
            "selection_sha256": selection_sha256,
            "policy_weights_sha256": key["policy_weights_sha256"],
            "data_fingerprint_train": key["data_fingerprints"]["train"],
            "data_fingerprint_heldout": key["data_fingerprints"]["heldout"],
            tracking.HELDOUT_TAG: hashlib.sha256(
                json.dumps([key, params.dpo.beta, section.loss_type], sort_keys=True).encode()
            ).hexdigest()[:16],
        },
    ) as run:
        if run:
            tracking.log_dict(selection, "selection.json")
            tracking.log_input(f"selection_{method}", selection_file, selection_sha256, "training")
            for split in ("train", "heldout"):
                tracking.log_input(
                    f"prefs_{split}",
                    root / params.paths.prepared / f"prefs_{split}.parquet",
                    key["data_fingerprints"][split],
                    "training" if split == "train" else "evaluation",
                )
        history = train_dpo(
            model,
            data,
            settings,
            pad_id=pad_id,
            device=device,
            autocast=lambda: autocast(params.compute, device),
            checkpoint_dir=checkpoint_dir,
            eval_data=heldout,
            on_metrics=tracking.log_metrics,
            fsdp=sharding,
        )
        if not run:
            return {"rank": rank, "steps": len(history)}
        if section.lora.enabled:
            model = model.merge_and_unload()  # a plain transformers model again
        final = history[-1]
        metrics = {
            "pairs": len(data),
            "steps": len(history),
            "train_loss": final["loss"],
            "train_margin": final["rewards/margins"],
            "heldout_accuracy": final["eval/accuracy"],
            "heldout_margin": final["eval/margin"],
            "heldout_dpo_nll": final["eval/dpo_nll"],
            "responses_truncated": counter.truncated,
        }
        tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        model = model.to(dtype=torch.bfloat16)
        with atomic_directory(policy_dir(params, root, method)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        register = method == params.select.primary
        info = tracking.log_transformers_model(
            model, tokenizer, registered_model_name=REGISTERED_POLICY if register else None
        )
        if register:
            tracking.set_alias(REGISTERED_POLICY, info.registered_model_version, tracking.CHALLENGER)
            metrics["registered_version"] = int(info.registered_model_version)
        metrics["mlflow_run_id"] = run.info.run_id

    curve = io.StringIO()
    writer = csv.writer(curve)
    writer.writerow(["step", "loss", "margin", "accuracy", "logps_chosen"])
    writer.writerows([step, *(round(h[c], 6) for c in CURVE_COLUMNS[1:])] for step, h in enumerate(history, start=1))
    atomic_write_text(root / params.paths.reports / "train_dpo" / f"{method}.csv", curve.getvalue())
    atomic_write_json(
        root / params.paths.reports / "train_dpo" / f"{method}.json",
        {k: v for k, v in metrics.items() if k != "mlflow_run_id"},
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model directory is the result now
    log.info(
        "train_dpo@%s: held-out accuracy %.3f, margin %.3f",
        method,
        metrics["heldout_accuracy"],
        metrics["heldout_margin"],
    )
    return metrics
