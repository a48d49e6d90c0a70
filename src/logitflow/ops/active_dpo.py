"""Preference-pair selection methods for DPO on top of the greedy D-optimal design.

- `uniform`: a seeded random subset (baseline).
- `apo`: the unweighted design (Das et al. 2024): constant weight β²/4 (μ = ½ everywhere).
- `adpo`: online ADPO (Kveton et al. 2025, Alg. 1): θ̂₀ = 0; after t labels with t = 2^k, θ̂ is refit
  on the labels chosen so far (ridge λ, since early refits see fewer labels than dimensions) and
  the weights of the remaining pool are recomputed; earlier picks keep the weight they had.
- `adpo_plus`: offline ADPO+ (Alg. 2): θ̂ fit once on all logged labels, weights β²μ(1 − μ).

ADPO and ADPO+ use the paper's optimism: μ is evaluated at z = max(|ℓ| − α·β·sqrt(φᵀΣ̂φ), 0) with
Σ̂ = the current H⁻¹ (α = 3 in all of the paper's experiments).

Conventions: φ_i = φ(x, y_i1) − φ(x, y_i2) scaled globally so max‖φ‖ = 1 (as the theory assumes);
b_i = log π_ref(y_i1|x) − log π_ref(y_i2|x); label 1 = the first response is preferred.
The ridge is set relative to the data: γ = gamma_rel · mean_i(w_i‖φ_i‖²), so the design does not
change when φ or β are rescaled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from logitflow.ops.design import (
    DOptimalDesign,
    WeightFn,
    check_budget,
    constant_weights,
    dpo_logits,
    fit_theta,
    optimistic_weights,
)


@dataclass(frozen=True)
class SelectionSettings:
    beta: float = 0.1
    gamma_rel: float = 1.0
    alpha: float = 3.0
    l2: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Selection:
    indices: torch.Tensor  # [k] in pick order
    gains: torch.Tensor  # [k] log det gain of each pick under the method's own criterion (0 for uniform)
    logdet: torch.Tensor  # [k] running log det of the method's own design (uniform: NaN)


def scale_features(features: torch.Tensor) -> tuple[torch.Tensor, float]:
    """φ / max‖φ‖ (and the scale), so every ‖φ_i‖ ≤ 1."""
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    norm = float(features.norm(dim=-1).max())
    if norm == 0:
        raise ValueError("all features are zero: the pairs' responses have identical embeddings")
    return features / norm, norm


def relative_gamma(features: torch.Tensor, weights: torch.Tensor, gamma_rel: float) -> float:
    return gamma_rel * float((weights.to(torch.float64) * features.to(torch.float64).pow(2).sum(-1)).mean())


def select_uniform(
    features: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor | None, k: int, settings: SelectionSettings
) -> Selection:
    check_budget(features.shape[0], k)
    generator = torch.Generator().manual_seed(settings.seed)
    indices = torch.randperm(features.shape[0], generator=generator)[:k]
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    return Selection(indices, torch.zeros(k, dtype=torch.float64), nan)


def _run_design(features: torch.Tensor, k: int, gamma: float, weight_fn: WeightFn) -> Selection:
    design = DOptimalDesign(features, gamma, weight_fn)
    for _ in range(k):
        design.step()
    result = design.result()
    return Selection(result.indices, result.gains, result.logdet)


def select_apo(
    features: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor | None, k: int, settings: SelectionSettings
) -> Selection:
    check_budget(features.shape[0], k)
    weights = torch.full((features.shape[0],), settings.beta**2 / 4, dtype=torch.float64)
    gamma = relative_gamma(features, weights, settings.gamma_rel)
    return _run_design(features, k, gamma, constant_weights(weights, features.shape[0]))


def _fisher_weights(logits: torch.Tensor, beta: float) -> torch.Tensor:
    mu = torch.sigmoid(logits)
    return beta**2 * mu * (1 - mu)


def select_adpo_plus(
    features: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor | None, k: int, settings: SelectionSettings
) -> Selection:
    check_budget(features.shape[0], k)
    if labels is None:
        raise ValueError("adpo_plus fits θ̂ on all logged labels, but the pool has no labels")
    theta = fit_theta(features, offsets, labels, beta=settings.beta, l2=settings.l2)
    logits = dpo_logits(features, offsets, theta, settings.beta)
    gamma = relative_gamma(features, _fisher_weights(logits, settings.beta), settings.gamma_rel)
    return _run_design(features, k, gamma, optimistic_weights(logits, settings.beta, settings.alpha))


class ActiveSelector:
    """Online ADPO over an unlabelled pool: propose the most informative pair, take its label when
    it arrives, refit θ̂ after 1, 2, 4, 8, ... labels. A skipped pair leaves the pool without
    entering H. Pairs are (response_a, response_b); label 1 = response_a preferred."""

    def __init__(self, features: torch.Tensor, offsets: torch.Tensor, settings: SelectionSettings):
        self.features, self.scale = scale_features(features)
        self.offsets = offsets.to(torch.float64)
        self.settings = settings
        self.theta = torch.zeros(features.shape[1], dtype=torch.float64)
        logits = dpo_logits(self.features, self.offsets, self.theta, settings.beta)
        gamma = relative_gamma(self.features, _fisher_weights(logits, settings.beta), settings.gamma_rel)
        self.design = DOptimalDesign(self.features, gamma, optimistic_weights(logits, settings.beta, settings.alpha))
        self.labelled: list[int] = []
        self.labels: list[int] = []
        self.refits: list[int] = []  # label counts at which θ̂ was refit

    @property
    def remaining(self) -> int:
        return self.design.remaining

    def propose(self) -> tuple[int, float]:
        """The next pair to ask about and its information gain (log det increase)."""
        index = self.design.best()
        return index, float(self.design.bounds[index])

    def label(self, index: int, preferred_first: bool) -> float:
        """Record a label; returns the pair's gain. Refits θ̂ when the label count is a power of 2."""
        gain = self.design.add(index)
        self.labelled.append(index)
        self.labels.append(int(preferred_first))
        count = len(self.labelled)
        if count & (count - 1) == 0:
            self._refit()
        return gain

    def skip(self, index: int) -> None:
        self.design.remove(index)

    def _refit(self) -> None:
        chosen = torch.tensor(self.labelled)
        self.theta = fit_theta(
            self.features[chosen],
            self.offsets[chosen],
            torch.tensor(self.labels, dtype=torch.float64),
            beta=self.settings.beta,
            l2=self.settings.l2,
        )
        logits = dpo_logits(self.features, self.offsets, self.theta, self.settings.beta)
        self.design.reweight(optimistic_weights(logits, self.settings.beta, self.settings.alpha))
        self.refits.append(len(self.labelled))


def select_adpo(
    features: torch.Tensor, offsets: torch.Tensor, labels: torch.Tensor | None, k: int, settings: SelectionSettings
) -> Selection:
    """ADPO on logged data: the ActiveSelector, with the logged labels answering its questions."""
    check_budget(features.shape[0], k)
    if labels is None:
        raise ValueError("adpo needs the labels of the pairs it chooses, but the pool has no labels")
    selector = ActiveSelector(features, offsets, settings)
    for _ in range(k):
        index, _ = selector.propose()
        selector.label(index, bool(labels[index] > 0.5))
    result = selector.design.result()
    return Selection(result.indices, result.gains, result.logdet)


Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int, SelectionSettings], Selection]
METHODS: dict[str, Method] = {
    "uniform": select_uniform,
    "apo": select_apo,
    "adpo": select_adpo,
    "adpo_plus": select_adpo_plus,
}


def select(
    method: str,
    features: torch.Tensor,
    offsets: torch.Tensor,
    labels: torch.Tensor | None,
    k: int,
    settings: SelectionSettings,
) -> Selection:
    """Run a method on features already scaled to ‖φ‖ ≤ 1 (see `scale_features`)."""
    if method not in METHODS:
        raise ValueError(f"unknown selection method '{method}' (methods: {', '.join(METHODS)})")
    return METHODS[method](features, offsets, labels, k, settings)
