"""One module per pipeline stage, each with `run(params, root, variant) -> metrics`; one DVC stage
each (matrix stages take the variant, e.g. `cache_teacher@rskd`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitflow.config import Params
from logitflow.errors import LogitflowError
from logitflow.ops.active_dpo import METHODS as SELECT_METHODS
from logitflow.stages import (
    cache_teacher,
    distill,
    evaluate,
    models,
    pool,
    prepare,
    score_prefs,
    select,
    train_dpo,
)
from logitflow.train.distill import LOSSES as DISTILL_LOSSES


@dataclass(frozen=True)
class Stage:
    run: Callable[..., dict[str, Any]]
    variants: tuple[str, ...] = ()

    def __call__(self, params: Params, root: Path, variant: str | None = None) -> dict[str, Any]:
        if variant is not None and not self.variants:
            raise LogitflowError(f"this stage takes no variant, got '{variant}'")
        if variant is not None and variant not in self.variants:
            raise LogitflowError(f"unknown variant '{variant}' (variants: {', '.join(self.variants)})")
        return self.run(params, root, variant) if self.variants else self.run(params, root)


STAGES: dict[str, Stage] = {
    "prepare": Stage(prepare.run),
    "models": Stage(models.run),
    "cache_teacher": Stage(cache_teacher.run, cache_teacher.MODES),
    "score_prefs": Stage(score_prefs.run),
    "select": Stage(select.run, tuple(SELECT_METHODS)),
    "train_dpo": Stage(train_dpo.run, tuple(SELECT_METHODS)),
    "distill": Stage(distill.run, DISTILL_LOSSES),
    "evaluate": Stage(evaluate.run),
    "pool": Stage(pool.run),
}
