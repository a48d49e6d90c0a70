"""The feedback flow's form may change the session and the design, not what the pool is made from."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.feedback import refuse_pool_overrides
from logitflow.config import load_params
from logitflow.errors import ParamsError


def test_pool_settings_come_from_params_yaml(tiny_project: Path) -> None:
    defaults = load_params(tiny_project / "params.yaml")
    session = defaults.feedback.model_copy(update={"session": "second", "budget": 7})
    refuse_pool_overrides(defaults, defaults.model_copy(update={"feedback": session}))
    demo = defaults.feedback.demo.model_copy(update={"prompts": 5})
    changed = defaults.model_copy(update={"feedback": defaults.feedback.model_copy(update={"demo": demo})})
    with pytest.raises(ParamsError, match=r"feedback.demo.prompts = 5 differ from params.yaml.*dvc repro pool"):
        refuse_pool_overrides(defaults, changed)
