"""Greedy D-optimal design and the selection methods against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from logitflow.ops.active_dpo import (
    ActiveSelector,
    SelectionSettings,
    scale_features,
    select,
    select_apo,
)
from logitflow.ops.design import DOptimalDesign, constant_weights, fit_theta, greedy_design, greedy_doptimal, logdet_of


def _pool(n: int = 40, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_greedy_equals_exhaustive_search_step_by_step(seed: int, weighted: bool) -> None:
    features = _pool(seed=seed)
    weights = (
        torch.rand(40, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64) if weighted else None
    )
    gamma = 0.5
    picks = greedy_doptimal(features, 12, weights=weights, gamma=gamma)
    chosen: list[int] = []
    for pick in picks.tolist():
        scores = [
            logdet_of(features, torch.tensor([*chosen, i]), weights, gamma) if i not in chosen else -math.inf
            for i in range(40)
        ]
        assert pick == max(range(40), key=scores.__getitem__)
        chosen.append(pick)
    assert len(set(chosen)) == 12


def test_rank_one_updates_match_a_direct_inverse_and_logdet() -> None:
    features = _pool(200, 8)
    design = DOptimalDesign(features, 0.3, constant_weights(None, 200))
    for _ in range(30):
        design.step()
    indices = torch.tensor(design.indices)
    direct = 0.3 * torch.eye(8, dtype=torch.float64) + features[indices].T @ features[indices]
    assert torch.allclose(design.hinv, torch.linalg.inv(direct), atol=1e-10)
    assert design.logdet == pytest.approx(float(torch.logdet(direct)), abs=1e-9)
    result = design.result()
    assert (result.logdet.diff() >= 0).all() and (result.gains >= 0).all()
    assert (result.gains[1:] <= result.gains[:-1] + 1e-12).all(), "greedy gains never increase"


def test_sign_of_features_does_not_matter() -> None:
    features = _pool(60, 6)
    signs = torch.where(torch.rand(60, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0).double()
    assert torch.equal(greedy_doptimal(features, 15), greedy_doptimal(features * signs[:, None], 15))


def test_gamma_rel_makes_the_design_invariant_to_scale_of_phi_and_beta() -> None:
    features, offsets = _pool(80, 6), torch.zeros(80)
    base = select_apo(features, offsets, None, 20, SelectionSettings(beta=0.1))
    scaled = select_apo(features * 37.0, offsets, None, 20, SelectionSettings(beta=0.1))
    other_beta = select_apo(features, offsets, None, 20, SelectionSettings(beta=2.5))
    assert torch.equal(base.indices, scaled.indices) and torch.equal(base.indices, other_beta.indices)


def test_uniform_is_reproducible_by_seed() -> None:
    features, offsets = _pool(), torch.zeros(40)
    a = select("uniform", features, offsets, None, 10, SelectionSettings(seed=3))
    b = select("uniform", features, offsets, None, 10, SelectionSettings(seed=3))
    c = select("uniform", features, offsets, None, 10, SelectionSettings(seed=4))
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 10


def _synthetic(n: int, d: int, seed: int, beta: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=generator, dtype=torch.float64)
    features, _ = scale_features(features)
    theta_star = torch.randn(d, generator=generator, dtype=torch.float64)
    theta_star = 4 * theta_star / theta_star.norm()
    offsets = 0.3 * torch.randn(n, generator=generator, dtype=torch.float64)
    mu = torch.sigmoid(beta * (features @ theta_star - offsets))
    labels = (torch.rand(n, generator=generator, dtype=torch.float64) < mu).double()
    return features, offsets, labels, theta_star


def test_fit_recovers_theta_star() -> None:
    features, offsets, labels, theta_star = _synthetic(20_000, 8, seed=0)
    theta = fit_theta(features, offsets, labels, beta=1.0, l2=1e-3)
    assert (theta - theta_star).norm() / theta_star.norm() < 0.1


@pytest.mark.parametrize("method", ["apo", "adpo", "adpo_plus"])
def test_design_methods_pick_distinct_pairs_and_grow_logdet(method: str) -> None:
    features, offsets, labels, _ = _synthetic(300, 6, seed=1)
    result = select(method, features, offsets, labels, 40, SelectionSettings(beta=1.0))
    assert len(set(result.indices.tolist())) == 40
    assert (result.logdet.diff() >= -1e-12).all()


def test_active_selector_refits_on_powers_of_two_and_skips() -> None:
    features, offsets, labels, _ = _synthetic(200, 5, seed=2)
    selector = ActiveSelector(features, offsets, SelectionSettings(beta=1.0))
    asked: list[int] = []
    for step in range(20):
        index, gain = selector.propose()
        assert index not in asked and gain >= 0
        asked.append(index)
        if step == 3:
            selector.skip(index)
            continue
        selector.label(index, bool(labels[index]))
    assert selector.refits == [1, 2, 4, 8, 16]
    assert asked[3] not in selector.labelled and selector.remaining == 200 - 20


def test_ties_go_to_the_lowest_index_and_a_replay_asks_what_an_uninterrupted_run_asks() -> None:
    features, offsets, labels, _ = _synthetic(300, 6, seed=4)
    features[150:] = -features[:150].flip(0)  # every pair also appears swapped: equal gains up to the last bit
    offsets[150:] = -offsets[:150].flip(0)
    settings = SelectionSettings(beta=1.0)
    live = ActiveSelector(features, offsets, settings)
    asked = []
    for _ in range(40):
        index, _ = live.propose()  # refreshes some bounds, which a replay never does
        asked.append(index)
        live.label(index, bool(labels[index]))
    for position, index in enumerate(asked):
        if index >= 150:
            assert 299 - index in asked[:position], "of two tied pairs, the lower index is asked first"
    replayed = ActiveSelector(features, offsets, settings)
    for index in asked[:25]:
        replayed.label(index, bool(labels[index]))
    for index in asked[25:]:
        assert replayed.propose()[0] == index
        replayed.label(index, bool(labels[index]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: greedy_doptimal(f, 0), "k must be >= 1"),
        (lambda f: greedy_doptimal(f, 41), "larger than the pool"),
        (lambda f: greedy_doptimal(f.clone().fill_(float("nan")), 3), "NaN or inf"),
        (lambda f: greedy_design(f, 3, gamma=0.0), "gamma must be > 0"),
        (lambda f: scale_features(torch.zeros_like(f)), "all features are zero"),
        (lambda f: select("adpo_plus", f, torch.zeros(40), None, 3, SelectionSettings()), "no labels"),
        (lambda f: select("pmc", f, torch.zeros(40), None, 3, SelectionSettings()), "unknown selection method"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(_pool())
