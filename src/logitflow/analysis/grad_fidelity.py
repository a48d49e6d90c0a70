"""Gradient fidelity: on real corpus batches, the angle and norm ratio between the student's
gradient under each sparse KD loss and under FullKD (the RS-KD paper's §4 diagnostic: RS-KD with
~12 unique ids ≈ 4° / 1.0, Top-K 12 ≈ 58° / 2.4, Top-K 50 ≈ 48° / 1.8).

The sparse targets are drawn from the same teacher logits the FullKD target uses, so the table
isolates the estimator, not the cache; `unique_per_position` is what each target stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import Params
from logitflow.data.tokenize import TruncationCounter, chunk_documents, pad_right
from logitflow.models import load_materialized
from logitflow.ops.grad_fidelity import angle_and_norm_ratio, flat_gradient
from logitflow.ops.sparse_kd import full_kd_loss, rskd_sample, sparse_kd_loss, topk_targets
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import read_split
from logitflow.student import build_student


@dataclass(frozen=True)
class FidelityRow:
    method: str
    unique_per_position: float
    angle_degrees: float
    norm_ratio: float


def _targets(teacher_logits: torch.Tensor, rskd_samples: Sequence[int], topk: Sequence[int], seed: int):
    generator = torch.Generator(device=teacher_logits.device).manual_seed(seed)
    for n in rskd_samples:
        yield f"rskd N={n}", rskd_sample(teacher_logits, n, generator=generator)
    for k in topk:
        yield f"topk k={k}", topk_targets(teacher_logits, k)
        yield f"topk_ghost k={k}", topk_targets(teacher_logits, k, tail="ghost")


def gradient_fidelity(
    params: Params,
    root: Path,
    *,
    sequences: int = 8,
    rskd_samples: Sequence[int] = (30, 50),
    topk: Sequence[int] = (12, 50),
    student_path: Path | None = None,
    seed: int = 0,
) -> list[FidelityRow]:
    """One row per sparse target, each against FullKD's gradient on the same student and tokens."""
    apply_threads(params.compute)
    device = resolve_device(params.compute)
    teacher = load_materialized(model_dir(params, root, "teacher"))
    if student_path is not None:
        student = load_materialized(student_path).model
    else:
        student = build_student(teacher.model, params.distill.student, params.distill.seed)
    student = student.float().to(device)
    teacher_model = teacher.model.to(device=device, dtype=inference_dtype(params.compute)).eval()
    texts = read_split(params, root, "corpus_train")["text"]
    chunks = chunk_documents(
        teacher.tokenizer, texts, params.data.max_length, params.data.long_documents, TruncationCounter()
    )
    batch = [c for c in chunks if len(c) >= 2][:sequences]
    pad_id = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else 0
    input_ids, attention = (t.to(device) for t in pad_right(batch, pad_id))
    valid = attention[:, 1:].bool()
    with torch.no_grad(), autocast(params.compute, device):
        teacher_logits = teacher_model(input_ids=input_ids, attention_mask=attention).logits[:, :-1][valid].float()
    with autocast(params.compute, device):
        student_logits = student(input_ids=input_ids, attention_mask=attention).logits[:, :-1][valid]
    parameters = [p for p in student.parameters() if p.requires_grad]
    reference = flat_gradient(full_kd_loss(student_logits, teacher_logits).mean(), parameters)
    rows = []
    for name, targets in _targets(teacher_logits, rskd_samples, topk, seed):
        gradient = flat_gradient(sparse_kd_loss(student_logits, targets).mean(), parameters)
        angle, ratio = angle_and_norm_ratio(gradient, reference)
        rows.append(FidelityRow(name, float(targets.num_unique.float().mean()), angle, ratio))
    return rows
