"""cache_teacher: run the teacher once over the training corpus and store sparse next-token targets.

Variants (a DVC matrix): `rskd` (Random-Sampling KD, exact counts) and `topk` (the biased
baseline). Output: `paths.caches`/teacher_<mode>/ (shards + manifest), reports/cache_teacher_<mode>.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitflow import tracking
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
    model: torch.nn.Module
    device: torch.device
    truncation: TruncationCounter


def prepare_pass(params: Params, root: Path, mode: Mode) -> PreparedPass:
    """Load and verify the teacher, tokenise the corpus and describe the job (no sampling yet)."""
    section = params.cache_teacher
    apply_threads(params.compute)
    device = resolve_device(params.compute)
    teacher_path = model_dir(params, root, "teacher")
    card = read_model_card(teacher_path)
    teacher = load_materialized(teacher_path)
    if weights_hash(teacher.model) != card["weights_sha256"]:
        raise CacheError(f"{teacher_path}: weights differ from its model card; rerun `logitflow stage models`")
    context = getattr(teacher.model.config, "max_position_embeddings", None) or params.data.max_length
    max_length = min(params.data.max_length, context)
    if max_length < params.data.max_length:
        log.warning(
            "data.max_length=%d exceeds the teacher's context %d: using %d", params.data.max_length, context, max_length
        )

    corpus = read_split(params, root, "corpus_train")
    truncation = TruncationCounter()
    sequences = chunk_documents(teacher.tokenizer, corpus["text"], max_length, params.data.long_documents, truncation)
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
        "chat_template": teacher.tokenizer.chat_template or "",
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
        vocab_size=len(teacher.tokenizer),
        pad_id=teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0,
    )
    model = teacher.model.to(device=device, dtype=inference_dtype(params.compute))
    return PreparedPass(job, model, device, truncation)


def run(params: Params, root: Path, variant: str | None = None) -> dict[str, Any]:
    mode: Mode = variant or params.cache_teacher.primary  # type: ignore[assignment]
    if mode not in MODES:
        raise CacheError(f"cache_teacher: unknown mode '{mode}' (modes: {', '.join(MODES)})")
    prepared = prepare_pass(params, root, mode)
    job, device, truncation = prepared.job, prepared.device, prepared.truncation
    manifest, stats = run_cache_pass(prepared.model, job, device, lambda: autocast(params.compute, device))

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
