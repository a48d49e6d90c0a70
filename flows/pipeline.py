"""The flows users trigger from the Prefect UI: `pipeline` (every stage, then promote and report)
and one flow per stage family (`cache-teacher`, `select`, `train-dpo`, `distill`).

Each stage is a Prefect task that runs `dvc repro` for that one stage, one at a time (DVC holds one
lock per repository), so DVC skips what is up to date and dvc.lock stays the record. A `pipeline`
run whose params differ from params.yaml runs instead as a DVC experiment (`dvc exp run --temp`):
the committed defaults do not change, `dvc exp show` lists it, `dvc exp apply` + `dvc repro`
reproduces it. Each flow run is one MLflow parent run; stage runs nest under it, tagged with the
Prefect flow-run id, the git commit and the DVC experiment name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from flows.dvc import BIN, git_commit, run_logged, stage_names
from logitflow import tracking
from logitflow.config import Params, load_params
from logitflow.preflight import check_mlflow, mlflow_uri, preflight

# Stages that read or write large files (and resume where they stopped): worth retrying.
IO_BOUND = ("prepare", "models", "cache_teacher", "score_prefs")


@task(task_run_name="{stage}", retries=0)
def run_stage(stage: str, project: str, env: dict[str, str], with_upstream: bool = False) -> str:
    command = [str(BIN / "dvc"), "repro", *([] if with_upstream else ["--single-item"]), stage]
    run_logged(command, Path(project), env)
    return stage


def _stage_task(stage: str):
    io_bound = stage.split("@")[0] in IO_BOUND
    return run_stage.with_options(retries=2, retry_delay_seconds=5) if io_bound else run_stage


@task(task_run_name="experiment {name}")
def run_experiment(
    name: str,
    overrides: dict[str, Any],
    project: str,
    env: dict[str, str],
    targets: list[str] | None = None,
    copy_paths: list[str] | None = None,
) -> str:
    """`dvc exp run --temp` with params overrides, of every stage or of `targets` and their upstream;
    `copy_paths`: files git does not track (e.g. data added with `dvc add` but not committed) that the
    experiment's temporary copy needs."""
    # `++`: set the key whether or not params.yaml spells it out (it may rely on a default)
    sets = [arg for key, value in overrides.items() for arg in ("-S", f"++{key}={json.dumps(value)}")]
    copies = [arg for path in copy_paths or [] for arg in ("--copy-paths", path)]
    command = [str(BIN / "dvc"), "exp", "run", "--temp", "--name", name, *copies, *sets, *(targets or [])]
    run_logged(command, Path(project), env)
    return name


@task(task_run_name="promote")
def promote_models(project: str, env: dict[str, str]) -> None:
    run_logged([str(BIN / "logitflow"), "promote", "all"], Path(project), env)


@task(task_run_name="report")
def write_report(project: str, env: dict[str, str]) -> None:
    run_logged([str(BIN / "logitflow"), "report"], Path(project), env)


def changed_params(defaults: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted leaf keys whose requested value differs from params.yaml's (lists compare whole): DVC's
    `-S` takes Hydra overrides, which set leaves, not JSON mappings."""
    changed: dict[str, Any] = {}
    for key, value in requested.items():
        default = defaults.get(key)
        if isinstance(value, Mapping):
            changed |= changed_params(default if isinstance(default, Mapping) else {}, value, f"{prefix}{key}.")
        elif value != default:
            changed[f"{prefix}{key}"] = value
    return changed


@contextmanager
def lineage(params: Params, root: Path, flow_name: str, experiment: str) -> Iterator[dict[str, str]]:
    """One MLflow parent run for this flow run; yields the environment that nests stage runs under it.
    A tracking server that does not answer fails the run here, before any stage starts."""
    check_mlflow(mlflow_uri(params))
    tags = {
        "logitflow.flow": flow_name,
        "prefect.flow_run_id": str(flow_run.id or "none"),
        "prefect.flow_run_name": str(flow_run.name or "none"),
        "git.commit": git_commit(root),
        "dvc.experiment": experiment,
    }
    with tracking.start_run(params, root, stage="flow", run_name=f"{flow_name} {flow_run.name}", tags=tags) as run:
        assert run is not None
        yield {tracking.PARENT_RUN_ENV: run.info.run_id, tracking.LINEAGE_ENV: json.dumps(tags)}


@flow(name="pipeline", log_prints=True)
def pipeline(params: Params | None = None, project: str = ".") -> list[str]:
    """Every stage in dependency order, then promote and report. `params` (defaults: params.yaml)
    that differ from params.yaml make this run a DVC experiment instead."""
    root = Path(project).resolve()
    defaults = load_params(root / "params.yaml")
    overrides = changed_params(defaults.model_dump(mode="json"), params.model_dump(mode="json")) if params else {}
    experiment = f"flow-{flow_run.name}" if overrides else "workspace"
    logger = get_run_logger()
    with lineage(params or defaults, root, "pipeline", experiment) as env:
        if overrides:
            logger.info("params differ from params.yaml (%s): running as DVC experiment %s", overrides, experiment)
            run_experiment(experiment, overrides, str(root), env)
            promote_models(str(root), env)
            logger.info("report not rebuilt: `dvc exp apply %s` then `logitflow report`", experiment)
            return [experiment]
        done = [_stage_task(stage)(stage, str(root), env) for stage in stage_names(root)]
        promote_models(str(root), env)
        write_report(str(root), env)
    return done


def _family(family: str, project: str) -> list[str]:
    root = Path(project).resolve()
    items = [s for s in stage_names(root) if s.split("@")[0] == family]
    with lineage(load_params(root / "params.yaml"), root, family.replace("_", "-"), "workspace") as env:
        return [_stage_task(item)(item, str(root), env, with_upstream=True) for item in items]


@flow(name="cache-teacher")
def cache_teacher_flow(project: str = ".") -> list[str]:
    """Teacher caches (RS-KD and Top-K), after whatever they depend on."""
    return _family("cache_teacher", project)


@flow(name="select")
def select_flow(project: str = ".") -> list[str]:
    """Every selection method on the scored preference pool."""
    return _family("select", project)


@flow(name="train-dpo")
def train_dpo_flow(project: str = ".") -> list[str]:
    """DPO on each selection in train_dpo.methods."""
    return _family("train_dpo", project)


@flow(name="distill")
def distill_flow(project: str = ".") -> list[str]:
    """A student per loss in distill.losses."""
    return _family("distill", project)


FLOWS = (pipeline, cache_teacher_flow, select_flow, train_dpo_flow, distill_flow)


def main() -> None:
    """`python -m flows.pipeline [--overlay params/smoke.yaml]`: the pipeline flow from a shell (a
    temporary Prefect server starts when no PREFECT_API_URL is set). An overlay runs as a DVC experiment."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--overlay", action="append", default=[], help="params overlay(s) to run as an experiment")
    args = parser.parse_args()
    params = load_params("params.yaml", overlays=args.overlay) if args.overlay else None
    preflight(params or load_params("params.yaml"))
    pipeline(params=params)


if __name__ == "__main__":
    main()
