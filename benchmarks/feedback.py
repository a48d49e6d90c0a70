"""Online feedback: ADPO's questions vs random questions at equal label budgets, side by side.

The log-linear setting of the paper on real embeddings (pairs of mean-pooled SmolLM2-135M states of
demo-corpus chunks, as in active_dpo.py), a ground-truth θ* and offsets b, and a simulated person
who answers from σ(β(φᵀθ* − b)) but skips pairs too close to call (|true logit| < `skip_below`), as
people do. Both policies run through the feedback machinery itself: a `FeedbackSession` over a pool
stored as Arrow, every answer appended to its label store, and one restart per run (the session is
reopened from disk halfway; the benchmark checks that the restarted run asks exactly what an
uninterrupted one would). Skips cost a question but not a label. After each budget of labels: θ̂ fit
on the labels collected (ridge `l2`), max and mean logit error |β φᵀ(θ̂ − θ*)| over the pool.

Run: .venv/bin/python benchmarks/feedback.py     (after `dvc repro models prepare`)
Writes benchmarks/results/feedback.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from active_dpo import loglinear_pool, text_embeddings
from common import write_result

from logitflow.cache.ref_scores import PairScores
from logitflow.data.pool import read_pool, write_pool
from logitflow.feedback.session import FeedbackSession
from logitflow.ops.active_dpo import SelectionSettings
from logitflow.ops.design import fit_theta

POLICIES = ("adpo", "random")


def synthetic_session(directory: Path, features: torch.Tensor, offsets: torch.Tensor, settings: SelectionSettings):
    rows = (
        {
            "id": f"pair-{i:06d}",
            "prompt": [{"role": "user", "content": f"p{i}"}],
            "response_a": f"a{i}",
            "response_b": f"b{i}",
        }
        for i in range(len(features))
    )
    write_pool(rows, directory / "pool", "synthetic")
    pool = read_pool(directory / "pool")
    zeros = torch.zeros_like(offsets, dtype=torch.float32)
    scores = PairScores(offsets.float(), zeros, features.float(), torch.zeros_like(features).float(), [], [])
    return lambda: FeedbackSession(directory / "session", "bench", pool, scores, settings)


def run_policy(policy, open_session, truth, flips, skip_below, budget, seed, restart_at) -> list[int]:
    """Label rows in the order asked; the session is reopened from disk after `restart_at` questions."""
    generator = torch.Generator().manual_seed(seed)
    session = open_session()
    asked = 0
    while session.labels < budget:
        if asked == restart_at:
            session = open_session()
        question = session.next_question()
        if policy == "random":  # any pair not asked yet, in place of the selector's choice
            available = session.selector.design.available.nonzero().squeeze(1)
            row = int(available[torch.randint(len(available), (1,), generator=generator)])
            question = question.__class__(**{**question.__dict__, "row": row, "pair_id": session.pool.pairs[row]["id"]})
        answer = "skip" if abs(truth[question.row]) < skip_below else ("a" if flips[question.row] else "b")
        session.answer(question, answer)
        asked += 1
    return [r.row for r in session.records if r.answer != "skip"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=8192)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-budget", type=int, default=1024)
    parser.add_argument("--skip-below", type=float, default=0.25)
    parser.add_argument("--chunks", type=int, default=1024)
    parser.add_argument("--chunk-tokens", type=int, default=48)
    parser.add_argument("--l2", type=float, default=0.01)
    args = parser.parse_args()
    started = time.perf_counter()
    embeddings = text_embeddings(args.chunks, args.chunk_tokens)
    embeddings = embeddings - embeddings.mean(0)
    budgets = [2**p for p in range(4, int(math.log2(args.max_budget)) + 1)]
    beta = 1.0
    curves: dict[str, dict[str, list]] = {p: {"max": [], "mean": [], "questions": []} for p in POLICIES}
    for seed in range(args.seeds):
        features, offsets, theta_star, labels = loglinear_pool(embeddings, args.pool, beta, seed)
        truth = beta * (features @ theta_star - offsets)
        flips = labels.bool()
        settings = SelectionSettings(beta=beta, gamma_rel=1.0, alpha=3.0, l2=args.l2, seed=seed)
        for policy in POLICIES:
            with tempfile.TemporaryDirectory() as tmp:
                opener = synthetic_session(Path(tmp), features, offsets, settings)
                rows = run_policy(policy, opener, truth, flips, args.skip_below, budgets[-1], seed, budgets[-1] // 2)
                questions = len(opener().records)
            if policy == "adpo":
                with tempfile.TemporaryDirectory() as tmp:  # the same run without a restart
                    opener = synthetic_session(Path(tmp), features, offsets, settings)
                    assert run_policy(policy, opener, truth, flips, args.skip_below, budgets[-1], seed, -1) == rows
            labels = flips[rows].double()
            errors_max, errors_mean = [], []
            for budget in budgets:
                chosen = torch.tensor(rows[:budget])
                theta = fit_theta(features[chosen], offsets[chosen], labels[:budget], beta=beta, l2=args.l2)
                error = (beta * features @ (theta - theta_star)).abs()
                errors_max.append(float(error.max()))
                errors_mean.append(float(error.mean()))
            curves[policy]["max"].append(errors_max)
            curves[policy]["mean"].append(errors_mean)
            curves[policy]["questions"].append(questions)
            print(f"  seed {seed} {policy:6s} max logit error: " + " ".join(f"{v:.2f}" for v in errors_max))
    summary = {
        p: {
            "max": np.mean(c["max"], axis=0).tolist(),
            "mean": np.mean(c["mean"], axis=0).tolist(),
            "questions_for_max_budget": float(np.mean(c["questions"])),
        }
        for p, c in curves.items()
    }
    random_best = min(summary["random"]["max"])
    reach = next((b for b, v in zip(budgets, summary["adpo"]["max"], strict=True) if v <= random_best), None)
    result = {
        "setup": {
            "pairs": args.pool,
            "seeds": args.seeds,
            "skip_below": args.skip_below,
            "beta": beta,
            "l2": args.l2,
            "embeddings": f"SmolLM2-135M mean-pooled, {args.chunks} chunks of {args.chunk_tokens} tokens",
            "restart": "each run reopened from its label store after half the largest budget of questions",
        },
        "budgets": budgets,
        "mean_over_seeds": summary,
        "random_best_max_logit_error": random_best,
        "labels_saved_vs_random": budgets[-1] / reach if reach else None,
        "seconds": time.perf_counter() - started,
    }
    path = write_result("feedback", result)
    print(f"wrote {path}")
    for policy in POLICIES:
        errors = " ".join(f"{v:.2f}" for v in summary[policy]["max"])
        print(f"{policy:6s} max logit error by labels {budgets}: {errors}")
    print(f"ADPO reaches random's best max logit error with {result['labels_saved_vs_random']}x fewer labels")


if __name__ == "__main__":
    main()
