"""Run the `logitflow` command under torchrun with CPU (gloo) processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_logitflow(project: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["--no-python", str(Path(sys.executable).parent / "logitflow"), *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True)
