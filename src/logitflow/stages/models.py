"""models: materialise the teacher and the reference policy once, as bf16 safetensors HF
directories (`paths.models`/teacher, /policy) that later stages load in about a second.

When both specs are the same model, the policy directory holds hard links to the teacher's files,
so the weights are on disk once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from logitflow import tracking
from logitflow.config import Params
from logitflow.fsio import atomic_directory, atomic_write_json
from logitflow.models import materialize

log = logging.getLogger(__name__)
ROLES = ("teacher", "policy")


def model_dir(params: Params, root: Path, role: str) -> Path:
    return root / params.paths.models / role


def _link_copy(source: Path, target: Path) -> None:
    with atomic_directory(target) as tmp:
        for file in sorted(source.iterdir()):
            os.link(file, tmp / file.name)


def run(params: Params, root: Path) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    cards: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        spec = getattr(params.models, role)
        started = time.perf_counter()
        same_as = next((done for done in cards if getattr(params.models, done) == spec), None)
        if same_as is not None:
            _link_copy(model_dir(params, root, same_as), model_dir(params, root, role))
            cards[role] = cards[same_as]
            log.info("models: %s is the same model as %s (hard-linked)", role, same_as)
        else:
            cards[role] = materialize(spec, model_dir(params, root, role))
        metrics[f"{role}_parameters"] = cards[role]["parameters"]
        metrics[f"{role}_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(root / params.paths.reports / "models.json", metrics)
    with tracking.start_run(params, root, stage="models"):
        tracking.log_metrics(metrics)
        tracking.log_dict(cards, "model_cards.json")
    return metrics
