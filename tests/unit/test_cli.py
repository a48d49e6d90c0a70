from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from logitflow.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "stage" in result.output and "params" in result.output


def test_params_show_prints_validated_defaults(tiny_project: Path) -> None:
    result = runner.invoke(app, ["params", "show", "--params", str(tiny_project / "params.yaml")])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["models"]["teacher"]["source"] == "tiny"
    assert shown["compute"]["seed"] == 0


def test_bad_params_is_one_clear_line_without_traceback(tiny_project: Path) -> None:
    path = tiny_project / "params.yaml"
    data = yaml.safe_load(path.read_text())
    data["prepare"]["heldout_fraction"] = 2
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["stage", "prepare", "--params", str(path)])
    assert result.exit_code == 2
    assert "prepare.heldout_fraction = 2" in result.output
    assert "Traceback" not in result.output


def test_unknown_stage(tiny_project: Path) -> None:
    result = runner.invoke(app, ["stage", "nope", "--params", str(tiny_project / "params.yaml")])
    assert result.exit_code == 2 and "unknown stage 'nope'" in result.output and "prepare" in result.output
