"""The training loop shared by DPO and distillation: AdamW with decoupled weight decay, gradient
accumulation, warmup + schedule, clipping, periodic evaluation, atomic checkpoints and exact resume.

What differs between objectives is a `TrainTask`: how a micro-batch of item indices becomes a
summed loss, how many units (pairs, tokens) a set of items weighs, and how per-batch parts become
metrics. Every step's loss is the sum over its items divided by the units of the whole step, so
accumulation and process count do not change the update.

Under torchrun (torch.distributed initialised), each process takes its share of every step's items
and the gradients are summed across processes before the optimizer step, so N processes compute the
same update as one process with the same global batch; rank 0 writes checkpoints and reports metrics.
With `compute.distributed: fsdp` the loop trains an FSDP2 copy of the model instead (`shard`): every
process holds a shard of the weights, gradients and optimizer state, and the gradient reduction sums
as above. Checkpoints and the caller's model then receive the full weights, gathered on rank 0, in
the same format as without sharding, so a run can resume under either strategy.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from logitflow.compute import Fsdp
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


LOGITS_AT = "logitflow_logits_at"  # the forward method FSDP registers on a sharded copy
FULL = StateDictOptions(full_state_dict=True)  # every process passes the whole state; each keeps its shard
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the whole state, on rank 0's CPU


def _logits_at(model: torch.nn.Module, input_ids, attention_mask, select) -> torch.Tensor:
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.get_output_embeddings()(hidden[:, :-1][select])


def logits_at(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, select: torch.Tensor
) -> torch.Tensor:
    """Logits [N, V] of the hidden states where `select` [B, T - 1] is True (hidden state t predicts
    token t + 1), in row-major order: the LM head runs only there. A sharded copy runs this as one
    registered FSDP forward, whose hooks gather the root's weights (embeddings, final norm, a tied LM
    head) that calling the decoder and the head one after the other would find still sharded."""
    forward = getattr(model, LOGITS_AT, None)
    if forward is not None:
        return forward(input_ids, attention_mask, select)
    return _logits_at(model, input_ids, attention_mask, select)


def shard(model: torch.nn.Module, fsdp: Fsdp) -> torch.nn.Module:
    """An FSDP2 copy of `model` on `fsdp.device`, sharded over all processes: one unit per decoder
    layer, the root holding the rest (embeddings and a tied LM head stay in one unit). The copy is
    built on the meta device so that only shards are allocated; `model` itself is left as it is."""
    on_meta = {id(p): torch.nn.Parameter(p.to("meta"), p.requires_grad) for p in model.parameters()}
    sharded = copy.deepcopy(model, on_meta)  # tied parameters stay tied: one id, one copy
    mesh = init_device_mesh(fsdp.device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=fsdp.param_dtype, reduce_dtype=torch.float32)
    for layer in getattr(sharded.get_decoder(), "layers", []):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    for module in sharded.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum: each process's loss is already over the step's units
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
    setattr(sharded, LOGITS_AT, types.MethodType(_logits_at, sharded))
    register_fsdp_forward_method(sharded, LOGITS_AT)
    sharded.to_empty(device=fsdp.device)
    for name, buffer in model.named_buffers():  # to_empty left them uninitialised (rotary frequencies, ...)
        sharded.get_buffer(name).copy_(buffer)
    set_model_state_dict(sharded, model.state_dict(), options=FULL)
    return sharded


def _gather(model: torch.nn.Module, sharded: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: copy the sharded weights into `model` on rank 0 and return the optimizer state
    there, with parameters numbered as `optimizer.state_dict()` numbers them ({} on other ranks)."""
    weights = get_model_state_dict(sharded, options=GATHERED)
    state = get_optimizer_state_dict(sharded, optimizer, options=GATHERED)
    if dist.get_rank() != 0:
        return {}
    model.load_state_dict(weights)
    index = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def _scatter(model: torch.nn.Module, sharded: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict):
    """Load `model`'s weights and a full optimizer state (numbered as by `optimizer.state_dict()`)
    into the sharded copy; every process holds both in full."""
    set_model_state_dict(sharded, model.state_dict(), options=FULL)
    names = {id(p): name for name, p in sharded.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {order[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(sharded, optimizer, by_name, options=FULL)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def save_checkpoint(directory: Path, model, optimizer_state: dict, scheduler, step: int, history: list[dict]) -> None:
    """Model weights, optimizer and scheduler state, the RNG, the step and history; atomically."""
    with atomic_directory(directory) as tmp:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
            tmp / "optimizer.pt",
        )
        atomic_write_json(tmp / STATE_FILE, {"step": step, "history": history})


def _load_checkpoint(directory: Path, model, optimizer, scheduler, sharded=None) -> tuple[int, list[dict]]:
    state = json.loads((directory / STATE_FILE).read_text())
    load_model(model, str(directory / "model.safetensors"))
    optim = torch.load(directory / "optimizer.pt", weights_only=True)
    if sharded is None:
        optimizer.load_state_dict(optim["optimizer"])
    else:
        _scatter(model, sharded, optimizer, optim["optimizer"])
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
    fsdp: Fsdp | None = None,
) -> list[dict[str, float]]:
    """Train in place; resumes from `checkpoint_dir` when it holds a checkpoint. Returns the
    per-step history. `max_steps` stops early (as a kill would), for tests of resume.
    With `fsdp` (under torchrun) a sharded copy trains, and `evaluate` and the task see that copy;
    the trained weights land in `model` on rank 0 only."""
    if len(task) == 0:
        raise LogitflowError(f"{name}: nothing to train on")
    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = math.ceil(len(task) / per_step)
    total = steps_per_epoch * settings.epochs
    rank, world_size = world()
    trained = model if fsdp is None else shard(model, fsdp)
    if fsdp is not None:
        log.info("%s: FSDP, the model sharded over %d processes", name, world_size)
    optimizer = _optimizer(trained, settings)
    scheduler = get_scheduler(settings.schedule, optimizer, math.ceil(settings.warmup_ratio * total), total)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    step, history = 0, []
    if (checkpoint_dir / STATE_FILE).is_file():
        step, history = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler, None if fsdp is None else trained)
        log.info("%s: resuming at step %d of %d", name, step, total)
    trained.train()
    stop = total if max_steps is None else min(total, max_steps)
    progress = tqdm(total=stop, initial=step, desc=name, unit="step", disable=rank != 0)
    while step < stop:
        started = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        chunk = epoch_order(len(task), settings.seed, epoch)[within * per_step : (within + 1) * per_step]
        units = task.units(chunk)
        mine = chunk[rank::world_size]
        batches = [mine[start : start + settings.batch_size] for start in range(0, len(mine), settings.batch_size)]
        if fsdp is not None:  # FSDP's gathers are collective: every process runs as many passes as rank 0
            batches += [[]] * (math.ceil(len(chunk[0::world_size]) / settings.batch_size) - len(batches))
        parts = []
        for batch in batches:
            with autocast():  # a pass without items of its own runs one item at weight 0
                loss_sum, part = task.loss(trained, batch or chunk[:1])
            loss = loss_sum / units if batch else loss_sum * 0.0
            if not torch.isfinite(loss):
                raise LogitflowError(
                    f"{name}: loss is {float(loss.detach())} at step {step + 1}; the last good checkpoint in "
                    f"{checkpoint_dir} is kept (lower the learning rate or check the data)"
                )
            loss.backward()
            if batch:
                parts.append(part)
        if world_size > 1:
            if fsdp is None:  # FSDP has reduced them in backward
                _sum_gradients(trainable)
            parts = _gather_parts(parts)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
            grad_norm = grad_norm.full_tensor()
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
            metrics.update(evaluate(trained))
        history.append(metrics)
        progress.update()
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if rank == 0:
            on_metrics(metrics, step)
        if step == stop or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            optimizer_state = optimizer.state_dict() if fsdp is None else _gather(model, trained, optimizer)
            if rank == 0:
                save_checkpoint(checkpoint_dir, model, optimizer_state, scheduler, step, history)
            if world_size > 1:
                dist.barrier()
    progress.close()
    return history
