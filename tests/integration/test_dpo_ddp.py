"""The DPO loop under torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.net import free_port

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "dpo_ddp_worker.py"


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    subprocess.run([sys.executable, str(WORKER), str(single), "4"], check=True, capture_output=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(WORKER),
            str(double),
            "4",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(str(single)), load_file(str(double))
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name
    from tests.unit.train.test_dpo_loop import _setup

    initial = _setup(16)[0].model.state_dict()
    initial_moved = sum(not torch.equal(initial[name], one[name]) for name in one if name in initial)
    assert initial_moved > 0, "training changed the weights"
