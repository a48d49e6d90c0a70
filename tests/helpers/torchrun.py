"""Run the `logitflow` command under torchrun with CPU (gloo) processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.net import free_port


def torchrun_logitflow(project: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["--no-python", str(Path(sys.executable).parent / "logitflow"), *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True)
