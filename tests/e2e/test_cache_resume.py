"""Killed with SIGKILL at random points, a rerun finishes the cache byte-identical to an
uninterrupted run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from logitflow.cache.format import MANIFEST_FILE
from tests.conftest import set_params

REPO = Path(__file__).resolve().parents[2]
CLI = str(REPO / ".venv/bin/logitflow")


def _stage(root: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, "stage", "cache_teacher", "rskd", "--params", str(root / "params.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(prepared_project: Path) -> None:
    set_params(prepared_project, **{"cache_teacher.sequences_per_shard": 8, "cache_teacher.batch_size": 2})
    cache = prepared_project / "cache/teacher_rskd"
    reference_run = _stage(prepared_project)
    assert reference_run.wait(timeout=300) == 0, reference_run.stderr.read().decode()
    reference = _files(cache)
    assert len([n for n in reference if n.startswith("shard-")]) > 10
    shutil.rmtree(cache)

    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        run = _stage(prepared_project)
        deadline = time.monotonic() + 120
        while not any(cache.glob("shard-*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert not (cache / MANIFEST_FILE).exists() or _files(cache) == reference
        kills += not (cache / MANIFEST_FILE).exists()
    assert kills >= 1, "no kill landed mid-run"

    finish = _stage(prepared_project)
    assert finish.wait(timeout=300) == 0, finish.stderr.read().decode()
    assert _files(cache) == reference
