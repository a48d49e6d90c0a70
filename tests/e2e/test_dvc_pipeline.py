"""`dvc repro` runs the pipeline's stages for real (tiny models), and DVC then sees it up to date."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DVC = str(REPO / ".venv/bin/dvc")


def _dvc(root: Path, *args: str) -> str:
    result = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


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

    # A changed param reruns only the stage that reads it.
    params = (dvc_project / "params.yaml").read_text().replace("heldout_fraction: 0.1", "heldout_fraction: 0.25")
    (dvc_project / "params.yaml").write_text(params)
    out = _dvc(dvc_project, "repro")
    assert "Running stage 'prepare'" in out and "Running stage 'models'" not in out
    shown = json.loads(_dvc(dvc_project, "metrics", "show", "--json"))
    assert next(iter(shown.values()))["data"]["reports/prepare.json"]["data"]["rows_prefs_heldout"] == 10
