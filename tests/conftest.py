"""Shared fixtures: an isolated environment (telemetry off, hub offline, caches in tmp) and a tiny
project whose params use tiny random models and a slice of the demo data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

os.environ.update(
    {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
for leaked in ("MLFLOW_TRACKING_URI", "LOGITFLOW_PARENT_RUN_ID", "LOGITFLOW_HOME", "LOGITFLOW_PARAMS"):
    os.environ.pop(leaked, None)

TINY = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def tiny_params(root: Path) -> dict:
    """params.yaml with tiny models and small demo data (merged over the repository's params)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["models"] = {"teacher": {"source": "tiny", "tiny": TINY}, "policy": {"source": "tiny", "tiny": TINY}}
    params["compute"].update(device="cpu", precision="fp32", threads=1, seed=0)  # update: dvc.yaml reads every key
    params["data"]["max_length"] = 64
    params["prepare"]["demo"] = {
        "preference_pairs": 40,
        "tasks": ["arithmetic", "units", "strings"],
        "corpus_documents": 6,
    }
    params["cache_teacher"].update(batch_size=4, sequences_per_shard=32, sampling_chunk=16)
    params["cache_teacher"]["rskd"]["n_samples"] = 16
    params["cache_teacher"]["topk"]["k"] = 5
    params["score_prefs"].update(batch_pairs=4, pairs_per_shard=16)
    params["select"]["budget"] = 8
    # update, not replace: dvc.yaml templating reads keys such as train_dpo.methods from the file
    params["train_dpo"].update(lr=1e-3, batch_size=4, grad_accum=1, epochs=1, eval_every=0, checkpoint_every=1)
    params["distill"].update(
        lr=1e-3, batch_size=4, grad_accum=1, checkpoint_every=1, eval_every=0, max_sequences=8, eval_sequences=4
    )
    params["distill"]["student"] = {"init": "teacher_layers", "num_hidden_layers": 1}
    return params


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(cache / "dvc-site"))


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A project directory with a tiny params.yaml (no git/DVC)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path), sort_keys=False))
    return tmp_path


@pytest.fixture
def prepared_project(tiny_project: Path) -> Path:
    """A tiny project after the prepare and models stages."""
    from logitflow.config import load_params
    from logitflow.stages import STAGES

    params = load_params(tiny_project / "params.yaml")
    STAGES["prepare"](params, tiny_project)
    STAGES["models"](params, tiny_project)
    return tiny_project


def set_params(root: Path, **updates: object) -> None:
    """Set dotted keys in root/params.yaml, e.g. set_params(root, **{"cache_teacher.seed": 3})."""
    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A git + DVC repository with the project's dvc.yaml, tiny params and the venv linked in."""
    import subprocess

    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "bin", root / "bin")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(root), sort_keys=False))
    (root / ".venv").symlink_to(REPO / ".venv")
    with (root / ".gitignore").open("a") as gitignore:
        gitignore.write(".venv\n")
    run = lambda *cmd: subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@logitflow.invalid")
    run("git", "config", "user.name", "logitflow test")
    run(str(REPO / ".venv/bin/dvc"), "init", "-q")
    run(str(REPO / ".venv/bin/dvc"), "config", "cache.type", "hardlink,symlink")
    return root
