"""Device, precision, threads and seeds from the `compute` section."""

from __future__ import annotations

import contextlib
import random

import torch

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
