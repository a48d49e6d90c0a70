"""Sparse teacher targets for knowledge distillation (pure tensor math, no I/O).

Alignment, once for the whole project: for a sequence of tokens x_0..x_{L-1}, row t of the
teacher's logits (and of every sparse target built from them) is the distribution of token t+1
given x_0..x_t: the same shift as the LM loss. A cache stores rows 0..L-2.

RS-KD (Anshumann et al. 2025, arXiv 2503.16870, §3): draw N ids with replacement from a proposal
q ∝ t^τ, t = softmax(logits / T), and keep the unique ids with their counts c_i. With τ = 1 the
target t̂_i = c_i / N is an unbiased estimate of t (E[t̂] = t), so the expected cross-entropy of a
student against t̂, and its gradient, equal those against t.

Top-K (the biased baseline): keep the K largest t_i and renormalise (t_i / Σ_K t), which inflates
the head and gives the tail no signal; or keep the tail mass 1 − Σ_K t as one "ghost" bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

# Sentinel id of the ghost bucket in `topk_targets(..., tail="ghost")`: it is no vocabulary id, so
# a loss must handle it explicitly (compare the teacher's tail mass with the student's).
GHOST_ID = -1


@dataclass(frozen=True)
class SparseTargets:
    """Sparse next-token targets.

    ids:   LongTensor [..., K], vocabulary ids (or GHOST_ID); padding slots hold id 0.
    probs: FloatTensor [..., K], summing to 1 over K per position; padding slots are 0.
    counts: LongTensor [..., K] or None, the RS-KD sample counts (exact, lossless form).
    """

    ids: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor | None = None

    @property
    def num_unique(self) -> torch.Tensor:
        """LongTensor [...]: non-padding slots per position."""
        return (self.probs > 0).sum(-1)


def teacher_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float32. logits: [..., V] -> [..., V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1)


def unique_counts(samples: torch.Tensor, max_unique: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row unique values and their counts, vectorised (no loop over rows).

    samples: LongTensor [P, N] -> (ids [P, K], counts [P, K]) with K the largest number of unique
    values in a row (or `max_unique`); ids ascending within a row, padding slots have count 0.
    """
    sorted_samples, _ = samples.sort(dim=-1)
    is_new = torch.ones_like(sorted_samples, dtype=torch.bool)
    is_new[:, 1:] = sorted_samples[:, 1:] != sorted_samples[:, :-1]
    slot = is_new.long().cumsum(-1) - 1  # [P, N]: which unique slot each sample falls in
    width = max_unique if max_unique is not None else int(slot[:, -1].max().item()) + 1 if samples.numel() else 0
    ids = torch.zeros(samples.shape[0], width, dtype=torch.long, device=samples.device)
    counts = torch.zeros_like(ids)
    ids.scatter_(1, slot, sorted_samples)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    return ids, counts


def rskd_sample(
    logits: torch.Tensor,
    n_samples: int,
    *,
    temperature: float = 1.0,
    proposal_power: float = 1.0,
    generator: torch.Generator | None = None,
) -> SparseTargets:
    """Random-Sampling KD targets: `n_samples` draws with replacement per position.

    logits: [..., V] (any float dtype, any device). Returns SparseTargets with ids/probs/counts
    [..., K], K = the most unique ids at any position of this call.

    proposal_power τ = 1 (default, the paper's choice): probs = counts / N, exact and unbiased.
    τ ≠ 1: draws from q ∝ t^τ and weights each unique id by c_i · t_i / q_i, self-normalised to
    sum to 1. Self-normalised importance sampling is consistent but biased, by O(1/N).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if proposal_power < 0:
        raise ValueError(f"proposal_power must be >= 0, got {proposal_power}")
    batch_shape, vocab = logits.shape[:-1], logits.shape[-1]
    t = teacher_probs(logits, temperature).reshape(-1, vocab)
    q = t if proposal_power == 1.0 else teacher_probs(logits.float() * proposal_power, temperature).reshape(-1, vocab)
    # Inverse-CDF sampling with sorted uniforms: the draws come out sorted by id, and it is several
    # times faster than torch.multinomial on CPU for a 50k vocabulary.
    cdf = q.cumsum(-1)
    uniforms = torch.rand(q.shape[0], n_samples, generator=generator, device=q.device, dtype=cdf.dtype)
    targets = uniforms.sort(-1).values * cdf[:, -1:]
    samples = torch.searchsorted(cdf, targets, right=True).clamp_max_(vocab - 1)
    ids, counts = unique_counts(samples)
    if proposal_power == 1.0:
        probs = counts.float() / n_samples
    else:
        ratio = t.gather(1, ids) / q.gather(1, ids).clamp_min(torch.finfo(torch.float32).tiny)
        weights = counts.float() * ratio
        probs = weights / weights.sum(-1, keepdim=True)
    shape = (*batch_shape, ids.shape[-1])
    return SparseTargets(ids.reshape(shape), probs.reshape(shape), counts.reshape(shape))


def topk_targets(
    logits: torch.Tensor, k: int, *, temperature: float = 1.0, tail: Literal["renormalize", "ghost"] = "renormalize"
) -> SparseTargets:
    """Top-K targets from logits [..., V].

    tail="renormalize": ids/probs [..., k], probs t_i / Σ_K t (biased: the head is inflated).
    tail="ghost": ids/probs [..., k+1]; the last slot has id GHOST_ID and the tail mass 1 − Σ_K t.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, vocab size {logits.shape[-1]}], got {k}")
    t = teacher_probs(logits, temperature)
    head, ids = t.topk(k, dim=-1)
    if tail == "renormalize":
        return SparseTargets(ids, head / head.sum(-1, keepdim=True))
    if tail != "ghost":
        raise ValueError(f"tail must be 'renormalize' or 'ghost', got {tail!r}")
    tail_mass = (1.0 - head.sum(-1, keepdim=True)).clamp_min(0.0)
    ghost = torch.full_like(ids[..., :1], GHOST_ID)
    return SparseTargets(torch.cat([ids, ghost], -1), torch.cat([head, tail_mass], -1))


# ---------------------------------------------------------------- losses
#
# Each returns the per-position loss [...] (the shape of the logits without the vocabulary axis),
# scaled by T² so that gradient magnitudes do not shrink with the temperature (Hinton et al.).
# Positions whose target probabilities are all zero (padding) have loss 0; callers average over
# the positions they count. The losses are cross-entropies: they differ from the KL by the target's
# entropy, a constant, so their gradients are the KL's.


def sparse_kd_loss(student_logits: torch.Tensor, targets: SparseTargets, *, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of softmax(student_logits / T) against a sparse target, by gathering the
    student's log-probabilities at the stored ids (no dense [positions, vocab] target is built).

    student_logits: [..., V]; targets: ids/probs [..., K]. Ids equal to GHOST_ID (Top-K with a ghost
    bucket) stand for "every id not in this row": the student's mass there is 1 − Σ its head."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return sparse_cross_entropy(log_student, targets) * temperature**2


def sparse_cross_entropy(log_probs: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """−Σ_k p_k · log q(id_k) from log-probabilities [..., V] the caller already has (e.g. shared
    with the real-next-token loss at T = 1), without temperature scaling."""
    ghost = targets.ids == GHOST_ID
    gathered = log_probs.gather(-1, targets.ids.clamp_min(0))
    if ghost.any():
        head = torch.logsumexp(gathered.masked_fill(ghost, -torch.inf), dim=-1, keepdim=True)
        log_tail = torch.log((-torch.expm1(head)).clamp_min(torch.finfo(torch.float32).tiny))
        gathered = torch.where(ghost, log_tail, gathered)
    return -(targets.probs * gathered).sum(-1)


def full_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """FullKD, the dense baseline: cross-entropy of softmax(student / T) against softmax(teacher / T).
    student_logits, teacher_logits: [..., V] -> [...]."""
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs(teacher_logits, temperature) * log_student).sum(-1) * temperature**2


def topk_from_cache(ids: torch.Tensor, head_probs: torch.Tensor, tail: torch.Tensor, *, ghost: bool) -> SparseTargets:
    """Top-K targets from a cache's stored head probabilities t_i [..., k] and tail mass [...]:
    renormalised over the head, or with the tail as a GHOST_ID slot. Rows of zeros stay zeros."""
    if ghost:
        ids = torch.cat([ids, torch.full_like(ids[..., :1], GHOST_ID)], -1)
        head_probs = torch.cat([head_probs, tail[..., None]], -1)
    total = head_probs.sum(-1, keepdim=True)
    return SparseTargets(ids, head_probs / total.clamp_min(torch.finfo(torch.float32).tiny))
