"""The comparison report: one HTML page (with PNG plots) that puts the methods side by side on the
same data, from what the pipeline and the benchmarks wrote. Every table and plot names the command
that reproduces it; a section whose inputs do not exist says "not run" and gives the command.

Inputs: reports/*.json and *.csv (the stages), benchmarks/results/bench.json (`make bench`).
Output: reports/report/index.html + *.png (`logitflow report`), also logged to MLflow.
"""

from __future__ import annotations

import csv
import html
import json
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

from logitflow.config import Params
from logitflow.fsio import atomic_directory

BENCH_FILE = Path("benchmarks/results/bench.json")


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _csv(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)


class Page:
    """HTML sections and PNG figures written into one directory."""

    def __init__(self, directory: Path):
        self.directory, self.parts = directory, []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def section(self, title: str, command: str, body: str | None) -> None:
        self.parts.append(f"<h3>{html.escape(title)}</h3>")
        if body is None:
            self.parts.append(f'<p class="not-run">not run: <code>{html.escape(command)}</code></p>')
        else:
            self.parts.append(body + f'<p class="cmd">reproduce: <code>{html.escape(command)}</code></p>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def figure(self, name: str, draw: Callable[[Any], None]) -> str:
        figure = Figure(figsize=(6.4, 4.0), layout="tight")
        axes = figure.subplots()
        draw(axes)
        axes.grid(alpha=0.3)
        figure.savefig(self.directory / f"{name}.png", dpi=110)
        return f'<img src="{name}.png" alt="{html.escape(name)}">'

    def html(self, title: str, preamble: str) -> str:
        style = (
            "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
            "text-align:right}th{background:#f3f3f3}.not-run{color:#a60}.cmd{color:#666;font-size:.9em}"
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{preamble}{''.join(self.parts)}"
            "</body></html>"
        )


def _git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def _distillation(page: Page, params: Params, root: Path, bench: dict[str, Any]) -> None:
    reports = root / params.paths.reports
    page.heading("Distillation: RS-KD vs Top-K vs CE (vs FullKD when run)")
    evaluated = (_json(reports / "evaluate.json") or {}).get("students")
    rows = [
        [
            loss,
            v.get("lm_loss"),
            v.get("ece"),
            v.get("kl_to_teacher"),
            v.get("top1_agreement"),
            v.get("generation_speedup_vs_teacher"),
        ]
        for loss, v in (evaluated or {}).items()
    ]
    body = (
        page.table(
            ["model", "held-out LM loss", "ECE", "KL to teacher", "top-1 agreement", "generation speed vs teacher"],
            rows,
        )
        if rows
        else None
    )
    page.section("Held-out quality of each student (same held-out chunks)", "dvc repro evaluate", body)

    caches = {mode: _json(reports / f"cache_teacher_{mode}.json") for mode in ("rskd", "topk")}
    rows = [
        [mode, c["unique_per_position"], c["bytes_per_entry"], c["bytes_per_token"], c["cache_bytes"]]
        for mode, c in caches.items()
        if c
    ]
    body = (
        page.table(["cache", "ids / position", "bytes / entry", "bytes / token", "total bytes"], rows) if rows else None
    )
    page.section("Cache size", "dvc repro cache_teacher", body)

    curves = {loss: _csv(reports / "distill" / f"{loss}.csv") for loss in params.distill.losses}
    curves = {k: v for k, v in curves.items() if v}

    def draw_curves(axes) -> None:
        for loss, rows_ in curves.items():
            axes.plot([r["step"] for r in rows_], [r["lm_loss"] for r in rows_], label=loss)
        axes.set(xlabel="step", ylabel="train LM loss (real next token)", title="Distillation curves")
        axes.legend()

    page.section("Training curves", "dvc repro distill", page.figure("distill_curves", draw_curves) if curves else None)

    bins = {
        p.stem.removeprefix("reliability_"): _csv(p) for p in sorted((reports / "evaluate").glob("reliability_*.csv"))
    }

    def draw_reliability(axes) -> None:
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        for model, rows_ in bins.items():
            filled = [r for r in rows_ if r["count"] > 0]
            axes.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], marker="o", label=model)
        axes.set(xlabel="confidence (top label)", ylabel="accuracy", title="Reliability diagram (held-out)")
        axes.legend()

    page.section("Calibration", "dvc repro evaluate", page.figure("reliability", draw_reliability) if bins else None)

    distill_bench = bench.get("distill")
    body = None
    if distill_bench:
        ratios = distill_bench["step_time_ratio_to_ce"]
        body = page.table(["loss", "step time / CE step time"], [[k, v] for k, v in ratios.items()])
        for student, rows_ in distill_bench["gradient_fidelity"].items():
            body += f"<p>{html.escape(student)}: gradient vs FullKD's</p>" + page.table(
                ["target", "ids / position", "angle (deg)", "norm ratio"],
                [[r["method"], r["unique_per_position"], r["angle_degrees"], r["norm_ratio"]] for r in rows_],
            )
    page.section("Step time and gradient fidelity (benchmark)", "make bench  # benchmarks/distill.py", body)


def _active_dpo(page: Page, params: Params, root: Path, bench: dict[str, Any]) -> None:
    reports = root / params.paths.reports
    page.heading("Active preference selection: ADPO+ vs ADPO vs APO vs uniform")
    curves = {m: _csv(reports / "select" / f"{m}.csv") for m in ("uniform", "apo", "adpo", "adpo_plus")}
    curves = {k: v for k, v in curves.items() if v}

    def draw_logdet(axes) -> None:
        for method, rows in curves.items():
            axes.plot([r["budget"] for r in rows], [r["logdet"] for r in rows], label=method)
        axes.set(xlabel="budget (pairs)", ylabel="log det of the Fisher matrix", title="Log det vs budget")
        axes.legend()

    page.section(
        "Information of the selected pairs",
        "dvc repro select",
        page.figure("logdet_vs_budget", draw_logdet) if curves else None,
    )

    loglinear = (bench.get("active_dpo") or {}).get("loglinear")

    def draw_error(axes) -> None:
        for method, values in loglinear["mean_over_seeds"].items():
            axes.plot(loglinear["budgets"], values["max"], marker="o", label=method)
        axes.set(xscale="log", xlabel="labels (budget)", ylabel="max logit error", title="Log-linear ground truth")
        axes.legend()

    page.section(
        "Logit error vs budget (log-linear benchmark)",
        "make bench  # benchmarks/active_dpo.py --part loglinear",
        page.figure("logit_error_vs_budget", draw_error) if loglinear else None,
    )

    evaluated = (_json(reports / "evaluate.json") or {}).get("policies")
    rows = [
        [
            name,
            v.get("heldout_accuracy"),
            v.get("heldout_margin"),
            v.get("heldout_dpo_nll"),
            v.get("answer_success_rate"),
        ]
        for name, v in (evaluated or {}).items()
    ]
    body = (
        page.table(["policy", "held-out accuracy", "held-out margin", "DPO NLL", "answer-key success"], rows)
        if rows
        else None
    )
    page.section(f"DPO at equal budget ({params.select.budget} pairs)", "dvc repro evaluate", body)

    dpo_bench = bench.get("train_dpo")
    body = (
        page.table(
            ["DPO step: cached reference vs reference forward", "time ratio", "memory ratio"],
            [
                [
                    "ours / reference forward",
                    dpo_bench["ratio_time_ours_to_ref_forward"],
                    dpo_bench["ratio_peak_rss_ours_to_ref_forward"],
                ]
            ],
        )
        if dpo_bench
        else None
    )
    page.section("DPO step cost (benchmark)", "make bench  # benchmarks/train_dpo.py", body)


def build_report(params: Params, root: Path) -> Path:
    """Write reports/report/ (index.html + PNGs) atomically and return the directory."""
    bench = (_json(root / BENCH_FILE) or {}).get("benchmarks", {})
    prepared = _json(root / params.paths.prepared / "report.json") or {}
    out = root / params.paths.reports / "report"
    with atomic_directory(out) as tmp:
        page = Page(tmp)
        _distillation(page, params, root, bench)
        _active_dpo(page, params, root, bench)
        fingerprints = prepared.get("fingerprints", {})
        preamble = page.table(
            ["generated", "git commit", "held-out prefs fingerprint", "held-out corpus fingerprint", "benchmarks"],
            [
                [
                    datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                    _git_commit(root),
                    str(fingerprints.get("prefs_heldout", "–"))[:12],
                    str(fingerprints.get("corpus_heldout", "–"))[:12],
                    ", ".join(sorted(bench)) or "not run (make bench)",
                ]
            ],
        )
        (tmp / "index.html").write_text(page.html("logitflow comparison report", preamble), encoding="utf-8")
    return out
