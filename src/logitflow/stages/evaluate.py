"""evaluate: every trained model scored on the same held-out data, whose fingerprints are recorded.

Policies (the reference and each `train_dpo.methods` model): held-out preference accuracy, mean
implicit-reward margin and DPO NLL against the score_prefs reference, and the success rate of greedy
generations on the demo answer key. Students (each `distill.losses` model, and the teacher as the
bar): held-out LM loss, ECE, KL to the teacher, top-1 agreement, generation tokens/s.
Output: reports/evaluate.json (DVC metrics) and reports/evaluate/reliability_<model>.csv (plots).
Models that are not trained yet are skipped with a warning rather than failing the stage.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from logitflow import tracking
from logitflow.cache.ref_scores import load_scores
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import Params
from logitflow.data.tokenize import TruncationCounter
from logitflow.errors import DataError
from logitflow.evaluation.answers import success_rate
from logitflow.evaluation.generate import generate
from logitflow.fsio import atomic_write_json, atomic_write_text
from logitflow.models import load_materialized
from logitflow.ops.lm_metrics import CalibrationBins
from logitflow.stages.distill import heldout_sequences, student_dir
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import REPORT_FILE, read_split
from logitflow.stages.score_prefs import scores_dir, scores_key
from logitflow.stages.train_dpo import dpo_data, policy_dir
from logitflow.train.distill import evaluate_student
from logitflow.train.dpo import DpoSettings, evaluate

log = logging.getLogger(__name__)
REPORT = "evaluate.json"


def reliability_path(params: Params, root: Path, model: str) -> Path:
    return root / params.paths.reports / "evaluate" / f"reliability_{model}.csv"


def _answer_prompts(params: Params, root: Path) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Held-out prompts that have an answer-key row (demo data), up to `generation_prompts`."""
    key_file = root / params.paths.prepared / "answer_key.parquet"
    if not key_file.is_file() or params.evaluate.generation_prompts == 0:
        return [], []
    answers = {row["id"]: row["answer"] for row in read_split(params, root, "answer_key")}
    prompts, expected = [], []
    for row in read_split(params, root, "prefs_heldout"):
        if row["id"] in answers and len(prompts) < params.evaluate.generation_prompts:
            prompts.append(row["prompt"])
            expected.append(answers[row["id"]])
    return prompts, expected


def _policies(params: Params, root: Path, device: torch.device, amp) -> dict[str, dict[str, Any]]:
    key = {k: v for k, v in scores_key(params, root).items() if k != "precision"}
    scores = load_scores(scores_dir(params, root), "heldout", expect=key)
    rows = read_split(params, root, "prefs_heldout")
    prompts, answers = _answer_prompts(params, root)
    settings = DpoSettings(
        beta=params.dpo.beta, loss_type=params.train_dpo.loss_type, batch_size=params.train_dpo.batch_size
    )
    candidates = {"reference": model_dir(params, root, "policy")}
    candidates |= {method: policy_dir(params, root, method) for method in params.train_dpo.methods}
    results: dict[str, dict[str, Any]] = {}
    data = None
    for name, directory in candidates.items():
        if not (directory / "config.json").is_file():
            log.warning("evaluate: no policy at %s (train_dpo@%s not run); skipped", directory, name)
            continue
        loaded = load_materialized(directory)
        model = loaded.model.to(device=device, dtype=inference_dtype(params.compute))
        pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        if data is None:
            data = dpo_data(
                rows, list(range(len(rows))), scores, loaded.tokenizer, params.data.max_length, TruncationCounter()
            )
        metrics = evaluate(model, data, settings, pad_id, device, amp)
        results[name] = {
            "heldout_accuracy": metrics["eval/accuracy"],
            "heldout_margin": metrics["eval/margin"],
            "heldout_dpo_nll": metrics["eval/dpo_nll"],
        }
        if prompts:
            generations = generate(
                model,
                loaded.tokenizer,
                prompts,
                max_new_tokens=params.evaluate.max_new_tokens,
                batch_size=params.evaluate.batch_size,
                device=device,
                autocast=amp,
            )
            results[name]["answer_success_rate"] = success_rate(generations.texts, answers)
        log.info("evaluate: policy %s %s", name, results[name])
    return results


def _students(params: Params, root: Path, device: torch.device, amp) -> tuple[dict, dict[str, CalibrationBins]]:
    teacher = load_materialized(model_dir(params, root, "teacher"))
    tokenizer = teacher.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher_model = teacher.model.to(device=device, dtype=inference_dtype(params.compute)).eval()
    sequences = heldout_sequences(params, root, tokenizer, params.data.max_length)
    speed_prompts = [row["prompt"] for row in read_split(params, root, "prefs_heldout")][
        : params.evaluate.speed_prompts
    ]
    batch = params.distill.batch_size

    def speed(model) -> float:
        return generate(
            model,
            tokenizer,
            speed_prompts,
            max_new_tokens=params.evaluate.speed_new_tokens,
            batch_size=params.evaluate.speed_prompts,
            device=device,
            autocast=amp,
        ).tokens_per_second

    teacher_metrics = evaluate_student(
        teacher_model, None, sequences, batch_size=batch, pad_id=pad_id, device=device, autocast=amp
    )
    teacher_speed = speed(teacher_model)
    results: dict[str, dict[str, Any]] = {
        "teacher": {**teacher_metrics.result(with_teacher=False), "generation_tokens_per_second": teacher_speed}
    }
    calibration = {"teacher": teacher_metrics.calibration}
    for loss in params.distill.losses:
        directory = student_dir(params, root, loss)
        if not (directory / "config.json").is_file():
            log.warning("evaluate: no student at %s (distill@%s not run); skipped", directory, loss)
            continue
        student = load_materialized(directory).model.to(device=device, dtype=inference_dtype(params.compute))
        metrics = evaluate_student(
            student, teacher_model, sequences, batch_size=batch, pad_id=pad_id, device=device, autocast=amp
        )
        tokens_per_second = speed(student)
        results[loss] = {
            **metrics.result(),
            "generation_tokens_per_second": tokens_per_second,
            "generation_speedup_vs_teacher": tokens_per_second / teacher_speed if teacher_speed else 0.0,
        }
        calibration[loss] = metrics.calibration
        log.info("evaluate: student %s %s", loss, results[loss])
    return results, calibration


def run(params: Params, root: Path) -> dict[str, Any]:
    apply_threads(params.compute)
    device = resolve_device(params.compute)
    amp = lambda: autocast(params.compute, device)  # noqa: E731
    report_file = root / params.paths.prepared / REPORT_FILE
    if not report_file.is_file():
        raise DataError(f"{report_file}: missing; run `logitflow stage prepare` first")
    fingerprints = json.loads(report_file.read_text())["fingerprints"]
    with tracking.start_run(params, root, stage="evaluate", run_name="evaluate") as run:
        policies = _policies(params, root, device, amp)
        students, calibration = _students(params, root, device, amp)
        metrics = {
            "heldout_fingerprints": {k: fingerprints[k] for k in ("prefs_heldout", "corpus_heldout")},
            "policies": policies,
            "students": students,
        }
        tracking.log_dict(metrics, REPORT)
        tracking.log_metrics(
            {
                f"{family}/{model}/{name}": value
                for family in ("policies", "students")
                for model, values in metrics[family].items()
                for name, value in values.items()
            }
        )
        metrics["mlflow_run_id"] = run.info.run_id if run else None
    for model, bins in calibration.items():
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=["bin_upper", "count", "confidence", "accuracy"])
        writer.writeheader()
        writer.writerows(bins.table())
        atomic_write_text(reliability_path(params, root, model), table.getvalue())
    atomic_write_json(root / params.paths.reports / REPORT, {k: v for k, v in metrics.items() if k != "mlflow_run_id"})
    return metrics
