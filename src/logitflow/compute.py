"""Device, precision, threads and seeds from the `compute` section."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from logitflow.config import ComputeSection
from logitflow.errors import ParamsError


def resolve_device(compute: ComputeSection) -> torch.device:
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("compute.device = 'cuda' but no CUDA device is visible (use 'auto' or 'cpu')")
    if compute.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(compute.device)


def apply_threads(compute: ComputeSection) -> None:
    """Pin intra-op threads so results (and resumed runs) are reproducible on CPU."""
    if compute.threads is not None:
        torch.set_num_threads(compute.threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast(compute: ComputeSection, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when params ask for it; a no-op for fp32."""
    if compute.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_dtype(compute: ComputeSection) -> torch.dtype:
    """Weights dtype for forward-only passes: with bf16 precision the weights themselves are cast
    once (autocast would re-cast every weight on every call, which dominates chunked LM heads)."""
    return torch.bfloat16 if compute.precision == "bf16" else torch.float32


@contextlib.contextmanager
def distributed(compute: ComputeSection) -> Iterator[int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA with this process's
    GPU, gloo on CPU) and yield this process's rank; otherwise yield 0. Training loops see the
    group and split each step across processes; only rank 0 should write outputs and track."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    device = resolve_device(compute)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Fsdp:
    """How the training loop shards its model (FSDP2, see `train.loop.shard`)."""

    device: torch.device
    param_dtype: torch.dtype | None = None  # dtype of the gathered weights in forward/backward; None: as stored


def fsdp(compute: ComputeSection, device: torch.device) -> Fsdp | None:
    """FSDP settings when params ask for `compute.distributed: fsdp` and torchrun started several
    processes; None otherwise (one process, or replicas whose gradients are summed: `ddp`).
    With bf16 on CUDA the gathered weights are bf16 while the shards, the optimizer state and the
    gradient reduction stay fp32; on CPU the weights stay fp32 under bf16 autocast, as with `ddp`."""
    if compute.distributed != "fsdp" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    bf16 = compute.precision == "bf16" and device.type == "cuda"
    return Fsdp(device, torch.bfloat16 if bf16 else None)
