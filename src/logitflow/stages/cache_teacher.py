"""cache_teacher: run the teacher once over the training corpus and store sparse next-token targets.

Variants (a DVC matrix): `rskd` (Random-Sampling KD, exact counts) and `topk` (the biased
baseline). Output: `paths.caches`/teacher_<mode>/ (shards + manifest), reports/cache_teacher_<mode>.json.
With `compute.ray` set, the shards are computed by Ray workers (`cache/ray_shards.py`), with the same bytes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitflow import tracking
from logitflow.cache import ray_shards
from logitflow.cache.format import Mode
from logitflow.cache.shards import CacheError
from logitflow.cache.teacher_pass import CacheJob, run_cache_pass
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import Params
from logitflow.data.tokenize import TruncationCounter, chunk_documents
from logitflow.errors import DataError
from logitflow.fsio import atomic_write_json
from logitflow.models import load_materialized, read_model_card, weights_hash
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import REPORT_FILE, read_split

log = logging.getLogger(__name__)
MODES: tuple[Mode, ...] = ("rskd", "topk")


def cache_dir(params: Params, root: Path, mode: str) -> Path:
    return root / params.paths.caches / f"teacher_{mode}"


@dataclass(frozen=True)
class PreparedPass:
    job: CacheJob
    model: torch.nn.Module | None  # None when Ray workers load it (`remote`)
    device: torch.device
    truncation: TruncationCounter
    model_dir: Path


def prepare_pass(params: Params, root: Path, mode: Mode, *, remote: bool = False) -> PreparedPass:
    """Load and verify the teacher, tokenise the corpus and describe the job (no sampling yet).
    With `remote` (shards on Ray workers) only the tokenizer and config are loaded here: each
    worker loads and verifies the weights, and `device` is the workers' device."""
    section = params.cache_teacher
    apply_threads(params.compute)
    teacher_path = model_dir(params, root, "teacher")
    card = read_model_card(teacher_path)
    if remote:
        device = ray_shards.worker_device(params.compute)
        tokenizer, config = ray_shards.load_driver_side(teacher_path)
        model = None
    else:
        device = resolve_device(params.compute)
        teacher = load_materialized(teacher_path)
        if weights_hash(teacher.model) != card["weights_sha256"]:
            raise CacheError(f"{teacher_path}: weights differ from its model card; rerun `logitflow stage models`")
        tokenizer, config, model = teacher.tokenizer, teacher.model.config, teacher.model
    context = getattr(config, "max_position_embeddings", None) or params.data.max_length
    max_length = min(params.data.max_length, context)
    if max_length < params.data.max_length:
        log.warning(
            "data.max_length=%d exceeds the teacher's context %d: using %d", params.data.max_length, context, max_length
        )

    corpus = read_split(params, root, "corpus_train")
    truncation = TruncationCounter()
    sequences = chunk_documents(tokenizer, corpus["text"], max_length, params.data.long_documents, truncation)
    sequences = [s for s in sequences if len(s) >= 2]  # a 1-token chunk has no next-token target
    if not sequences:
        raise DataError(f"{root / params.paths.prepared}: the training corpus is empty after tokenisation")
    prepared_report = json.loads((root / params.paths.prepared / REPORT_FILE).read_text())

    settings = section.rskd if mode == "rskd" else section.topk
    key = {
        "schema": "logitflow.teacher_cache",
        "mode": mode,
        "teacher_weights_sha256": card["weights_sha256"],
        "tokenizer_sha256": card["tokenizer_sha256"],
        "chat_template": tokenizer.chat_template or "",
        "max_length": max_length,
        "long_documents": params.data.long_documents,
        "data_fingerprint": prepared_report["fingerprints"]["corpus_train"],
        "sampling": {**settings.model_dump(), "seed": section.seed},
        "batching": {
            "batch_size": section.batch_size,
            "sequences_per_shard": section.sequences_per_shard,
            "sampling_chunk": section.sampling_chunk,
        },
        "precision": params.compute.precision,
        "device_type": device.type,
    }
    job = CacheJob(
        directory=cache_dir(params, root, mode),
        mode=mode,
        key=key,
        sequences=sequences,
        sequences_per_shard=section.sequences_per_shard,
        batch_size=section.batch_size,
        sampling_chunk=section.sampling_chunk,
        seed=section.seed,
        rskd=section.rskd,
        topk=section.topk,
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    if model is not None:
        model = model.to(device=device, dtype=inference_dtype(params.compute))
    return PreparedPass(job, model, device, truncation, teacher_path)


def run(params: Params, root: Path, variant: str | None = None) -> dict[str, Any]:
    mode: Mode = variant or params.cache_teacher.primary  # type: ignore[assignment]
    if mode not in MODES:
        raise CacheError(f"cache_teacher: unknown mode '{mode}' (modes: {', '.join(MODES)})")
    # Joins Ray (compute.ray) first: an unreachable cluster fails before any model is loaded.
    with ray_shards.session(params.compute) as ray:
        prepared = prepare_pass(params, root, mode, remote=ray is not None)
        job, device, truncation = prepared.job, prepared.device, prepared.truncation
        executor = None
        if ray is not None:
            worker = ray_shards.TeacherWorker(
                str(prepared.model_dir.resolve()),
                job.key["teacher_weights_sha256"],
                params.compute,
                ray_shards.template(job),
            )
            executor = ray.executor(worker)
        manifest, stats = run_cache_pass(
            prepared.model, job, device, lambda: autocast(params.compute, device), executor
        )

    metrics = {
        "sequences": manifest.sequences,
        "tokens": manifest.tokens,
        "positions": manifest.positions,
        "unique_per_position": round(manifest.unique_per_position, 3),
        "bytes_per_token": round(manifest.bytes_per_token, 3),
        "bytes_per_entry": round(manifest.bytes_per_entry, 4),
        "cache_bytes": manifest.bytes,
        "documents_split": truncation.truncated,
        "tokens_per_second": round(stats["computed_units"] / stats["seconds"], 1) if stats["seconds"] else 0.0,
    }
    atomic_write_json(root / params.paths.reports / f"cache_teacher_{mode}.json", metrics)
    with tracking.start_run(params, root, stage="cache_teacher", run_name=f"cache_teacher@{mode}", tags={"mode": mode}):
        tracking.log_metrics(metrics)
        tracking.log_dict(manifest.model_dump(mode="json"), "cache_manifest.json")
    log.info(
        "cache_teacher@%s: %d positions, %.1f unique ids/position, %.2f B/entry, %.1f B/token",
        mode,
        manifest.positions,
        manifest.unique_per_position,
        manifest.bytes_per_entry,
        manifest.bytes_per_token,
    )
    return metrics
