"""The distillation student: a smaller causal LM with the teacher's tokenizer and architecture
family, either a subset of the teacher's layers (DistilBERT-style initialisation) or randomly
initialised at a width from params."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from logitflow.config import StudentSpec
from logitflow.errors import ModelError

log = logging.getLogger(__name__)
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always the first and the last."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelError(f"distill.student: cannot find the decoder layers of a {type(model).__name__}")
    return layers


def build_student(teacher: PreTrainedModel, spec: StudentSpec, seed: int) -> PreTrainedModel:
    """A float32 student on the CPU, in train mode."""
    teacher_layers = teacher.config.num_hidden_layers
    if spec.num_hidden_layers > teacher_layers and spec.init == "teacher_layers":
        raise ModelError(
            f"distill.student.num_hidden_layers = {spec.num_hidden_layers}: the teacher has only {teacher_layers} "
            "layers to copy from"
        )
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = spec.num_hidden_layers
    keep = kept_layers(teacher_layers, spec.num_hidden_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    if spec.init == "random":
        for key in WIDTH_KEYS:
            if getattr(spec, key) is not None:
                setattr(config, key, getattr(spec, key))
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(
                f"distill.student: hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        if hasattr(config, "head_dim"):
            config.head_dim = config.hidden_size // config.num_attention_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.init == "teacher_layers":
        state = {k: v for k, v in teacher.state_dict().items() if ".layers." not in k}
        student.load_state_dict(state, strict=False)
        for target, source in zip(_decoder_layers(student), keep, strict=True):
            target.load_state_dict(_decoder_layers(teacher)[source].state_dict())
    log.info(
        "student: %s, %d layers%s, %.1fM parameters",
        spec.init,
        spec.num_hidden_layers,
        f" (teacher layers {keep})" if spec.init == "teacher_layers" else "",
        sum(p.numel() for p in student.parameters()) / 1e6,
    )
    return student.float().train()
