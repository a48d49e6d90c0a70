"""The student builder: copied layers equal the teacher's, random init honours the width."""

from __future__ import annotations

import pytest
import torch

from logitflow.config import ModelSpec, StudentSpec
from logitflow.errors import ModelError
from logitflow.models import load_pretrained
from logitflow.student import build_student, kept_layers

TEACHER = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}


@pytest.fixture(scope="module")
def teacher():
    return load_pretrained(ModelSpec(source="tiny", tiny=TEACHER)).model


def test_kept_layers_are_evenly_spaced_with_both_ends() -> None:
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert kept_layers(4, 2) == [0, 3] and kept_layers(4, 1) == [3] and kept_layers(4, 4) == [0, 1, 2, 3]


def test_teacher_layers_copies_weights(teacher) -> None:
    student = build_student(teacher, StudentSpec(num_hidden_layers=2), seed=0)
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    torch.testing.assert_close(student.model.norm.weight, teacher.model.norm.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert student(ids).logits.shape == teacher(ids).logits.shape


def test_random_init_takes_the_width_and_is_seeded(teacher) -> None:
    spec = StudentSpec(init="random", num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2)
    a, b = build_student(teacher, spec, seed=3), build_student(teacher, spec, seed=3)
    assert a.config.hidden_size == 16 and a.model.embed_tokens.weight.shape == (300, 16)
    torch.testing.assert_close(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_bad_student_specs_are_refused(teacher) -> None:
    with pytest.raises(ModelError, match="num_hidden_layers = 9"):
        build_student(teacher, StudentSpec(num_hidden_layers=9), seed=0)
    with pytest.raises(ValueError, match="init: random"):
        StudentSpec(hidden_size=16)
    with pytest.raises(ModelError, match="not divisible"):
        build_student(teacher, StudentSpec(init="random", hidden_size=30, num_attention_heads=4), seed=0)
