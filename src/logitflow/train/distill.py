"""Student distillation: a `TrainTask` per loss on the teacher cache's sequences, and the held-out
evaluation (LM loss, KL to the teacher, top-1 agreement, ECE).

Losses: `rskd` (sparse RS-KD targets), `topk` (renormalised head), `topk_ghost` (head + tail bucket),
`full` (FullKD: the teacher runs every step, dense targets) and `ce` (no teacher: the real next
token only). Every KD loss is mixed with the real-next-token cross-entropy as α·KD + (1 − α)·CE.
The LM head runs only at positions that have a next token (no logits for padding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import torch

from logitflow.cache.reader import TeacherCache
from logitflow.config import DistillLoss
from logitflow.data.tokenize import pad_right
from logitflow.errors import LogitflowError
from logitflow.ops.lm_metrics import LmMetrics
from logitflow.ops.sparse_kd import (
    SparseTargets,
    full_kd_loss,
    sparse_cross_entropy,
    sparse_kd_loss,
    topk_from_cache,
)
from logitflow.train.loop import LoopSettings, logits_at

log = logging.getLogger(__name__)
LOSSES: tuple[str, ...] = get_args(DistillLoss)
CACHE_MODE = {"rskd": "rskd", "topk": "topk", "topk_ghost": "topk", "full": None, "ce": None}


@dataclass(frozen=True)
class DistillSettings(LoopSettings):
    loss: str = "rskd"
    alpha: float = 1.0  # weight of the KD term; 1 − alpha on the real next token
    temperature: float = 1.0  # the cache's: the targets were made at this temperature


def _valid_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] of the positions that predict a real next token, in row-major order."""
    return logits_at(model, input_ids, attention, attention[:, 1:].bool())


class DistillTask:
    """Items are cached sequences; the loss is summed over next-token positions ("tokens")."""

    unit = "tokens"

    def __init__(
        self,
        cache: TeacherCache,
        settings: DistillSettings,
        *,
        pad_id: int,
        device: torch.device,
        teacher: torch.nn.Module | None = None,
        max_sequences: int | None = None,
    ):
        if settings.loss not in LOSSES:
            raise LogitflowError(f"distill: unknown loss '{settings.loss}' (losses: {', '.join(LOSSES)})")
        expected = CACHE_MODE[settings.loss]
        if expected is not None and cache.mode != expected:
            raise LogitflowError(
                f"distill: loss '{settings.loss}' needs a {expected} cache, got {cache.directory} ({cache.mode})"
            )
        if settings.loss == "full" and teacher is None:
            raise LogitflowError("distill: loss 'full' runs the teacher every step; pass the teacher model")
        self.cache, self.settings, self.pad_id, self.device, self.teacher = cache, settings, pad_id, device, teacher
        lengths = cache.lengths()
        self.positions = lengths[:max_sequences] - 1 if max_sequences else lengths - 1

    def __len__(self) -> int:
        return len(self.positions)

    def units(self, indices: Sequence[int]) -> int:
        return int(self.positions[list(indices)].sum())

    def _targets(self, batch: Any, valid: torch.Tensor) -> SparseTargets:
        targets = batch.targets
        if self.settings.loss in ("topk", "topk_ghost"):
            targets = topk_from_cache(targets.ids, targets.probs, batch.tail, ghost=self.settings.loss == "topk_ghost")
        return SparseTargets(targets.ids[valid].to(self.device), targets.probs[valid].to(self.device))

    def loss(self, model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = self.cache.batch(indices, self.pad_id)
        input_ids, attention = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        valid_cpu = batch.attention_mask[:, 1:].bool()
        logits = _valid_logits(model, input_ids, attention).float()
        next_ids = input_ids[:, 1:][valid_cpu.to(self.device)]
        log_probs = torch.log_softmax(logits, -1)  # shared by CE and, at T = 1, by the KD term
        ce = -log_probs.gather(-1, next_ids[:, None]).sum()
        loss_name, temperature = self.settings.loss, self.settings.temperature
        if loss_name == "ce":
            kd = torch.zeros((), device=self.device)
        elif loss_name == "full":
            assert self.teacher is not None
            with torch.no_grad():
                teacher_logits = _valid_logits(self.teacher, input_ids, attention)
            kd = full_kd_loss(logits, teacher_logits, temperature=temperature).sum()
        elif temperature == 1.0:
            kd = sparse_cross_entropy(log_probs, self._targets(batch, valid_cpu)).sum()
        else:
            kd = sparse_kd_loss(logits, self._targets(batch, valid_cpu), temperature=temperature).sum()
        total = ce if loss_name == "ce" else self.settings.alpha * kd + (1 - self.settings.alpha) * ce
        parts = {
            "loss": total.detach().reshape(1),
            "lm_loss": ce.detach().reshape(1),
            "kd_loss": kd.detach().reshape(1),
            "tokens": torch.tensor([len(next_ids)], dtype=torch.float64),
        }
        return total, parts

    def metrics(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        sums = {key: float(sum(p[key].double().sum() for p in parts)) for key in parts[0]}
        tokens = max(sums.pop("tokens"), 1.0)
        return {key: value / tokens for key, value in sums.items()}


@torch.no_grad()
def evaluate_student(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    sequences: list[list[int]],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> LmMetrics:
    """Held-out next-token metrics of `student` (and, with a teacher, KL and top-1 agreement; the
    teacher's dense logits exist for one batch at a time)."""
    was_training = student.training
    student.eval()
    metrics = LmMetrics()
    for start in range(0, len(sequences), batch_size):
        input_ids, attention = pad_right(sequences[start : start + batch_size], pad_id)
        input_ids, attention = input_ids.to(device), attention.to(device)
        next_ids = input_ids[:, 1:][attention[:, 1:].bool()]
        with autocast():
            logits = _valid_logits(student, input_ids, attention)
            teacher_logits = None if teacher is None else _valid_logits(teacher, input_ids, attention)
        metrics.add(logits, next_ids, teacher_logits)
    student.train(was_training)
    return metrics
