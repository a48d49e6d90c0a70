"""The training loop shared by DPO and distillation: AdamW with decoupled weight decay, gradient
accumulation, warmup + schedule, clipping, periodic evaluation, atomic checkpoints and exact resume.

What differs between objectives is a `TrainTask`: how a micro-batch of item indices becomes a
summed loss, how many units (pairs, tokens) a set of items weighs, and how per-batch parts become
metrics. Every step's loss is the sum over its items divided by the units of the whole step, so
accumulation and process count do not change the update.

Under torchrun (torch.distributed initialised), each process takes its share of every step's items
and the gradients are summed across processes before the optimizer step, so N processes compute the
same update as one process with the same global batch; rank 0 writes checkpoints and reports metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm
from transformers import get_scheduler

from logitflow.errors import LogitflowError
from logitflow.fsio import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoopSettings:
    lr: float = 5e-6
    weight_decay: float = 0.0
    batch_size: int = 8  # items per micro-batch
    grad_accum: int = 1
    epochs: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 0  # steps; 0: only at the end
    seed: int = 0


class TrainTask(Protocol):
    unit: str  # what `units` counts, e.g. "pairs" or "tokens"

    def __len__(self) -> int: ...

    def loss(self, model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, Parts]:
        """The loss summed over the units of these items, and detached parts for `metrics`."""
        ...

    def units(self, indices: Sequence[int]) -> int: ...

    def metrics(self, parts: list[Parts]) -> dict[str, float]: ...


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    for parameter in parameters:
        if parameter.grad is None:  # this rank had no items this step
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def _gather_parts(parts: list[Parts]) -> list[Parts]:
    gathered: list[list[Parts] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [{k: v.detach().cpu() for k, v in p.items()} for p in parts])
    return [part for rank_parts in gathered for part in (rank_parts or [])]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, history: list[dict]) -> None:
    """Model weights, optimizer and scheduler state, the RNG, the step and history; atomically."""
    with atomic_directory(directory) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
            tmp / "optimizer.pt",
        )
        atomic_write_json(tmp / STATE_FILE, {"step": step, "history": history})


def _load_checkpoint(directory: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    state = json.loads((directory / STATE_FILE).read_text())
    load_model(model, str(directory / "model.safetensors"))
    optim = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    torch.set_rng_state(optim["rng"])  # dropout continues the same random stream
    return int(state["step"]), list(state["history"])


def _optimizer(model: torch.nn.Module, settings: LoopSettings) -> torch.optim.Optimizer:
    """AdamW; biases and norms (1-D parameters) take no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )


def train(
    model: torch.nn.Module,
    task: TrainTask,
    settings: LoopSettings,
    *,
    name: str,
    autocast: Callable[[], Any],
    checkpoint_dir: Path,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    on_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
    max_steps: int | None = None,
) -> list[dict[str, float]]:
    """Train in place; resumes from `checkpoint_dir` when it holds a checkpoint. Returns the
    per-step history. `max_steps` stops early (as a kill would), for tests of resume."""
    if len(task) == 0:
        raise LogitflowError(f"{name}: nothing to train on")
    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = math.ceil(len(task) / per_step)
    total = steps_per_epoch * settings.epochs
    optimizer = _optimizer(model, settings)
    scheduler = get_scheduler(settings.schedule, optimizer, math.ceil(settings.warmup_ratio * total), total)
    rank, world_size = world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, history = 0, []
    if (checkpoint_dir / STATE_FILE).is_file():
        step, history = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
        log.info("%s: resuming at step %d of %d", name, step, total)
    model.train()
    stop = total if max_steps is None else min(total, max_steps)
    progress = tqdm(total=stop, initial=step, desc=name, unit="step", disable=rank != 0)
    while step < stop:
        started = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        chunk = epoch_order(len(task), settings.seed, epoch)[within * per_step : (within + 1) * per_step]
        units = task.units(chunk)
        mine = chunk[rank::world_size]
        parts = []
        for start in range(0, len(mine), settings.batch_size):
            with autocast():
                loss_sum, part = task.loss(model, mine[start : start + settings.batch_size])
            loss = loss_sum / units
            if not torch.isfinite(loss):
                raise LogitflowError(
                    f"{name}: loss is {float(loss.detach())} at step {step + 1}; the last good checkpoint in "
                    f"{checkpoint_dir} is kept (lower the learning rate or check the data)"
                )
            loss.backward()
            parts.append(part)
        if world_size > 1:
            _sum_gradients(trainable)
            parts = _gather_parts(parts)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics = {
            **task.metrics(parts),
            "grad_norm": float(grad_norm),
            "learning_rate": scheduler.get_last_lr()[0],
            f"{task.unit}_per_second": units / (time.perf_counter() - started),
        }
        if evaluate is not None and (step == total or (settings.eval_every and step % settings.eval_every == 0)):
            metrics.update(evaluate(model))
        history.append(metrics)
        progress.update()
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if rank == 0:
            on_metrics(metrics, step)
        if step == stop or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            if rank == 0:
                save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, history)
            if world_size > 1:
                dist.barrier()
    progress.close()
    return history
