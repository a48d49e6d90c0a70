"""pool: the unlabelled pair pool that the feedback flow asks people about.

`feedback.pool.type: demo`: the first `feedback.demo.prompts` prompts of the prepared train split,
each with two responses sampled from the reference policy (pairs whose responses come out equal or
empty are dropped and counted); the demo answer key goes beside the pool for simulated annotators.
`local`/`hub`: the user's pool, validated row by row as it streams in, repeats refused.

Output: `paths.pool`/ (pairs.arrow, manifest.json, answer_key.jsonl for the demo), reports/pool.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from logitflow import tracking
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import Params
from logitflow.data.pool import iter_pool, write_pool
from logitflow.data.records import read_records
from logitflow.data.schemas import BadRows
from logitflow.evaluation.generate import Sampling, generate
from logitflow.fsio import atomic_directory, atomic_write_json
from logitflow.models import load_materialized
from logitflow.stages.models import model_dir
from logitflow.stages.prepare import read_split

log = logging.getLogger(__name__)
ANSWER_KEY_FILE = "answer_key.jsonl"


def pool_dir(params: Params, root: Path) -> Path:
    return root / params.paths.pool


def _demo_rows(params: Params, root: Path, stats: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict]]:
    settings = params.feedback.demo
    prefs = read_split(params, root, "prefs_train")
    answers = {row["id"]: row["answer"] for row in read_split(params, root, "answer_key")}
    chosen = prefs.select(range(min(settings.prompts, len(prefs))))
    prompts = [prompt for prompt in chosen["prompt"] for _ in range(2)]

    apply_threads(params.compute)
    device = resolve_device(params.compute)
    policy = load_materialized(model_dir(params, root, "policy"))
    model = policy.model.to(device=device, dtype=inference_dtype(params.compute))
    generations = generate(
        model,
        policy.tokenizer,
        prompts,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        device=device,
        autocast=lambda: autocast(params.compute, device),
        sampling=Sampling(settings.temperature, settings.top_p, settings.seed),
    )
    stats["tokens_per_second"] = round(generations.tokens_per_second, 1)
    rows, key = [], []
    for index, row in enumerate(chosen):
        a, b = (text.strip() for text in generations.texts[2 * index : 2 * index + 2])
        if not a or not b or a == b:
            stats["dropped_equal_or_empty"] += 1
            continue
        pair_id = f"pool-{row['id']}"
        rows.append({"id": pair_id, "prompt": row["prompt"], "response_a": a, "response_b": b})
        key.append({"id": pair_id, "answer": answers[row["id"]]})
    return rows, key


def run(params: Params, root: Path) -> dict[str, Any]:
    section = params.feedback
    stats: dict[str, Any] = {"dropped_equal_or_empty": 0}
    bad_rows = BadRows()
    answer_key: list[dict] = []
    rows: list[dict[str, Any]] | Iterator[dict[str, Any]]
    if section.pool.type == "demo":
        rows, answer_key = _demo_rows(params, root, stats)
    else:
        rows = iter_pool(read_records(section.pool, base_dir=root), section.on_bad_rows, bad_rows)
    with atomic_directory(pool_dir(params, root)) as tmp:
        manifest = write_pool(rows, tmp, section.pool.describe())
        if answer_key:
            (tmp / ANSWER_KEY_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in answer_key))
    metrics = {"pairs": manifest["rows"], "bad_rows": bad_rows.total, **stats}
    atomic_write_json(root / params.paths.reports / "pool.json", {**metrics, "bad_row_examples": bad_rows.examples})
    with tracking.start_run(params, root, stage="pool"):
        tracking.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    log.info("pool: %d pairs from %s (%s)", manifest["rows"], manifest["source"], manifest["fingerprint"][:12])
    return metrics


def read_answer_key(params: Params, root: Path) -> dict[str, str]:
    """pair id -> answer, for the demo pool (empty for a user's pool)."""
    path = pool_dir(params, root) / ANSWER_KEY_FILE
    if not path.is_file():
        return {}
    return {entry["id"]: entry["answer"] for entry in map(json.loads, path.read_text().splitlines())}
