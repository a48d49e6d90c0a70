"""A DPO run under torchrun (gloo): `python -m torch.distributed.run --nproc_per_node N this.py OUT STEPS`.
Rank 0 writes the trained weights to OUT (safetensors)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from logitflow.train.dpo import DpoSettings, train_dpo
from tests.unit.train.test_dpo_loop import CPU, _setup

SETTINGS = DpoSettings(lr=1e-3, batch_size=2, grad_accum=2, epochs=2, warmup_ratio=0.0, schedule="constant")


def main() -> None:
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    distributed = "WORLD_SIZE" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    loaded, data = _setup(16)
    train_dpo(
        loaded.model,
        data,
        SETTINGS,
        pad_id=0,
        device=CPU,
        autocast=contextlib.nullcontext,
        checkpoint_dir=out.with_suffix(".ckpt"),
        max_steps=steps,
    )
    if not distributed or dist.get_rank() == 0:
        save_model(loaded.model, str(out))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
