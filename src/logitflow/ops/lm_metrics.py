"""Next-token metrics of a language model (pure tensor math): log-loss against the real next token,
KL to a teacher, top-1 agreement and calibration (ECE with a reliability table).

Every function takes flat [N, V] logits of the positions that count (padding already removed);
`LmMetrics` accumulates sums over batches so the result does not depend on the batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CalibrationBins:
    """Top-label calibration in `n_bins` equal-width confidence bins (bin b holds (b/n, (b+1)/n])."""

    n_bins: int = 15
    counts: torch.Tensor = field(init=False)
    confidence: torch.Tensor = field(init=False)
    correct: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.n_bins, dtype=torch.float64)
        self.confidence = torch.zeros(self.n_bins, dtype=torch.float64)
        self.correct = torch.zeros(self.n_bins, dtype=torch.float64)

    def add(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """confidence [N] in [0, 1], correct [N] bool."""
        confidence = confidence.detach().double().cpu()
        bins = (torch.ceil(confidence * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        self.counts.index_add_(0, bins, torch.ones_like(confidence))
        self.confidence.index_add_(0, bins, confidence)
        self.correct.index_add_(0, bins, correct.detach().double().cpu())

    @property
    def ece(self) -> float:
        """Σ_b |B_b|/N · |accuracy(B_b) − confidence(B_b)|."""
        total = self.counts.sum()
        if total == 0:
            return 0.0
        return float(((self.correct - self.confidence).abs() / total).sum())

    def table(self) -> list[dict[str, float]]:
        """Per bin: its upper edge, count, mean confidence and accuracy (a reliability diagram)."""
        rows = []
        for b in range(self.n_bins):
            n = float(self.counts[b])
            rows.append(
                {
                    "bin_upper": (b + 1) / self.n_bins,
                    "count": n,
                    "confidence": float(self.confidence[b]) / n if n else 0.0,
                    "accuracy": float(self.correct[b]) / n if n else 0.0,
                }
            )
        return rows


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per position: [N, V] x 2 -> [N] (nats)."""
    log_t = torch.log_softmax(teacher_logits.float(), -1)
    log_s = torch.log_softmax(student_logits.float(), -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


@dataclass
class LmMetrics:
    """Sums over positions of a held-out pass; `result()` gives the means."""

    n_bins: int = 15
    positions: int = 0
    log_loss: float = 0.0
    kl: float = 0.0
    agreement: float = 0.0
    calibration: CalibrationBins = field(init=False)

    def __post_init__(self) -> None:
        self.calibration = CalibrationBins(self.n_bins)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, next_ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        """logits [N, V] of the counted positions, next_ids [N] the real next tokens."""
        logits = logits.float()
        log_probs = torch.log_softmax(logits, -1)
        self.positions += len(next_ids)
        self.log_loss += float(-log_probs.gather(-1, next_ids[:, None]).sum())
        confidence, predicted = log_probs.max(-1)
        self.calibration.add(confidence.exp(), predicted == next_ids)
        if teacher_logits is not None:
            self.kl += float(kl_divergence(teacher_logits, logits).sum())
            self.agreement += float((teacher_logits.argmax(-1) == predicted).sum())

    def result(self, with_teacher: bool = True) -> dict[str, float]:
        n = max(self.positions, 1)
        metrics = {"lm_loss": self.log_loss / n, "ece": self.calibration.ece}
        if with_teacher:
            metrics |= {"kl_to_teacher": self.kl / n, "top1_agreement": self.agreement / n}
        return metrics
