"""The command line: `logitflow stage NAME`, `promote`, `report`, `grad-fidelity`, `params show|apply`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from logitflow.config import load_params, params_path
from logitflow.errors import LogitflowError
from logitflow.params_file import apply_overlay

app = typer.Typer(
    help="logitflow: RS-KD logit caching + distillation and active DPO, as a reproducible pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
params_app = typer.Typer(help="Show or change the validated params.", no_args_is_help=True)
app.add_typer(params_app, name="params")
err_console = Console(stderr=True)

ParamsOption = Annotated[
    Path | None, typer.Option("--params", "-p", help="params file (default: $LOGITFLOW_PARAMS or ./params.yaml)")
]


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stage_names() -> list[str]:
    from logitflow.stages import STAGES

    return sorted(STAGES)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="stage name, as in dvc.yaml (e.g. prepare, models, cache_teacher)")],
    variant: Annotated[str | None, typer.Argument(help="matrix entry, e.g. rskd in cache_teacher@rskd")] = None,
    params: ParamsOption = None,
) -> None:
    """Run one pipeline stage (the same command DVC runs): `logitflow stage cache_teacher rskd`."""
    from logitflow.stages import STAGES

    if name not in STAGES:
        _fail(f"unknown stage '{name}' (stages: {', '.join(_stage_names())})")
    try:
        path = params_path(params)
        loaded = load_params(path)
        metrics = STAGES[name](loaded, path.resolve().parent, variant)
    except LogitflowError as err:
        _fail(str(err))
    except ValidationError as err:  # a stage validating its own inputs with pydantic
        _fail(str(err).replace("\n", " "))
    err_console.print_json(json.dumps(metrics, default=str))


@app.command("grad-fidelity")
def grad_fidelity(
    params: ParamsOption = None,
    sequences: Annotated[int, typer.Option(min=1, help="corpus sequences in the batch")] = 8,
    rskd_samples: Annotated[list[int] | None, typer.Option("--rskd-samples", min=1, help="RS-KD draws N")] = None,
    topk: Annotated[list[int] | None, typer.Option("--topk", min=1, help="Top-K sizes")] = None,
    student: Annotated[Path | None, typer.Option(help="a trained student directory (default: a fresh one)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the table as JSON here")] = None,
) -> None:
    """Angle and norm ratio of each sparse KD loss's gradient vs FullKD's, on real batches."""
    from dataclasses import asdict

    from rich.table import Table

    from logitflow.analysis.grad_fidelity import gradient_fidelity
    from logitflow.fsio import atomic_write_json

    try:
        path = params_path(params)
        rows = gradient_fidelity(
            load_params(path),
            path.resolve().parent,
            sequences=sequences,
            rskd_samples=rskd_samples or [30, 50],
            topk=topk or [12, 50],
            student_path=student,
        )
    except LogitflowError as err:
        _fail(str(err))
    table = Table(title="Student gradient vs FullKD's")
    for column in ("target", "stored ids / position", "angle (deg)", "norm ratio"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for row in rows:
        table.add_row(row.method, f"{row.unique_per_position:.1f}", f"{row.angle_degrees:.1f}", f"{row.norm_ratio:.2f}")
    Console().print(table)
    if json_out is not None:
        atomic_write_json(json_out, [asdict(row) for row in rows])


@app.command()
def promote(
    model: Annotated[str, typer.Argument(help="policy | student | all")] = "all",
    version: Annotated[int | None, typer.Option(help="promote this version instead of the challenger")] = None,
    force: Annotated[bool, typer.Option("--force", help="move champion even if the gate says no")] = False,
    params: ParamsOption = None,
) -> None:
    """Move `champion` to the `challenger` of logitflow-policy / logitflow-student when it wins the
    gate in params (`promote:`); the decision, values and reason become version tags."""
    from logitflow import tracking
    from logitflow.stages.distill import REGISTERED_STUDENT
    from logitflow.stages.train_dpo import REGISTERED_POLICY

    names = {"policy": REGISTERED_POLICY, "student": REGISTERED_STUDENT}
    chosen = list(names) if model == "all" else [model]
    if any(m not in names for m in chosen):
        _fail(f"promote: unknown model '{model}' (policy, student or all)")
    if version is not None and len(chosen) > 1:
        _fail("promote: --version needs one model (policy or student), not all")
    try:
        path = params_path(params)
        loaded = load_params(path)
        tracking.configure(loaded, path.resolve().parent)
    except LogitflowError as err:
        _fail(str(err))
    failures = []
    for key in chosen:
        gate = getattr(loaded.promote, key)
        try:
            result = tracking.promote(names[key], gate, version=version, force=force)
        except LogitflowError as err:
            failures.append(str(err))
            continue
        champion = f"champion v{result.champion_version}" if result.champion_version else "no champion"
        color = "green" if result.decision.promoted else "yellow"
        typer.echo(
            f"{result.name}: v{result.challenger_version} ({champion}) -> "
            + typer.style(result.decision.outcome, fg=color, bold=True)
            + f": {result.decision.reason}"
        )
    if failures:
        _fail("\n".join(failures))


@app.command()
def report(params: ParamsOption = None) -> None:
    """Write the comparison report (reports/report/index.html + PNGs) and log it to MLflow."""
    from logitflow import tracking
    from logitflow.report import build_report

    try:
        path = params_path(params)
        loaded = load_params(path)
        root = path.resolve().parent
        out = build_report(loaded, root)
        with tracking.start_run(loaded, root, stage="report", run_name="report"):
            tracking.log_artifacts(out, "report")
    except LogitflowError as err:
        _fail(str(err))
    typer.echo(f"report: {(out / 'index.html').as_uri()}")


@params_app.command("show")
def params_show(
    params: ParamsOption = None,
    overlay: Annotated[list[Path] | None, typer.Option("--overlay", "-o", help="overlay file(s) to merge")] = None,
) -> None:
    """Print the effective, validated params (defaults filled in) as YAML."""
    import yaml

    try:
        loaded = load_params(params, overlays=overlay or [])
    except LogitflowError as err:
        _fail(str(err))
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))


@params_app.command("apply")
def params_apply(
    overlay: Annotated[Path, typer.Argument(help="overlay file, e.g. params/cluster.yaml")],
    params: ParamsOption = None,
) -> None:
    """Merge an overlay into params.yaml (comments kept); nothing is written if the result is invalid."""
    try:
        changed = apply_overlay(params_path(params), overlay)
    except LogitflowError as err:
        _fail(str(err))
    typer.echo(f"{params_path(params)}: {len(changed)} key(s) changed" + "".join(f"\n  {k}" for k in changed))
