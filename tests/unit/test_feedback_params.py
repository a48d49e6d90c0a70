"""The feedback flow's form may change the session and the design, not what the pool is made from;
its budget must be at least one label."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.feedback import check_form
from logitflow.config import load_params
from logitflow.errors import ParamsError


def test_pool_settings_come_from_params_yaml(tiny_project: Path) -> None:
    defaults = load_params(tiny_project / "params.yaml")
    session = defaults.feedback.model_copy(update={"session": "second", "budget": 7})
    check_form(defaults, defaults.model_copy(update={"feedback": session}), budget=None)
    demo = defaults.feedback.demo.model_copy(update={"prompts": 5})
    changed = defaults.model_copy(update={"feedback": defaults.feedback.model_copy(update={"demo": demo})})
    with pytest.raises(ParamsError, match=r"feedback.demo.prompts = 5 differ from params.yaml.*dvc repro pool"):
        check_form(defaults, changed, budget=3)
    with pytest.raises(ParamsError, match=r"budget = 0 \(the flow's parameter\)"):
        check_form(defaults, defaults, budget=0)
