"""Greedy D-optimal design for active DPO (Kveton et al. 2025, arXiv 2503.01076, Alg. 1-2).

DPO linearised at the last layer is logistic regression: pair i has feature φ_i (the difference
of the two responses' last-layer embeddings), offset b_i (the reference log-ratio) and preference
probability μ_i = σ(β(φ_iᵀθ − b_i)). Its Fisher information is H = γI + Σ_S w_i φ_i φ_iᵀ with
w_i = β² μ_i (1 − μ_i). The greedy design adds, one pair at a time, the pair maximising
log det(H + w_i φ_i φ_iᵀ) − log det H = log(1 + w_i φ_iᵀ H⁻¹ φ_i) (matrix determinant lemma),
and updates H⁻¹ by Sherman–Morrison.

Exact greedy over the whole pool, fast: a pair's gain never increases as H grows (H⁻¹ shrinks,
and the weights used here are constant or shrink with H), so stale gains are upper bounds. Each
step re-evaluates exactly only the candidates with the largest bounds, in a batch, and stops as
soon as the best exact gain beats every remaining bound (lazy greedy, Minoux 1978). The choice is
the same as rescoring the whole pool every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# weight_fn(indices [B], quad [B] = φᵀH⁻¹φ) -> weights [B]; must not increase as H grows.
WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def constant_weights(weights: torch.Tensor | None, n: int) -> WeightFn:
    table = torch.ones(n, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    return lambda indices, quad: table[indices.cpu()].to(quad.device)


def optimistic_weights(logits: torch.Tensor, beta: float, alpha: float) -> WeightFn:
    """ADPO's stabilised weights: w = β² μ(z)(1 − μ(z)), z = max(|ℓ| − α·β·sqrt(φᵀΣ̂φ), 0), with
    ℓ_i = β(φ_iᵀθ̂ − b_i) and Σ̂ = the current H⁻¹ (so φᵀΣ̂φ is the `quad` the design computes).

    Σ̂ is the covariance of θ̂, so the standard deviation of the logit ℓ is β·sqrt(φᵀΣ̂φ): the paper
    writes α·sqrt(φᵀΣ̂φ) and runs β = 1, where the two agree; with DPO's usual β = 0.1 the unscaled
    form would zero every z and turn ADPO into APO. Optimism shrinks confident logits toward 0 while
    little is known; as H grows, z grows and the weight shrinks, so lazy bounds stay valid."""
    magnitude = logits.abs().to(torch.float64)

    def weight(indices: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
        z = (magnitude[indices.cpu()].to(quad.device) - alpha * beta * quad.clamp_min(0).sqrt()).clamp_min(0)
        mu = torch.sigmoid(z)
        return beta**2 * mu * (1 - mu)

    return weight


@dataclass(frozen=True)
class DesignResult:
    indices: torch.Tensor  # LongTensor [k], in pick order
    gains: torch.Tensor  # [k], log det increase of each pick
    logdet: torch.Tensor  # [k], log det H after each pick (H = γI + Σ w φφᵀ)


TIE_TOLERANCE = 1e-9


class DOptimalDesign:
    """Incremental greedy D-optimal design over a fixed pool of features [N, d].

    Every pair's quad = φᵀH⁻¹φ is kept exact as of the last sync; the rank-one updates since then
    (ũ_j = H⁻¹v_j / sqrt(1 + v_jᵀH⁻¹v_j), so quad drops by (φᵀũ_j)²) are applied on demand to the
    few candidates lazy evaluation looks at, and to the whole pool every `sync_every` picks as one
    matrix product (a GEMM instead of a memory-bound matrix-vector product per pick).
    """

    def __init__(
        self, features: torch.Tensor, gamma: float, weight_fn: WeightFn, *, block: int = 32, sync_every: int = 64
    ):
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"features must be a non-empty [N, d] matrix, got shape {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or inf")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.features = features
        self.device = features.device
        n, d = features.shape
        self.gamma = gamma
        self.hinv = torch.eye(d, dtype=torch.float64, device=self.device) / gamma
        self.logdet = d * math.log(gamma)
        self.available = torch.ones(n, dtype=torch.bool, device=self.device)
        self.synced_quad = features.to(torch.float64).pow(2).sum(-1) / gamma
        self.pending: list[torch.Tensor] = []
        self.block, self.sync_every = block, sync_every
        self.indices: list[int] = []
        self.gains: list[float] = []
        self.logdets: list[float] = []
        self.reweight(weight_fn)

    def _quad(self, indices: torch.Tensor) -> torch.Tensor:
        quad = self.synced_quad[indices]
        if self.pending:
            rows = self.features[indices].to(torch.float64)
            quad = quad - (rows @ torch.stack(self.pending).T).pow(2).sum(-1)
        return quad

    def _gains(self, indices: torch.Tensor, quad: torch.Tensor) -> torch.Tensor:
        return torch.log1p(self.weight_fn(indices, quad) * quad)

    def _sync(self) -> None:
        """Apply the pending rank-one updates to every pair's quad, and refresh every bound."""
        if self.pending:
            updates = torch.stack(self.pending).to(self.features.dtype)
            for start in range(0, self.features.shape[0], 16_384):
                rows = self.features[start : start + 16_384]
                self.synced_quad[start : start + 16_384] -= (rows @ updates.T).to(torch.float64).pow(2).sum(-1)
            self.pending = []
        everything = torch.arange(self.features.shape[0], device=self.device)
        self.bounds = self._gains(everything, self.synced_quad)

    def reweight(self, weight_fn: WeightFn) -> None:
        """New weights (e.g. after a refit of θ̂): every bound is recomputed exactly."""
        self.weight_fn = weight_fn
        self._sync()

    def remove(self, index: int) -> None:
        """Take a pair out of the pool without adding it to H (e.g. a skipped question)."""
        self.available[index] = False

    @property
    def remaining(self) -> int:
        return int(self.available.sum())

    def best(self) -> int:
        """The available pair with the largest exact gain (lazy evaluation). Gains within a relative
        TIE_TOLERANCE of the largest are ties, won by the lowest index, so the pick does not depend
        on which bounds happen to be fresh (a session replayed from disk asks what an uninterrupted
        one would) nor on last-bit rounding (pairs (x, y₁, y₂) and (x, y₂, y₁) have equal gains)."""
        if self.remaining == 0:
            raise ValueError("the pool is exhausted")
        masked = torch.where(self.available, self.bounds, torch.tensor(-math.inf, dtype=torch.float64))
        size = self.block
        while True:
            take = min(size + 1, self.remaining)
            top = masked.topk(take)
            candidates = top.indices[: min(size, take)]
            exact = self._gains(candidates, self._quad(candidates))
            self.bounds[candidates] = exact
            masked[candidates] = exact
            tied = exact.max() - TIE_TOLERANCE * exact.max().abs()
            outside = top.values[size] if take > size else torch.tensor(-math.inf, dtype=torch.float64)
            if outside < tied:
                return int(candidates[exact >= tied].min())
            size *= 4

    def add(self, index: int) -> float:
        """Add pair `index` to the design with its current weight; returns its gain."""
        row = self.features[index].to(torch.float64)
        position = torch.tensor([index], device=self.device)
        weight = float(self.weight_fn(position, self._quad(position))[0])
        v = math.sqrt(weight) * row
        u = self.hinv @ v
        denominator = 1.0 + float(v @ u)
        update = u / math.sqrt(denominator)
        self.hinv -= torch.outer(update, update)
        self.pending.append(update)
        gain = math.log(denominator)
        self.logdet += gain
        self.available[index] = False
        self.indices.append(index)
        self.gains.append(gain)
        self.logdets.append(self.logdet)
        if len(self.pending) >= self.sync_every:
            self._sync()
        return gain

    def step(self) -> int:
        index = self.best()
        self.add(index)
        return index

    def result(self) -> DesignResult:
        return DesignResult(
            torch.tensor(self.indices, dtype=torch.long),
            torch.tensor(self.gains, dtype=torch.float64),
            torch.tensor(self.logdets, dtype=torch.float64),
        )


def check_budget(n: int, k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k = {k} is larger than the pool ({n} pairs)")


def greedy_design(
    features: torch.Tensor, k: int, *, weight_fn: WeightFn | None = None, gamma: float = 1.0
) -> DesignResult:
    check_budget(features.shape[0], k)
    design = DOptimalDesign(features, gamma, weight_fn or constant_weights(None, features.shape[0]))
    for _ in range(k):
        design.step()
    return design.result()


def greedy_doptimal(
    features: torch.Tensor, k: int, *, weights: torch.Tensor | None = None, gamma: float = 1.0
) -> torch.Tensor:
    """Indices [k] in pick order, no repeats; each pick maximises log det(γI + Σ w_i φ_i φ_iᵀ).

    features: [N, d]; weights: [N] ≥ 0 (None: all 1); gamma: absolute ridge γ > 0."""
    if weights is not None and (weights.shape != (features.shape[0],) or (weights < 0).any()):
        raise ValueError(f"weights must be a non-negative [N={features.shape[0]}] vector")
    return greedy_design(features, k, weight_fn=constant_weights(weights, features.shape[0]), gamma=gamma).indices


def logdet_of(features: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None, gamma: float) -> float:
    """log det(γI + Σ_{i ∈ indices} w_i φ_i φ_iᵀ), directly (a reference for tests and benchmarks)."""
    rows = features[indices].to(torch.float64)
    w = torch.ones(len(indices), dtype=torch.float64) if weights is None else weights[indices].to(torch.float64)
    matrix = gamma * torch.eye(features.shape[1], dtype=torch.float64) + rows.T @ (w[:, None] * rows)
    return float(torch.logdet(matrix))


# ---------------------------------------------------------------- fitting θ̂


def dpo_logits(features: torch.Tensor, offsets: torch.Tensor, theta: torch.Tensor, beta: float) -> torch.Tensor:
    """β(φ_iᵀθ − b_i): [N]."""
    return beta * (features.to(torch.float64) @ theta - offsets.to(torch.float64))


def fit_theta(
    features: torch.Tensor,
    offsets: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    l2: float,
    iterations: int = 50,
    tolerance: float = 1e-10,
) -> torch.Tensor:
    """Ridge-regularised DPO/logistic fit of θ (Newton's method, float64):
    argmin Σ −[y log μ + (1−y) log(1−μ)] + (λ/2)‖θ‖², μ = σ(β(φᵀθ − b)); labels y ∈ {0, 1},
    1 = the first response is preferred. λ > 0 keeps early refits (n < d) well posed."""
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    phi = features.to(torch.float64)
    b, y = offsets.to(torch.float64), labels.to(torch.float64)
    theta = torch.zeros(phi.shape[1], dtype=torch.float64, device=phi.device)
    eye = torch.eye(phi.shape[1], dtype=torch.float64, device=phi.device)

    def loss(t: torch.Tensor) -> torch.Tensor:
        z = beta * (phi @ t - b)
        return torch.nn.functional.softplus(z).sum() - (y * z).sum() + 0.5 * l2 * t @ t

    current = loss(theta)
    for _ in range(iterations):
        mu = torch.sigmoid(beta * (phi @ theta - b))
        grad = beta * phi.T @ (mu - y) + l2 * theta
        hessian = beta**2 * phi.T @ (phi * (mu * (1 - mu))[:, None]) + l2 * eye
        direction = torch.linalg.solve(hessian, grad)
        step = 1.0
        while step > 1e-8:
            candidate = theta - step * direction
            value = loss(candidate)
            if value <= current:
                break
            step /= 2
        decrease = float(current - value)
        theta, current = candidate, value
        if decrease < tolerance * max(1.0, abs(float(current))):
            break
    return theta
