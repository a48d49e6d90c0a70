"""ECE, KL, agreement and log-loss against values computed by hand."""

from __future__ import annotations

import math

import torch

from logitflow.ops.lm_metrics import CalibrationBins, LmMetrics, kl_divergence


def test_ece_by_hand() -> None:
    bins = CalibrationBins(n_bins=15)
    # 0.95 and 0.97 share the last bin (14/15, 1]: accuracy 1/2, confidence 0.96 -> gap 0.46.
    # 0.5 falls in (7/15, 8/15]: correct, gap 0.5. 0.0 goes to the first bin: wrong, gap 0.
    bins.add(torch.tensor([0.95, 0.97, 0.5, 0.0]), torch.tensor([True, False, True, False]))
    assert math.isclose(bins.ece, (2 * 0.46 + 0.5 + 0.0) / 4, rel_tol=1e-6)
    table = bins.table()
    assert table[14]["count"] == 2 and math.isclose(table[14]["confidence"], 0.96, rel_tol=1e-6)
    assert table[7]["count"] == 1 and table[7]["accuracy"] == 1.0
    assert sum(row["count"] for row in table) == 4


def test_ece_bin_edges_are_right_closed() -> None:
    bins = CalibrationBins(n_bins=2)
    bins.add(torch.tensor([0.5, 1.0]), torch.tensor([False, True]))
    assert [row["count"] for row in bins.table()] == [1, 1]


def test_perfect_calibration_has_zero_ece() -> None:
    bins = CalibrationBins()
    bins.add(torch.full((4,), 0.75), torch.tensor([True, True, True, False]))
    assert math.isclose(bins.ece, 0.0, abs_tol=1e-12)


def test_lm_metrics_by_hand_and_independent_of_batching() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]))
    teacher = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.2, 0.5, 0.3]]))
    next_ids = torch.tensor([0, 1, 0])
    whole = LmMetrics()
    whole.add(logits, next_ids, teacher)
    split = LmMetrics()
    split.add(logits[:1], next_ids[:1], teacher[:1])
    split.add(logits[1:], next_ids[1:], teacher[1:])
    expected_loss = -(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3
    result = whole.result()
    assert math.isclose(result["lm_loss"], expected_loss, rel_tol=1e-6)
    assert math.isclose(result["top1_agreement"], 2 / 3)  # rows 0 and 1 agree, row 2 does not
    kl_row0 = 0.6 * math.log(0.6 / 0.7) + 0.3 * math.log(0.3 / 0.2) + 0.1 * math.log(0.1 / 0.1)
    assert math.isclose(float(kl_divergence(teacher, logits)[0]), kl_row0, rel_tol=1e-5)
    for key, value in split.result().items():
        assert math.isclose(value, result[key], rel_tol=1e-6), key
