"""select: choose `select.budget` training pairs by a method (a DVC matrix over methods).

Output: `paths.selections`/<method>.json (pair ids in pick order, each pick's gain and running log
det, the method and its settings), reports/select/<method>.json (metrics) and
reports/select/<method>.csv (log det vs budget; dvc.yaml plots every method on one chart).

Every method is also scored on one common yardstick: the log det of the Fisher information of the
linearised DPO loss at θ̂ fit on all logged labels (no optimism), along its pick order.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from logitflow import tracking
from logitflow.cache.ref_scores import load_scores
from logitflow.compute import resolve_device
from logitflow.config import Params
from logitflow.errors import DataError, LogitflowError
from logitflow.fsio import atomic_write_json, atomic_write_text
from logitflow.ops.active_dpo import METHODS, SelectionSettings, relative_gamma, scale_features, select
from logitflow.ops.design import DOptimalDesign, constant_weights, dpo_logits, fit_theta
from logitflow.stages.prepare import read_split
from logitflow.stages.score_prefs import scores_dir, scores_key

log = logging.getLogger(__name__)


def selection_path(params: Params, root: Path, method: str) -> Path:
    return root / params.paths.selections / f"{method}.json"


def fisher_logdet_curve(
    features: torch.Tensor,
    offsets: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    settings: SelectionSettings,
) -> list[float]:
    """log det(γI + Σ_{j ≤ t} w_j φ_j φ_jᵀ) for t = 1..k along `order`, w = β²μ(1 − μ) at θ̂(all labels)."""
    theta = fit_theta(features, offsets, labels, beta=settings.beta, l2=settings.l2)
    mu = torch.sigmoid(dpo_logits(features, offsets, theta, settings.beta))
    weights = settings.beta**2 * mu * (1 - mu)
    design = DOptimalDesign(
        features, relative_gamma(features, weights, settings.gamma_rel), constant_weights(weights, len(weights))
    )
    for index in order.tolist():
        design.add(index)
    return design.logdets


def _refuse_duplicates(pairs: Any) -> None:
    seen: dict[str, str] = {}
    for row in pairs:
        content = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True)
        if content in seen:
            raise DataError(
                f"prefs_train: pairs '{seen[content]}' and '{row['id']}' are the same pair; deduplicate the data"
            )
        seen[content] = row["id"]


def run(params: Params, root: Path, variant: str | None = None) -> dict[str, Any]:
    method = variant or params.select.primary
    if method not in METHODS:
        raise LogitflowError(f"select: unknown method '{method}' (methods: {', '.join(METHODS)})")
    section = params.select
    pairs = read_split(params, root, "prefs_train")
    _refuse_duplicates(pairs)
    if section.budget > len(pairs):
        raise DataError(f"select.budget = {section.budget} is larger than the training pool ({len(pairs)} pairs)")
    expected = {key: value for key, value in scores_key(params, root).items() if key != "precision"}
    scores = load_scores(scores_dir(params, root), "train", expect=expected)

    device = resolve_device(params.compute)
    raw = (scores.chosen_features - scores.rejected_features).to(device=device, dtype=torch.float64)
    features, scale = scale_features(raw)
    offsets = (scores.chosen_logp - scores.rejected_logp).to(device=device, dtype=torch.float64)
    labels = torch.ones(len(pairs), dtype=torch.float64, device=device)  # logged data: the chosen response is preferred
    settings = SelectionSettings(
        beta=params.dpo.beta, gamma_rel=section.gamma_rel, alpha=section.alpha, l2=section.l2, seed=section.seed
    )
    started = time.perf_counter()
    selection = select(method, features, offsets, labels, section.budget, settings)
    seconds = time.perf_counter() - started
    yardstick = fisher_logdet_curve(features, offsets, labels, selection.indices, settings)

    ids = pairs["id"]
    picks = [
        {"rank": rank, "row": row, "pair_id": ids[row], "gain": float(gain), "logdet": float(logdet)}
        for rank, (row, gain, logdet) in enumerate(
            zip(selection.indices.tolist(), selection.gains.tolist(), selection.logdet.tolist(), strict=True), start=1
        )
    ]
    output = {
        "method": method,
        "settings": settings.__dict__,
        "budget": section.budget,
        "pool_size": len(pairs),
        "feature_scale": scale,
        "scores_key": expected,
        "picks": picks,
    }
    atomic_write_json(selection_path(params, root, method), output)

    curve = io.StringIO()
    writer = csv.writer(curve)
    writer.writerow(["budget", "logdet"])
    writer.writerows((t, round(value, 6)) for t, value in enumerate(yardstick, start=1))
    atomic_write_text(root / params.paths.reports / "select" / f"{method}.csv", curve.getvalue())
    metrics = {
        "budget": section.budget,
        "fisher_logdet": round(yardstick[-1], 4),
        "seconds": round(seconds, 3),
    }
    atomic_write_json(root / params.paths.reports / "select" / f"{method}.json", metrics)
    with tracking.start_run(params, root, stage="select", run_name=f"select@{method}", tags={"method": method}):
        tracking.log_metrics(metrics)
        for t, value in enumerate(yardstick, start=1):
            if t & (t - 1) == 0 or t == len(yardstick):
                tracking.log_metrics({"fisher_logdet": value}, step=t)
    log.info("select@%s: %d of %d pairs, Fisher log det %.2f", method, section.budget, len(pairs), yardstick[-1])
    return metrics
