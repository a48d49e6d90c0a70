"""The DPO training loop: reference log-probs come from the score_prefs cache (no reference model in
memory), the LM head runs only at response positions, gradient accumulation, warmup + schedule,
clipping, periodic held-out evaluation, atomic checkpoints and exact resume.

Under torchrun (torch.distributed initialised), each process takes its share of every step's pairs
and the gradients are summed across processes before the optimizer step, so N processes compute the
same update as one process with the same global batch; rank 0 writes checkpoints and reports metrics.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from transformers import get_scheduler

from logitflow.data.tokenize import TokenizedPair, pad_right
from logitflow.errors import LogitflowError
from logitflow.fsio import atomic_directory, atomic_write_json
from logitflow.ops.dpo import dpo_loss

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class DpoSettings:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    lr: float = 5e-6
    weight_decay: float = 0.0
    batch_size: int = 8  # pairs per optimizer step, before accumulation
    grad_accum: int = 1
    epochs: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 0  # steps; 0: only at the end
    seed: int = 0


@dataclass(frozen=True)
class DpoData:
    """Tokenised pairs with their reference log-probs (summed; per-token counts for IPO)."""

    pairs: list[tuple[TokenizedPair, TokenizedPair]]
    ref_chosen: torch.Tensor  # [N] summed reference log-probs
    ref_rejected: torch.Tensor  # [N]

    def __len__(self) -> int:
        return len(self.pairs)


def response_logps(
    model: torch.nn.Module, sequences: list[TokenizedPair], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each sequence's response tokens [S] and their counts [S]; the LM head
    is applied only to the hidden states that predict response tokens."""
    input_ids, attention = pad_right([s.input_ids for s in sequences], pad_id)
    response = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        response[row, sequence.prompt_length : len(sequence.input_ids)] = True
    input_ids, attention, response = input_ids.to(device), attention.to(device), response.to(device)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    predicts = response[:, 1:]  # hidden state t predicts token t + 1
    logits = model.get_output_embeddings()(hidden[:, :-1][predicts]).float()
    token_logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:][predicts][:, None]).squeeze(-1)
    owners = torch.arange(len(sequences), device=device)[:, None].expand_as(predicts)[predicts]
    sums = torch.zeros(len(sequences), device=device, dtype=token_logps.dtype).index_add(0, owners, token_logps)
    return sums, predicts.sum(1)


def _pair_losses(
    model, data: DpoData, indices: list[int], settings: DpoSettings, pad_id: int, device
) -> dict[str, torch.Tensor]:
    chosen = [data.pairs[i][0] for i in indices]
    rejected = [data.pairs[i][1] for i in indices]
    sums, counts = response_logps(model, chosen + rejected, pad_id, device)
    policy_chosen, policy_rejected = sums[: len(indices)], sums[len(indices) :]
    ref_chosen = data.ref_chosen[indices].to(device)
    ref_rejected = data.ref_rejected[indices].to(device)
    if settings.loss_type == "ipo":  # IPO compares length-averaged log-probs, as TRL does
        n_chosen, n_rejected = counts[: len(indices)].clamp_min(1), counts[len(indices) :].clamp_min(1)
        policy_chosen, policy_rejected = policy_chosen / n_chosen, policy_rejected / n_rejected
        ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=settings.beta,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
    )
    return {
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "chosen_logps": policy_chosen.detach(),
        "rejected_logps": policy_rejected.detach(),
    }


def _metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    cat = {key: torch.cat([p[key].detach().float() for p in parts]) for key in parts[0]}
    margins = cat["chosen_rewards"] - cat["rejected_rewards"]
    return {
        "loss": float(cat["losses"].mean()),
        "rewards/chosen": float(cat["chosen_rewards"].mean()),
        "rewards/rejected": float(cat["rejected_rewards"].mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/accuracies": float((margins > 0).float().mean()),
        "logps/chosen": float(cat["chosen_logps"].mean()),
        "logps/rejected": float(cat["rejected_logps"].mean()),
    }


@torch.no_grad()
def evaluate(
    model, data: DpoData, settings: DpoSettings, pad_id: int, device, autocast: Callable[[], Any]
) -> dict[str, float]:
    """Held-out preference accuracy, mean implicit-reward margin and DPO NLL (β·h under σ)."""
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(data), settings.batch_size):
        with autocast():
            parts.append(
                _pair_losses(
                    model,
                    data,
                    list(range(start, min(start + settings.batch_size, len(data)))),
                    settings,
                    pad_id,
                    device,
                )
            )
    model.train(was_training)
    metrics = _metrics(parts)
    margins = torch.cat([p["chosen_rewards"] - p["rejected_rewards"] for p in parts])
    return {
        "eval/accuracy": metrics["rewards/accuracies"],
        "eval/margin": metrics["rewards/margins"],
        "eval/dpo_nll": float(torch.nn.functional.softplus(-margins).mean()),
        "eval/logps_chosen": metrics["logps/chosen"],
    }


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    for parameter in parameters:
        if parameter.grad is None:  # this rank had no pairs this step
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)


def _gather_parts(parts: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    gathered: list[list[dict[str, torch.Tensor]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [{k: v.detach().cpu() for k, v in p.items()} for p in parts])
    return [part for rank_parts in gathered for part in (rank_parts or [])]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, history: list[dict]) -> None:
    """Model weights, optimizer and scheduler state, the step and history; written atomically."""
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
    torch.set_rng_state(optim["rng"])  # dropout (e.g. LoRA's) continues the same random stream
    return int(state["step"]), list(state["history"])


def train_dpo(
    model: torch.nn.Module,
    data: DpoData,
    settings: DpoSettings,
    *,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], Any],
    checkpoint_dir: Path,
    eval_data: DpoData | None = None,
    on_metrics: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
    max_steps: int | None = None,
) -> list[dict[str, float]]:
    """Train in place; resumes from `checkpoint_dir` when it holds a checkpoint. Returns the
    per-step history. `max_steps` stops early (as a kill would) for tests of resume."""
    if len(data) == 0:
        raise LogitflowError("train_dpo: the selection is empty")
    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = math.ceil(len(data) / per_step)
    total = steps_per_epoch * settings.epochs
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    scheduler = get_scheduler(settings.schedule, optimizer, math.ceil(settings.warmup_ratio * total), total)
    rank, world = _world()
    trainable = [p for p in model.parameters() if p.requires_grad]
    step, history = 0, []
    if (checkpoint_dir / STATE_FILE).is_file():
        step, history = _load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
        log.info("train_dpo: resuming at step %d of %d", step, total)
    model.train()
    stop = total if max_steps is None else min(total, max_steps)
    while step < stop:
        epoch, within = divmod(step, steps_per_epoch)
        order = _epoch_order(len(data), settings.seed, epoch)
        chunk = order[within * per_step : (within + 1) * per_step]
        mine = chunk[rank::world]
        parts = []
        for start in range(0, len(mine), settings.batch_size):
            indices = mine[start : start + settings.batch_size]
            with autocast():
                part = _pair_losses(model, data, indices, settings, pad_id, device)
            loss = part["losses"].sum() / len(chunk)
            if not torch.isfinite(loss):
                raise LogitflowError(
                    f"train_dpo: loss is {float(loss.detach())} at step {step + 1}; the last good checkpoint in "
                    f"{checkpoint_dir} is kept (lower the learning rate or check the data)"
                )
            loss.backward()
            parts.append(part)
        if world > 1:
            _sum_gradients(trainable)
            parts = _gather_parts(parts)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics = {**_metrics(parts), "grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0]}
        if eval_data is not None and (step == total or (settings.eval_every and step % settings.eval_every == 0)):
            metrics.update(evaluate(model, eval_data, settings, pad_id, device, autocast))
        history.append(metrics)
        if rank == 0:
            on_metrics(metrics, step)
        if step == stop or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
            if rank == 0:
                save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, history)
            if world > 1:
                dist.barrier()
    _warn_on_falling_chosen(history)
    return history


def _warn_on_falling_chosen(history: list[dict[str, float]]) -> None:
    """DPO can widen margins by pushing both responses down; say so when it happens."""
    if len(history) < 4:
        return
    head, tail = history[: len(history) // 4], history[-(len(history) // 4) :]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    if mean(tail, "logps/chosen") < mean(head, "logps/chosen") and mean(tail, "rewards/margins") > mean(
        head, "rewards/margins"
    ):
        log.warning(
            "train_dpo: chosen log-probs fell (%.2f -> %.2f) while margins rose: the policy is lowering both responses",
            mean(head, "logps/chosen"),
            mean(tail, "logps/chosen"),
        )
