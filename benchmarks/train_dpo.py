"""DPO step time and peak memory: our loop (reference log-probs from the score_prefs cache) vs the
same loop with a reference forward every step (a second model in memory), same model and batch.
Each variant runs in its own process so peak RSS is its own; the two run back to back.

Run: .venv/bin/python benchmarks/train_dpo.py [--steps 4]   (after `dvc repro models prepare`)
Writes benchmarks/results/train_dpo.json. (The comparison with TRL's DPOTrainer is not written yet.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

from logitflow.compute import apply_threads, autocast, resolve_device
from logitflow.config import load_params
from logitflow.data.tokenize import tokenize_pair
from logitflow.models import load_materialized
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import read_split
from logitflow.train.dpo import DpoData, DpoSettings, _pair_losses, response_logps

ROOT = Path(__file__).resolve().parents[1]


def measure(variant: str, steps: int, batch: int) -> dict:
    params = load_params(ROOT / "params.yaml")
    apply_threads(params.compute)
    device = resolve_device(params.compute)
    policy = load_materialized(model_dir(params, ROOT, "policy"))
    model, tokenizer = policy.model.to(device), policy.tokenizer
    rows = read_split(params, ROOT, "prefs_train").select(range(batch))
    pairs = [
        (
            tokenize_pair(tokenizer, r["prompt"], r["chosen"], params.data.max_length),
            tokenize_pair(tokenizer, r["prompt"], r["rejected"], params.data.max_length),
        )
        for r in rows
    ]
    reference = None
    if variant == "ref_forward":
        reference = (
            load_materialized(model_dir(params, ROOT, "policy")).model.to(device=device, dtype=torch.bfloat16).eval()
        )
    sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
    with torch.no_grad():
        cached, _ = response_logps(model, sequences, 0, device)
    settings = DpoSettings(beta=params.dpo.beta, batch_size=batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ac = lambda: autocast(params.compute, device)  # noqa: E731

    def step() -> None:
        if reference is not None:
            with torch.no_grad():
                ref, _ = response_logps(reference, sequences, 0, device)
        else:
            ref = cached
        data = DpoData(pairs, ref[:batch].double(), ref[batch:].double())
        with ac():
            part = _pair_losses(model, data, list(range(batch)), settings, 0, device)
        part["losses"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tokens = sum(len(s.input_ids) for s in sequences)
    return {
        "variant": variant,
        "median_step_s": statistics.median(times),
        "tokens_per_step": tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--variant", choices=["ours", "ref_forward"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.batch)))
        return
    rows = {}
    for variant in ("ours", "ref_forward"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--batch", str(args.batch)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    result = {
        "setup": {"model": "models/policy (SmolLM2-135M)", "pairs_per_step": args.batch, "steps": args.steps},
        "variants": rows,
        "ratio_time_ours_to_ref_forward": rows["ours"]["median_step_s"] / rows["ref_forward"]["median_step_s"],
        "ratio_peak_rss_ours_to_ref_forward": rows["ours"]["peak_rss_mb"] / rows["ref_forward"]["peak_rss_mb"],
    }
    print(json.dumps(result, indent=1))
    print(f"wrote {write_result('train_dpo', result)}")


if __name__ == "__main__":
    main()
