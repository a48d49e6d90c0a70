"""DPO losses against their closed forms, and the direction of their gradients."""

from __future__ import annotations

import math

import pytest
import torch

from logitflow.ops.dpo import dpo_loss


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(-20 + 5 * torch.randn(16, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]


def _sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    ("loss_type", "eps", "closed_form"),
    [
        ("sigmoid", 0.0, lambda h, b, e: -math.log(_sigma(b * h))),
        ("sigmoid", 0.2, lambda h, b, e: -(1 - e) * math.log(_sigma(b * h)) - e * math.log(_sigma(-b * h))),
        (
            "robust",
            0.2,
            lambda h, b, e: (-(1 - e) * math.log(_sigma(b * h)) + e * math.log(_sigma(-b * h))) / (1 - 2 * e),
        ),
        ("ipo", 0.0, lambda h, b, e: (h - 1 / (2 * b)) ** 2),
        ("hinge", 0.0, lambda h, b, e: max(0.0, 1 - b * h)),
    ],
)
def test_losses_match_closed_forms(loss_type: str, eps: float, closed_form) -> None:
    pc, pr, rc, rr = _inputs()
    beta = 0.3
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    for i in range(16):
        h = float(((pc[i] - pr[i]) - (rc[i] - rr[i])).detach())
        assert float(losses[i].detach()) == pytest.approx(closed_form(h, beta, eps), rel=1e-9, abs=1e-12)
    assert torch.allclose(chosen, beta * (pc - rc).detach()) and torch.allclose(rejected, beta * (pr - rr).detach())
    assert not chosen.requires_grad


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "ipo", "hinge"])
def test_gradients_raise_chosen_and_lower_rejected(loss_type: str) -> None:
    pc, pr, rc, rr = _inputs(1)
    with torch.no_grad():  # a margin below every variant's target, so every pair is still pushed
        pc.copy_(pr - 1.0)
        rc.copy_(rr)
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    assert rc.grad is not None and (rc.grad > 0).all(), "a higher reference chosen log-prob lowers the margin"


def test_sigmoid_loss_at_zero_margin_is_log_two() -> None:
    zeros = torch.zeros(3)
    losses, _, _ = dpo_loss(zeros, zeros, zeros, zeros, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": 0.1, "loss_type": "kto"}, "unknown loss_type 'kto'"),
        ({"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1}, "not to 'ipo'"),
        ({"beta": 0.1, "loss_type": "hinge", "label_smoothing": 0.1}, "not to 'hinge'"),
        ({"beta": 0.1, "label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **kwargs)
