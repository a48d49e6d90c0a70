"""How faithfully a sparse KD loss reproduces the FullKD gradient (pure tensor math)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def flat_gradient(loss: torch.Tensor, parameters: Sequence[torch.Tensor]) -> torch.Tensor:
    """d loss / d parameters as one float64 vector (the graph is kept for the next loss)."""
    grads = torch.autograd.grad(loss, list(parameters), retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).double()
            for g, p in zip(grads, parameters, strict=True)
        ]
    )


def angle_and_norm_ratio(gradient: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(angle in degrees between the two vectors, ‖gradient‖ / ‖reference‖)."""
    gradient, reference = gradient.double().flatten(), reference.double().flatten()
    norms = gradient.norm() * reference.norm()
    cosine = float((gradient @ reference) / norms) if norms > 0 else 1.0
    angle = math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
    return angle, float(gradient.norm() / reference.norm()) if reference.norm() > 0 else math.inf
