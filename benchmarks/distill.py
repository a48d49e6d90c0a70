"""Distillation benchmark, measured side by side in one run on the same cached batches:

(a) gradient fidelity: angle and norm ratio of the student's gradient under RS-KD (N = 30, 50),
    Top-K (k = 12, 50) and Top-K + ghost vs FullKD's (the paper: RS-KD with ~12 unique ids ≈ 4° / 1.0,
    Top-K 12 ≈ 58° / 2.4, Top-K 50 ≈ 48° / 1.8); the same function as `logitflow grad-fidelity`, for a
    fresh student and, when `dvc repro distill` has run, the trained primary student;
(b) step time of each loss (student forward + backward, optimizer excluded) relative to `ce`:
    `rskd`/`topk` read the caches, `full` runs the teacher every step.

Run: .venv/bin/python benchmarks/distill.py [--sequences 8] [--steps 3]
(after `dvc repro cache_teacher`). Writes benchmarks/results/distill.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_result

from logitflow.analysis.grad_fidelity import gradient_fidelity
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import load_params
from logitflow.models import load_materialized, read_model_card
from logitflow.stages.distill import open_cache
from logitflow.stages.models import model_dir
from logitflow.student import build_student
from logitflow.train.distill import DistillSettings, DistillTask

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("ce", "rskd", "topk", "topk_ghost", "full")


def step_times(params, batch: int, steps: int) -> dict[str, float]:
    apply_threads(params.compute)
    device = resolve_device(params.compute)
    teacher_path = model_dir(params, ROOT, "teacher")
    card = read_model_card(teacher_path)
    teacher = load_materialized(teacher_path)
    teacher_model = teacher.model.to(device=device, dtype=inference_dtype(params.compute)).eval()
    student = build_student(teacher.model, params.distill.student, 0).to(device)
    indices = list(range(batch))
    ac = lambda: autocast(params.compute, device)  # noqa: E731
    times = {}
    for loss in LOSSES:
        settings = DistillSettings(loss=loss)
        task = DistillTask(
            open_cache(params, ROOT, loss, card),
            settings,
            pad_id=0,
            device=device,
            teacher=teacher_model if loss == "full" else None,
        )

        def step(task: DistillTask = task) -> None:
            with ac():
                total, _ = task.loss(student, indices)
            total.backward()
            student.zero_grad(set_to_none=True)

        step()  # warm-up (and decodes the shard)
        times[loss] = median_seconds(step, steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    fidelity = {"fresh_student": gradient_fidelity(params, ROOT, sequences=args.sequences)}
    trained = ROOT / params.paths.models / f"student_{params.distill.primary}"
    if trained.is_dir():
        fidelity[f"trained_{trained.name}"] = gradient_fidelity(
            params, ROOT, sequences=args.sequences, student_path=trained
        )
    times = step_times(params, args.sequences, args.steps)
    result = {
        "setup": {
            "teacher": "models/teacher (SmolLM2-135M)",
            "student": params.distill.student.model_dump(),
            "sequences": args.sequences,
            "max_length": params.data.max_length,
            "precision": params.compute.precision,
        },
        "gradient_fidelity": {student: [asdict(row) for row in rows] for student, rows in fidelity.items()},
        "step_seconds": times,
        "step_time_ratio_to_ce": {loss: t / times["ce"] for loss, t in times.items()},
    }
    print(json.dumps(result, indent=1))
    print(f"wrote {write_result('distill', result)}")


if __name__ == "__main__":
    main()
