"""DPO losses (Rafailov et al. 2023) and variants, with TRL's conventions so numbers compare.

All take per-pair summed log-probs [B] of the policy and the reference and return
(losses [B], chosen_rewards [B], rejected_rewards [B]) with rewards β·(policy − reference).
With h = (π_c − π_r) − (ref_c − ref_r):

- sigmoid (DPO): −log σ(βh); with label smoothing ε, conservative DPO (Mitchell 2023):
  −(1 − ε) log σ(βh) − ε log σ(−βh).
- robust (Chowdhury et al. 2024, unbiased under label noise ε): (−(1 − ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε).
- ipo (Azar et al. 2023): (h − 1/(2β))²; TRL passes length-averaged log-probs for IPO, and so do we.
- hinge (SLiC, Zhao et al. 2023): max(0, 1 − βh).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, float, float], torch.Tensor]


def _sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return torch.relu(1 - beta * h)


LOSSES: dict[str, LossFn] = {"sigmoid": _sigmoid, "robust": _robust, "ipo": _ipo, "hinge": _hinge}
SMOOTHABLE = {"sigmoid", "robust"}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the implicit rewards β·(policy − reference) of each side [B]."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type '{loss_type}' (known: {', '.join(LOSSES)})")
    if label_smoothing and loss_type not in SMOOTHABLE:
        raise ValueError(f"label_smoothing applies to {sorted(SMOOTHABLE)}, not to '{loss_type}'")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
