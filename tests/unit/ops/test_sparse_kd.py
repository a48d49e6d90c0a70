"""RS-KD and Top-K targets against dense references."""

from __future__ import annotations

import pytest
import torch

from logitflow.ops.sparse_kd import GHOST_ID, rskd_sample, teacher_probs, topk_targets, unique_counts

# 99.9% quantile of chi-square with 9 degrees of freedom.
CHI2_9DF_999 = 27.877


def _dense(targets, vocab: int) -> torch.Tensor:
    dense = torch.zeros(*targets.ids.shape[:-1], vocab)
    return dense.scatter_add_(-1, targets.ids.clamp_min(0), targets.probs)


def test_unique_counts_matches_brute_force() -> None:
    samples = torch.randint(0, 7, (50, 12), generator=torch.Generator().manual_seed(0))
    ids, counts = unique_counts(samples)
    for row, (row_ids, row_counts) in enumerate(zip(ids.tolist(), counts.tolist(), strict=True)):
        expected = sorted({v: samples[row].tolist().count(v) for v in set(samples[row].tolist())}.items())
        got = [(i, c) for i, c in zip(row_ids, row_counts, strict=True) if c > 0]
        assert got == expected


def test_counts_sum_to_n_ids_unique_probs_exact() -> None:
    logits = torch.randn(4, 6, 300, generator=torch.Generator().manual_seed(1)) * 3
    targets = rskd_sample(logits, 50, generator=torch.Generator().manual_seed(2))
    assert targets.ids.shape[:-1] == (4, 6) and targets.counts is not None
    assert (targets.counts.sum(-1) == 50).all()
    assert torch.allclose(targets.probs, targets.counts.float() / 50)
    filled = targets.probs > 0
    flat_ids, flat_filled = targets.ids.reshape(-1, targets.ids.shape[-1]), filled.reshape(-1, filled.shape[-1])
    for row_ids, row_filled in zip(flat_ids, flat_filled, strict=True):
        kept = row_ids[row_filled]
        assert len(kept.unique()) == len(kept)


def test_rskd_is_unbiased_chi_square() -> None:
    """Pooled counts over many positions of the same logits are Multinomial(M·N, t)."""
    vocab, n, m = 10, 8, 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0])
    targets = rskd_sample(logits.expand(m, vocab), n, generator=torch.Generator().manual_seed(3))
    observed = _dense(targets, vocab).sum(0) * n  # pooled counts
    expected = teacher_probs(logits) * m * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_9DF_999, chi2
    mean_estimate = _dense(targets, vocab).mean(0)
    assert torch.allclose(mean_estimate, teacher_probs(logits), atol=3e-3)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_is_applied_before_sampling(temperature: float) -> None:
    logits = torch.tensor([2.0, 0.0, -1.0, -2.0])
    targets = rskd_sample(
        logits.expand(20_000, 4), 16, temperature=temperature, generator=torch.Generator().manual_seed(4)
    )
    assert torch.allclose(_dense(targets, 4).mean(0), torch.softmax(logits / temperature, -1), atol=4e-3)


def test_proposal_power_weights_are_importance_ratios() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5)) * 2
    tau = 0.5
    targets = rskd_sample(logits, 30, proposal_power=tau, generator=torch.Generator().manual_seed(6))
    t = teacher_probs(logits)
    q = teacher_probs(logits * tau)
    assert targets.counts is not None
    weights = targets.counts.float() * t.gather(-1, targets.ids) / q.gather(-1, targets.ids)
    assert torch.allclose(targets.probs, weights / weights.sum(-1, keepdim=True), atol=1e-6)
    # Self-normalised importance sampling is consistent: with many draws it approaches t.
    many = rskd_sample(logits[:1].expand(4000, 40), 200, proposal_power=tau, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(_dense(many, 40).mean(0), t[0], atol=5e-3)


def test_sampling_is_reproducible_with_a_generator() -> None:
    logits = torch.randn(5, 100)
    a = rskd_sample(logits, 20, generator=torch.Generator().manual_seed(9))
    b = rskd_sample(logits, 20, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.probs, b.probs)


def test_topk_renormalize_and_ghost() -> None:
    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(8))
    t = teacher_probs(logits)
    head, head_ids = t.topk(7, dim=-1)
    renorm = topk_targets(logits, 7)
    assert torch.equal(renorm.ids, head_ids)
    assert torch.allclose(renorm.probs, head / head.sum(-1, keepdim=True))
    assert (renorm.probs >= head).all(), "renormalising inflates the head: the bias"
    ghost = topk_targets(logits, 7, tail="ghost")
    assert (ghost.ids[..., -1] == GHOST_ID).all()
    assert torch.allclose(ghost.probs[..., :-1], head)
    assert torch.allclose(ghost.probs.sum(-1), torch.ones(2, 5))
    assert torch.allclose(ghost.probs[..., -1], 1 - head.sum(-1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: rskd_sample(x, 0), "n_samples must be >= 1"),
        (lambda x: rskd_sample(x, 5, temperature=0.0), "temperature must be > 0"),
        (lambda x: rskd_sample(x, 5, proposal_power=-1.0), "proposal_power must be >= 0"),
        (lambda x: topk_targets(x, 0), "k must be in"),
        (lambda x: topk_targets(x, 2, tail="drop"), "tail must be"),
    ],
)
def test_bad_arguments(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.randn(2, 10))
