"""The DPO loop on a tiny model: log-probs, learning, exact resume, NaN handling."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from logitflow.config import ModelSpec, TinyModelConfig
from logitflow.data.demo import demo_preferences
from logitflow.data.tokenize import tokenize_pair
from logitflow.errors import LogitflowError
from logitflow.models import load_pretrained
from logitflow.train.dpo import DpoData, DpoSettings, response_logps, train_dpo

SPEC = ModelSpec(source="tiny", tiny=TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64))
CPU = torch.device("cpu")
NO_AUTOCAST = contextlib.nullcontext


def _setup(n: int = 24):
    loaded = load_pretrained(SPEC)
    rows, _ = demo_preferences(n, ["arithmetic", "units", "strings"], seed=0)
    pairs = [
        (
            tokenize_pair(loaded.tokenizer, r["prompt"], r["chosen"], 64),
            tokenize_pair(loaded.tokenizer, r["prompt"], r["rejected"], 64),
        )
        for r in rows
    ]
    with torch.no_grad():
        ref, _ = response_logps(loaded.model, [p[0] for p in pairs] + [p[1] for p in pairs], 0, CPU)
    return loaded, DpoData(pairs, ref[:n].clone(), ref[n:].clone())


def test_response_logps_equal_full_logits() -> None:
    loaded, data = _setup(4)
    sequences = [data.pairs[0][0], data.pairs[1][1]]
    with torch.no_grad():
        sums, counts = response_logps(loaded.model, sequences, 0, CPU)
        for row, sequence in enumerate(sequences):
            ids = torch.tensor([sequence.input_ids])
            logps = loaded.model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            assert float(sums[row]) == pytest.approx(float(logps[sequence.prompt_length - 1 :].sum()), abs=1e-4)
            assert int(counts[row]) == len(sequence.input_ids) - sequence.prompt_length


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_a_few_steps_reduce_the_loss(tmp_path: Path, loss_type: str) -> None:
    loaded, data = _setup()
    settings = DpoSettings(lr=3e-3, batch_size=8, epochs=6, warmup_ratio=0.0, schedule="constant", loss_type=loss_type)
    history = train_dpo(
        loaded.model,
        data,
        settings,
        pad_id=0,
        device=CPU,
        autocast=NO_AUTOCAST,
        checkpoint_dir=tmp_path / "ckpt",
        eval_data=data,
    )
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["rewards/margins"] > 0 and history[-1]["eval/accuracy"] > 0.5
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(
        history[0]
    )


def test_resume_equals_uninterrupted_training(tmp_path: Path) -> None:
    settings = DpoSettings(lr=1e-3, batch_size=4, grad_accum=2, epochs=2, warmup_ratio=0.25, checkpoint_every=2)
    straight, data = _setup()
    full = train_dpo(
        straight.model, data, settings, pad_id=0, device=CPU, autocast=NO_AUTOCAST, checkpoint_dir=tmp_path / "a"
    )
    interrupted, _ = _setup()
    train_dpo(
        interrupted.model,
        data,
        settings,
        pad_id=0,
        device=CPU,
        autocast=NO_AUTOCAST,
        checkpoint_dir=tmp_path / "b",
        max_steps=3,
    )
    resumed, _ = _setup()  # a fresh process would start from the same initial weights
    history = train_dpo(
        resumed.model, data, settings, pad_id=0, device=CPU, autocast=NO_AUTOCAST, checkpoint_dir=tmp_path / "b"
    )
    assert [h["loss"] for h in history] == [h["loss"] for h in full]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    loaded, data = _setup(8)
    settings = DpoSettings(lr=1e-3, batch_size=4, epochs=2, checkpoint_every=1)
    train_dpo(
        loaded.model,
        data,
        settings,
        pad_id=0,
        device=CPU,
        autocast=NO_AUTOCAST,
        checkpoint_dir=tmp_path / "c",
        max_steps=1,
    )
    saved = (tmp_path / "c" / "model.safetensors").read_bytes()
    broken = DpoData(data.pairs, torch.full_like(data.ref_chosen, float("nan")), data.ref_rejected)
    with pytest.raises(LogitflowError, match="loss is nan at step 2; the last good checkpoint"):
        train_dpo(
            loaded.model, broken, settings, pad_id=0, device=CPU, autocast=NO_AUTOCAST, checkpoint_dir=tmp_path / "c"
        )
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == saved


def test_preference_metrics_by_hand() -> None:
    from logitflow.train.dpo import _metrics

    parts = [
        {
            "losses": torch.tensor([0.5, 1.0]),
            "chosen_rewards": torch.tensor([0.3, -0.1]),
            "rejected_rewards": torch.tensor([0.1, 0.2]),
            "chosen_logps": torch.tensor([-10.0, -12.0]),
            "rejected_logps": torch.tensor([-11.0, -9.0]),
        },
        {
            "losses": torch.tensor([0.25]),
            "chosen_rewards": torch.tensor([0.4]),
            "rejected_rewards": torch.tensor([0.4]),
            "chosen_logps": torch.tensor([-8.0]),
            "rejected_logps": torch.tensor([-8.0]),
        },
    ]
    metrics = _metrics(parts)
    assert metrics["loss"] == pytest.approx(1.75 / 3)
    assert metrics["rewards/margins"] == pytest.approx((0.2 - 0.3 + 0.0) / 3)
    assert metrics["rewards/accuracies"] == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["logps/chosen"] == pytest.approx(-10.0)
