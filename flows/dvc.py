"""Thin wrappers around the DVC command line, streamed into Prefect's logs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from prefect import get_run_logger

from logitflow.errors import LogitflowError

BIN = Path(sys.executable).parent


def run_logged(command: list[str], root: Path, env: Mapping[str, str] | None = None) -> None:
    """Run a command in the project, each output line into the run's log; fail with its last lines."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(command))
    process = subprocess.Popen(
        command,
        cwd=root,
        # universal newlines turn each progress-bar redraw into a line: redraw every 15 s at most
        env={**os.environ, "TQDM_MININTERVAL": "15", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: deque[str] = deque(maxlen=20)
    assert process.stdout is not None
    for line in process.stdout:
        if line := line.rstrip():
            logger.info(line)
            tail.append(line)
    if process.wait() != 0:
        raise LogitflowError(f"`{' '.join(command)}` failed (exit {process.returncode}):\n" + "\n".join(tail))


def stage_names(root: Path) -> list[str]:
    """Every stage of dvc.yaml in file order (dependency order), matrix items expanded."""
    out = subprocess.run(
        [str(BIN / "dvc"), "stage", "list", "--name-only"], cwd=root, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise LogitflowError(f"dvc stage list failed in {root}: {out.stderr.strip()}")
    return out.stdout.split()


def git_commit(root: Path) -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    return out.stdout.strip() or "none"
