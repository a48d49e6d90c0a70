"""One module per pipeline stage, each with `run(params, root) -> metrics`; one DVC stage each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from logitflow.config import Params
from logitflow.stages import models, prepare

StageRun = Callable[[Params, Path], dict[str, Any]]

STAGES: dict[str, StageRun] = {
    "prepare": prepare.run,
    "models": models.run,
}
