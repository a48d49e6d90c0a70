"""distill: train a student from the teacher caches (a DVC matrix over losses).

`rskd` reads cache_teacher@rskd, `topk`/`topk_ghost` read cache_teacher@topk, `full` runs the teacher
every step and `ce` uses no teacher; `full` and `ce` train on the primary cache's sequences, so every
loss sees the same tokens. The KD temperature is the one the cache was made with.
Output: `paths.models`/student_<loss>/ (a plain transformers directory), reports/distill/<loss>.json
(metrics), <loss>.csv (curves) and <loss>_reliability.csv (held-out calibration bins). Every run is
an MLflow run with the model logged; only `distill.primary` registers `logitflow-student` @challenger.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from logitflow import tracking
from logitflow.cache.reader import TeacherCache
from logitflow.cache.shards import CacheError
from logitflow.compute import (
    apply_threads,
    autocast,
    distributed,
    fsdp,
    inference_dtype,
    resolve_device,
    seed_everything,
)
from logitflow.config import Params
from logitflow.data.tokenize import TruncationCounter, chunk_documents
from logitflow.errors import DataError, LogitflowError
from logitflow.fsio import atomic_directory, atomic_write_json, atomic_write_text
from logitflow.models import load_materialized, read_model_card
from logitflow.ops.lm_metrics import LmMetrics
from logitflow.stages.cache_teacher import cache_dir
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import REPORT_FILE, read_split
from logitflow.student import build_student
from logitflow.train.distill import CACHE_MODE, LOSSES, DistillSettings, DistillTask, evaluate_student
from logitflow.train.loop import train

log = logging.getLogger(__name__)
REGISTERED_STUDENT = "logitflow-student"
CURVE_COLUMNS = ("loss", "lm_loss", "kd_loss")


def student_dir(params: Params, root: Path, loss: str) -> Path:
    return root / params.paths.models / f"student_{loss}"


def reports_dir(params: Params, root: Path) -> Path:
    return root / params.paths.reports / "distill"


def open_cache(params: Params, root: Path, loss: str, teacher_card: dict[str, Any]) -> TeacherCache:
    """The cache this loss reads (the primary one for `full`/`ce`), checked against the teacher."""
    mode = CACHE_MODE[loss] or params.cache_teacher.primary
    cache = TeacherCache(
        cache_dir(params, root, mode),
        expect_tokenizer_sha256=str(teacher_card["tokenizer_sha256"]),
        expect_vocab_size=int(teacher_card["vocab_size"]),
        max_open_shards=64,  # a shuffled epoch visits every shard each few steps; decoded shards are small
    )
    if cache.manifest.key.get("teacher_weights_sha256") != teacher_card["weights_sha256"]:
        raise CacheError(
            f"{cache.directory}: made by another teacher than {model_dir(params, root, 'teacher')}; "
            f"rerun `logitflow stage cache_teacher {mode}`"
        )
    return cache


def heldout_sequences(params: Params, root: Path, tokenizer: Any, max_length: int) -> list[list[int]]:
    texts = read_split(params, root, "corpus_heldout")["text"]
    chunks = chunk_documents(tokenizer, texts, max_length, params.data.long_documents, TruncationCounter())
    sequences = [c for c in chunks if len(c) >= 2][: params.distill.eval_sequences]
    if not sequences:
        raise DataError(f"{root / params.paths.prepared}/corpus_heldout.parquet: no held-out text to evaluate on")
    return sequences


def _write_reports(params: Params, root: Path, loss: str, history: list[dict], final: LmMetrics, metrics: dict):
    out = reports_dir(params, root)
    curve = io.StringIO()
    writer = csv.writer(curve)
    writer.writerow(["step", *CURVE_COLUMNS])
    writer.writerows([step, *(round(h[c], 6) for c in CURVE_COLUMNS)] for step, h in enumerate(history, start=1))
    atomic_write_text(out / f"{loss}.csv", curve.getvalue())
    bins = io.StringIO()
    writer = csv.DictWriter(bins, fieldnames=["bin_upper", "count", "confidence", "accuracy"])
    writer.writeheader()
    writer.writerows(final.calibration.table())
    atomic_write_text(out / f"{loss}_reliability.csv", bins.getvalue())
    atomic_write_json(out / f"{loss}.json", metrics)


def run(params: Params, root: Path, variant: str | None = None) -> dict[str, Any]:
    """Under torchrun every process trains its share; rank 0 alone tracks and writes outputs."""
    with distributed(params.compute) as rank:
        return _run(params, root, variant, rank)


def _run(params: Params, root: Path, variant: str | None, rank: int) -> dict[str, Any]:
    loss = variant or params.distill.primary
    if loss not in LOSSES:
        raise LogitflowError(f"distill: unknown loss '{loss}' (losses: {', '.join(LOSSES)})")
    section = params.distill
    apply_threads(params.compute)
    seed_everything(section.seed)
    device = resolve_device(params.compute)
    teacher_path = model_dir(params, root, "teacher")
    card = read_model_card(teacher_path)
    teacher = load_materialized(teacher_path)
    tokenizer = teacher.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cache = open_cache(params, root, loss, card)
    temperature = float(cache.manifest.key["sampling"]["temperature"])
    heldout = heldout_sequences(params, root, tokenizer, int(cache.manifest.key["max_length"]))

    sharding = fsdp(params.compute, device)
    student = build_student(teacher.model, section.student, section.seed)
    if sharding is None:  # under FSDP this full copy stays on the CPU; the loop trains a sharded one
        student = student.to(device)
    teacher_model = teacher.model.to(device=device, dtype=inference_dtype(params.compute)).eval().requires_grad_(False)
    settings = DistillSettings(loss=loss, alpha=section.alpha, temperature=temperature, **section.loop_settings())
    task = DistillTask(
        cache,
        settings,
        pad_id=pad_id,
        device=device,
        teacher=teacher_model if loss == "full" else None,
        max_sequences=section.max_sequences,
    )
    run_key = hashlib.sha256(
        json.dumps([section.model_dump(), loss, cache.manifest.key_sha256, card], sort_keys=True).encode()
    ).hexdigest()[:16]
    checkpoint_dir = root / params.paths.checkpoints / f"distill_{loss}_{run_key}"
    amp = lambda: autocast(params.compute, device)  # noqa: E731
    last_eval: list[LmMetrics] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        result = evaluate_student(
            model, teacher_model, heldout, batch_size=settings.batch_size, pad_id=pad_id, device=device, autocast=amp
        )
        last_eval[:] = [result]
        return {f"eval/{k}": v for k, v in result.result().items()}

    prepared = json.loads((root / params.paths.prepared / REPORT_FILE).read_text())
    with tracking.start_run(
        params,
        root,
        enabled=rank == 0,
        stage="distill",
        run_name=f"distill@{loss}",
        tags={
            "loss": loss,
            "cache_mode": cache.mode,
            "cache_key_sha256": cache.manifest.key_sha256,
            "teacher_weights_sha256": str(card["weights_sha256"]),
            "data_fingerprint_heldout": prepared["fingerprints"]["corpus_heldout"],
            tracking.HELDOUT_TAG: hashlib.sha256(
                json.dumps(
                    [prepared["fingerprints"]["corpus_heldout"], card["tokenizer_sha256"], heldout], sort_keys=True
                ).encode()
            ).hexdigest()[:16],
        },
    ) as run:
        if run:
            tracking.log_dict(cache.manifest.model_dump(mode="json"), "cache_manifest.json")
            tracking.log_input(f"teacher_cache_{cache.mode}", cache.directory, cache.manifest.key_sha256, "training")
            tracking.log_input(
                "corpus_heldout",
                root / params.paths.prepared / "corpus_heldout.parquet",
                prepared["fingerprints"]["corpus_heldout"],
                "evaluation",
            )
        history = train(
            student,
            task,
            settings,
            name=f"distill@{loss}",
            autocast=amp,
            checkpoint_dir=checkpoint_dir,
            evaluate=evaluate,
            on_metrics=tracking.log_metrics,
            fsdp=sharding,
        )
        if not run:
            return {"rank": rank, "steps": len(history)}
        final = last_eval[0] if last_eval else LmMetrics()
        teacher_eval = evaluate_student(
            teacher_model, None, heldout, batch_size=settings.batch_size, pad_id=pad_id, device=device, autocast=amp
        ).result(with_teacher=False)
        metrics = {
            "sequences": len(task),
            "tokens": task.units(range(len(task))) * settings.epochs,
            "steps": len(history),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "temperature": temperature,
            "train_loss": history[-1]["loss"],
            "train_lm_loss": history[-1]["lm_loss"],
            "tokens_per_second": statistics.median(h["tokens_per_second"] for h in history),
            **{f"heldout_{k}": v for k, v in final.result().items()},
            "heldout_positions": final.positions,
            "teacher_heldout_lm_loss": teacher_eval["lm_loss"],
            "teacher_heldout_ece": teacher_eval["ece"],
        }
        tracking.log_metrics({f"final/{k}": v for k, v in metrics.items()})
        student = student.to(dtype=torch.bfloat16)
        with atomic_directory(student_dir(params, root, loss)) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        register = loss == section.primary
        info = tracking.log_transformers_model(
            student, tokenizer, registered_model_name=REGISTERED_STUDENT if register else None
        )
        if register:
            tracking.set_alias(REGISTERED_STUDENT, info.registered_model_version, tracking.CHALLENGER)
            metrics["registered_version"] = int(info.registered_model_version)

    _write_reports(params, root, loss, history, final, metrics)
    metrics["mlflow_run_id"] = run.info.run_id
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model directory is the result now
    log.info(
        "distill@%s: held-out LM loss %.3f (teacher %.3f), KL %.3f, ECE %.3f, top-1 agreement %.3f",
        loss,
        metrics["heldout_lm_loss"],
        metrics["teacher_heldout_lm_loss"],
        metrics["heldout_kl_to_teacher"],
        metrics["heldout_ece"],
        metrics["heldout_top1_agreement"],
    )
    return metrics
