"""Sparse and dense KD losses against dense references built by hand."""

from __future__ import annotations

import pytest
import torch

from logitflow.ops.sparse_kd import (
    GHOST_ID,
    SparseTargets,
    full_kd_loss,
    rskd_sample,
    sparse_kd_loss,
    teacher_probs,
    topk_from_cache,
    topk_targets,
)

V = 40


def _logits(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, V, generator=torch.Generator().manual_seed(seed)) * 2


def _dense_ce(student: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return -(target * torch.log_softmax(student / temperature, -1)).sum(-1) * temperature**2


def _densify(targets: SparseTargets) -> torch.Tensor:
    return torch.zeros(*targets.ids.shape[:-1], V).scatter_add_(-1, targets.ids, targets.probs)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_loss_equals_dense_cross_entropy_of_the_same_target(temperature: float) -> None:
    student, teacher = _logits(0, 3, 5), _logits(1, 3, 5)
    targets = rskd_sample(teacher, 30, temperature=temperature, generator=torch.Generator().manual_seed(2))
    got = sparse_kd_loss(student, targets, temperature=temperature)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, _dense_ce(student, _densify(targets), temperature))


def test_full_kd_is_the_dense_cross_entropy_and_its_gradient_is_t_times_softmax_difference() -> None:
    student, teacher = _logits(3, 4).requires_grad_(), _logits(4, 4)
    temperature = 2.0
    loss = full_kd_loss(student, teacher, temperature=temperature)
    torch.testing.assert_close(loss, _dense_ce(student, teacher_probs(teacher, temperature), temperature))
    loss.sum().backward()
    expected = temperature * (torch.softmax(student / temperature, -1) - teacher_probs(teacher, temperature))
    torch.testing.assert_close(student.grad, expected.detach())


def test_rskd_gradient_is_unbiased_for_the_full_kd_gradient() -> None:
    student, teacher = _logits(5, 1).requires_grad_(), _logits(6, 1)
    full_grad = torch.autograd.grad(full_kd_loss(student, teacher).sum(), student)[0]
    draws = 4000
    repeated = teacher.expand(draws, V)
    targets = rskd_sample(repeated, 12, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(sparse_kd_loss(student.expand(draws, V), targets).sum(), student)[0] / draws
    assert (grads - full_grad).abs().max() < 0.01
    topk_grad = torch.autograd.grad(sparse_kd_loss(student, topk_targets(teacher, 12)).sum(), student)[0]
    assert (topk_grad - full_grad).abs().max() > 0.03  # Top-K is biased; the test above could fail


def test_ghost_bucket_compares_tail_masses() -> None:
    student, teacher = _logits(8, 2, 3), _logits(9, 2, 3)
    targets = topk_targets(teacher, 5, tail="ghost")
    head_ids = targets.ids[..., :5]
    s = torch.softmax(student, -1)
    student_head = s.gather(-1, head_ids)
    expected = -(targets.probs[..., :5] * student_head.log()).sum(-1) - targets.probs[..., 5] * torch.log(
        1 - student_head.sum(-1)
    )
    torch.testing.assert_close(sparse_kd_loss(student, targets), expected)
    assert (targets.ids[..., 5] == GHOST_ID).all()


def test_padding_rows_give_zero_loss_and_zero_gradient() -> None:
    student = _logits(10, 2).requires_grad_()
    targets = SparseTargets(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    loss = sparse_kd_loss(student, targets)
    assert loss.tolist() == [0.0, 0.0]
    loss.sum().backward()
    assert student.grad is not None and (student.grad == 0).all()


def test_topk_from_cache_renormalises_or_keeps_the_tail() -> None:
    teacher = _logits(11, 3)
    head, ids = teacher_probs(teacher).topk(4)
    tail = 1 - head.sum(-1)
    renorm = topk_from_cache(ids, head, tail, ghost=False)
    torch.testing.assert_close(renorm.probs, topk_targets(teacher, 4).probs)
    ghost = topk_from_cache(ids, head, tail, ghost=True)
    torch.testing.assert_close(ghost.probs, topk_targets(teacher, 4, tail="ghost").probs)
    assert (ghost.ids[:, -1] == GHOST_ID).all()
    zeros = topk_from_cache(ids[:1], torch.zeros(1, 4), torch.zeros(1), ghost=True)
    assert zeros.probs.abs().sum() == 0


def test_angle_and_norm_ratio_by_hand() -> None:
    from logitflow.ops.grad_fidelity import angle_and_norm_ratio

    angle, ratio = angle_and_norm_ratio(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert angle == pytest.approx(45.0) and ratio == pytest.approx(2**-0.5)
    assert angle_and_norm_ratio(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])) == pytest.approx(
        (0.0, 2.0), abs=1e-4
    )
