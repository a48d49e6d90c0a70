from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from logitflow.config import Params, load_params
from logitflow.errors import ParamsError
from logitflow.params_file import apply_overlay

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_load_with_every_section() -> None:
    params = load_params(REPO / "params.yaml")
    assert set(Params.model_fields) == set(params.model_dump())
    assert params.models.teacher.source == "gguf"


@pytest.mark.parametrize("overlay", sorted((REPO / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_overlay_validates(overlay: Path) -> None:
    params = load_params(REPO / "params.yaml", overlays=[overlay])
    assert params != load_params(REPO / "params.yaml")


def test_cluster_setup_uses_gpu_and_hub_sources() -> None:
    params = load_params(REPO / "params.yaml", overlays=[REPO / "params/cluster.yaml"])
    assert params.compute.device == "cuda"
    assert params.models.teacher.source == "hub"
    assert params.prepare.preferences.type == "hub"


BAD_PARAMS = [
    ({"compute": {"device": "tpu"}}, "compute.device = 'tpu'"),
    ({"compute": {"threads": 0}}, "compute.threads = 0"),
    ({"compute": {"precision": "fp8"}}, "compute.precision = 'fp8'"),
    ({"compute": {"sed": 1}}, "compute.sed = 1: unknown key"),
    ({"extra_section": {}}, "extra_section = {}: unknown key"),
    ({"models": {"teacher": {"source": "hub"}}}, "models.teacher"),
    ({"models": {"teacher": {"source": "local", "path": "x", "gguf_file": "y.gguf"}}}, "'gguf_file' is only for"),
    ({"models": {"teacher": {"source": "tiny", "tiny": {"hidden_size": 30, "num_attention_heads": 4}}}}, "divisible"),
    ({"models": {"teacher": {"source": "tiny", "tiny": {"vocab_size": 10}}}}, "models.teacher.tiny.vocab_size = 10"),
    ({"data": {"max_length": 2}}, "data.max_length = 2"),
    ({"data": {"long_documents": "wrap"}}, "data.long_documents = 'wrap'"),
    ({"prepare": {"heldout_fraction": 1.5}}, "prepare.heldout_fraction = 1.5"),
    ({"prepare": {"heldout_fraction": 0}}, "prepare.heldout_fraction = 0"),
    ({"prepare": {"on_bad_rows": "ignore"}}, "prepare.on_bad_rows = 'ignore'"),
    ({"prepare": {"corpus": {"type": "local"}}}, "type 'local' needs 'path'"),
    ({"prepare": {"preferences": {"type": "hub"}}}, "type 'hub' needs 'name'"),
    ({"prepare": {"demo": {"preference_pairs": "many"}}}, "prepare.demo.preference_pairs = 'many'"),
    ({"prepare": {"demo": {"tasks": ["arithmetic", "arithmetic"]}}}, "duplicates"),
    ({"prepare": {"demo": {"tasks": ["poetry"]}}}, "prepare.demo.tasks.0 = 'poetry'"),
    ({"tracking": {"experiment": ""}}, "tracking.experiment = ''"),
    ({"cache_teacher": {"rskd": {"n_samples": 0}}}, "cache_teacher.rskd.n_samples = 0"),
    ({"cache_teacher": {"rskd": {"temperature": 0}}}, "cache_teacher.rskd.temperature = 0"),
    ({"cache_teacher": {"rskd": {"proposal_power": -0.5}}}, "cache_teacher.rskd.proposal_power = -0.5"),
    ({"cache_teacher": {"topk": {"k": 0}}}, "cache_teacher.topk.k = 0"),
    ({"cache_teacher": {"primary": "full"}}, "cache_teacher.primary = 'full'"),
    ({"cache_teacher": {"batch_size": 0}}, "cache_teacher.batch_size = 0"),
    ({"dpo": {"beta": 0}}, "dpo.beta = 0"),
    ({"select": {"budget": 0}}, "select.budget = 0"),
    ({"select": {"primary": "pmc"}}, "select.primary = 'pmc'"),
    ({"score_prefs": {"pooling": "max"}}, "score_prefs.pooling = 'max'"),
    ({"train_dpo": {"lr": 0}}, "train_dpo.lr = 0"),
    ({"train_dpo": {"loss_type": "ipo", "label_smoothing": 0.1}}, "not to 'ipo'"),
    ({"train_dpo": {"label_smoothing": 0.5}}, "train_dpo.label_smoothing = 0.5"),
    ({"train_dpo": {"schedule": "step"}}, "train_dpo.schedule = 'step'"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_PARAMS, ids=[e for _, e in BAD_PARAMS])
def test_bad_params_name_key_and_value(tmp_path: Path, override: dict, expected: str) -> None:
    from logitflow.config import deep_merge

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, override)))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_missing_models_section_is_named(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("compute: {device: cpu}\n")
    with pytest.raises(ParamsError, match="models: required key is missing"):
        load_params(path)


@pytest.mark.parametrize(
    ("text", "expected"), [("a: [1,", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping"), (None, "not found")]
)
def test_unreadable_params_files(tmp_path: Path, text: str | None, expected: str) -> None:
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ParamsError, match=expected):
        load_params(path)


def test_apply_overlay_keeps_comments_and_validates(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    changed = apply_overlay(params_file, REPO / "params/cluster.yaml")
    assert "compute.device" in changed
    text = params_file.read_text()
    assert "# logitflow params" in text and "the one home of hyperparameters" in text
    merged = load_params(params_file)
    assert merged == load_params(REPO / "params.yaml", overlays=[REPO / "params/cluster.yaml"])


def test_apply_invalid_overlay_writes_nothing(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    params_file.write_text(original)
    bad = tmp_path / "bad.yaml"
    bad.write_text("compute: {threads: -3}\n")
    with pytest.raises(ParamsError, match="compute.threads = -3"):
        apply_overlay(params_file, bad)
    assert params_file.read_text() == original
