"""score_prefs: one reference-policy pass over every preference pair (train and held-out).

Output: `paths.caches`/ref_scores/ (shards + manifest), reports/score_prefs.json.
With `compute.ray` set, the shards are computed by Ray workers (`cache/ray_shards.py`), with the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from logitflow import tracking
from logitflow.cache import ray_shards
from logitflow.cache.ref_scores import ScoreJob, load_scores, run_score_pass
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import Params
from logitflow.data.tokenize import TruncationCounter, tokenize_pair
from logitflow.fsio import atomic_write_json
from logitflow.models import load_materialized, read_model_card
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import REPORT_FILE, read_split

log = logging.getLogger(__name__)
SPLITS = ("train", "heldout")
TRUNCATION_RULE = "prompt keeps its end (>= max_length // 2), then the response keeps its start"


def scores_dir(params: Params, root: Path) -> Path:
    return root / params.paths.caches / "ref_scores"


def scores_key(params: Params, root: Path) -> dict[str, Any]:
    """What made the scores: consumers (select, train_dpo) require the same entries."""
    card = read_model_card(model_dir(params, root, "policy"))
    report = json.loads((root / params.paths.prepared / REPORT_FILE).read_text())
    return {
        "schema": "logitflow.ref_scores",
        "policy_weights_sha256": card["weights_sha256"],
        "tokenizer_sha256": card["tokenizer_sha256"],
        "max_length": params.data.max_length,
        "truncation": TRUNCATION_RULE,
        "data_fingerprints": {split: report["fingerprints"][f"prefs_{split}"] for split in SPLITS},
        "pooling": params.score_prefs.pooling,
        "precision": params.compute.precision,
    }


def run(params: Params, root: Path) -> dict[str, Any]:
    # Joins Ray (compute.ray) first: an unreachable cluster fails before any model is loaded.
    with ray_shards.session(params.compute) as ray:
        return _run(params, root, ray)


def _run(params: Params, root: Path, ray: ray_shards.RaySession | None) -> dict[str, Any]:
    apply_threads(params.compute)
    policy_dir = model_dir(params, root, "policy")
    model = None
    if ray is None:
        device = resolve_device(params.compute)
        policy = load_materialized(policy_dir)
        tokenizer, model = policy.tokenizer, policy.model
    else:  # the workers load the weights; this process only tokenises
        device = ray_shards.worker_device(params.compute)
        tokenizer, _ = ray_shards.load_driver_side(policy_dir)
    key = scores_key(params, root)
    key["chat_template"] = tokenizer.chat_template or ""
    key["batch_pairs"] = params.score_prefs.batch_pairs

    counter = TruncationCounter()
    pairs, splits = [], {}
    for split in SPLITS:
        rows = read_split(params, root, f"prefs_{split}")
        splits[split] = (len(pairs), len(rows))
        for row in rows:
            chosen = tokenize_pair(tokenizer, row["prompt"], row["chosen"], params.data.max_length, counter)
            rejected = tokenize_pair(tokenizer, row["prompt"], row["rejected"], params.data.max_length, counter)
            pairs.append((chosen, rejected))
    job = ScoreJob(
        directory=scores_dir(params, root),
        key=key,
        pairs=pairs,
        splits=splits,
        pairs_per_shard=params.score_prefs.pairs_per_shard,
        batch_pairs=params.score_prefs.batch_pairs,
        pooling=params.score_prefs.pooling,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    executor = None
    if model is not None:
        model = model.to(device=device, dtype=inference_dtype(params.compute))
    else:
        assert ray is not None
        worker = ray_shards.ScoreWorker(
            str(policy_dir.resolve()), key["policy_weights_sha256"], params.compute, ray_shards.template(job)
        )
        executor = ray.executor(worker)
    manifest, stats = run_score_pass(model, job, device, lambda: autocast(params.compute, device), executor)

    heldout = load_scores(job.directory, "heldout")
    metrics = {
        "pairs": len(pairs),
        "responses_truncated": counter.truncated,
        "heldout_reference_accuracy": float((heldout.chosen_logp > heldout.rejected_logp).float().mean()),
        "heldout_mean_logratio": float((heldout.chosen_logp - heldout.rejected_logp).mean()),
        "pairs_per_second": round(stats["computed_units"] / stats["seconds"], 2) if stats["seconds"] else 0.0,
    }
    atomic_write_json(root / params.paths.reports / "score_prefs.json", metrics)
    with tracking.start_run(params, root, stage="score_prefs"):
        tracking.log_metrics(metrics)
        tracking.log_dict(manifest.model_dump(mode="json"), "scores_manifest.json")
    if counter.truncated:
        log.warning("score_prefs: %d of %d responses truncated to data.max_length", counter.truncated, counter.total)
    return metrics
