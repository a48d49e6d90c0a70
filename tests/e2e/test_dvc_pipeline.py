"""`dvc repro` runs the pipeline's stages for real (tiny models), and DVC then sees it up to date."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import set_params

REPO = Path(__file__).resolve().parents[2]
DVC = str(REPO / ".venv/bin/dvc")


def _dvc(root: Path, *args: str) -> str:
    result = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_dvc_repro_runs_stages_then_reruns_only_what_params_change(dvc_project: Path) -> None:
    _dvc(dvc_project, "repro")
    assert (dvc_project / "data/prepared/prefs_train.parquet").is_file()
    assert (dvc_project / "models/teacher/model.safetensors").is_file()
    metrics = json.loads(_dvc(dvc_project, "metrics", "show", "--json"))
    shown = next(iter(metrics.values()))["data"]
    assert shown["reports/prepare.json"]["data"]["rows_prefs_train"] == 36
    assert "Data and pipelines are up to date" in _dvc(dvc_project, "status")
    assert "didn't change, skipping" in _dvc(dvc_project, "repro")
    # DVC links outputs from its cache instead of copying them.
    cached = (dvc_project / "models/teacher/model.safetensors").stat()
    assert cached.st_nlink >= 2 or (dvc_project / "models/teacher/model.safetensors").is_symlink()

    assert shown["reports/select/adpo_plus.json"]["data"]["budget"] == 8
    assert shown["reports/cache_teacher_rskd.json"]["data"]["bytes_per_entry"] < 2.0
    assert 0.0 <= shown["reports/train_dpo/adpo_plus.json"]["data"]["heldout_accuracy"] <= 1.0
    assert shown["reports/distill/rskd.json"]["data"]["registered_version"] == 1
    evaluated = shown["reports/evaluate.json"]["data"]
    assert set(evaluated["students"]) == {"teacher", "rskd", "topk", "topk_ghost", "ce"}
    assert set(evaluated["policies"]) == {"reference", "uniform", "adpo_plus"}
    plots = _dvc(dvc_project, "plots", "show", "--json")
    assert "logdet_vs_budget" in plots and "reports/distill/topk_ghost.csv" in plots

    # A changed param reruns only the stages that read it.
    set_params(dvc_project, **{"select.seed": 7})
    out = _dvc(dvc_project, "repro")
    assert "Running stage 'select@uniform'" in out
    for untouched in ("prepare", "models", "cache_teacher@rskd", "score_prefs"):
        assert f"Running stage '{untouched}'" not in out

    # The results travel through a directory remote: another clone pulls data, caches and models.
    remote, clone = dvc_project.parent / "remote", dvc_project.parent / "clone"
    _dvc(dvc_project, "remote", "add", "-d", "-f", "local", str(remote))
    _dvc(dvc_project, "push")
    git = lambda *args, cwd=dvc_project: subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)  # noqa: E731
    git("add", "-A")
    git("commit", "-qm", "pipeline results")
    git("clone", "-q", str(dvc_project), str(clone), cwd=dvc_project.parent)
    (clone / ".venv").symlink_to(REPO / ".venv")
    _dvc(clone, "pull")
    for path in (
        "models/student_rskd/model.safetensors",
        "cache/teacher_rskd/manifest.json",
        "data/selections/adpo_plus.json",
    ):
        assert (clone / path).read_bytes() == (dvc_project / path).read_bytes(), path
    assert "Data and pipelines are up to date" in _dvc(clone, "status")
