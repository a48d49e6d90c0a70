"""DPO training: reference log-probs come from the score_prefs cache (no reference model in memory)
and the LM head runs only at response positions. Accumulation, schedule, clipping, checkpoints,
exact resume and torchrun are the shared loop's (`train.loop`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitflow.compute import Fsdp
from logitflow.data.tokenize import TokenizedPair, pad_right
from logitflow.errors import LogitflowError
from logitflow.ops.dpo import dpo_loss
from logitflow.train.loop import LoopSettings, logits_at, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DpoSettings(LoopSettings):
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


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
    predicts = response[:, 1:]  # hidden state t predicts token t + 1
    logits = logits_at(model, input_ids, attention, predicts).float()
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


class DpoTask:
    """DPO as a `TrainTask`: items are pairs, the loss is summed over pairs."""

    unit = "pairs"

    def __init__(self, data: DpoData, settings: DpoSettings, pad_id: int, device: torch.device):
        self.data, self.settings, self.pad_id, self.device = data, settings, pad_id, device

    def __len__(self) -> int:
        return len(self.data)

    def units(self, indices) -> int:
        return len(indices)

    def loss(self, model, indices: list[int]):
        part = _pair_losses(model, self.data, indices, self.settings, self.pad_id, self.device)
        return part["losses"].sum(), {k: v.detach() for k, v in part.items()}

    def metrics(self, parts) -> dict[str, float]:
        return _metrics(parts)


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
    fsdp: Fsdp | None = None,
) -> list[dict[str, float]]:
    """Train in place (see `train.loop.train`, also for `fsdp`); resumes from `checkpoint_dir` when it
    holds a checkpoint. Returns the per-step history."""
    if len(data) == 0:
        raise LogitflowError("train_dpo: the selection is empty")
    history = train(
        model,
        DpoTask(data, settings, pad_id, device),
        settings,
        name="train_dpo",
        autocast=autocast,
        checkpoint_dir=checkpoint_dir,
        evaluate=None if eval_data is None else lambda m: evaluate(m, eval_data, settings, pad_id, device, autocast),
        on_metrics=on_metrics,
        max_steps=max_steps,
        fsdp=fsdp,
    )
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
