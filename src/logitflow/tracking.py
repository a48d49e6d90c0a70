"""The one module that talks to MLflow.

Embedded default: a SQLite database and a local artifact root under `<project>/<paths.mlflow>`,
resolved to absolute paths at run time. A DVC experiment running in a temporary copy of the
repository (`.dvc/tmp/exps/...`) logs to the store of the repository it was started from.
`MLFLOW_TRACKING_URI` in the environment, else `tracking.uri` in params, switches to a server.
Runs nest under the run id in `LOGITFLOW_PARENT_RUN_ID` (set by the flows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from logitflow.config import GateSettings, Params
from logitflow.errors import LogitflowError
from logitflow.promotion import Decision, decide

CHALLENGER, CHAMPION = "challenger", "champion"
HELDOUT_TAG = "logitflow.heldout_key"  # what a run's held-out metrics were measured on; gates compare equal keys
PARENT_RUN_ENV = "LOGITFLOW_PARENT_RUN_ID"
LINEAGE_ENV = "LOGITFLOW_LINEAGE_TAGS"  # JSON tags (flow run id, git commit, DVC experiment) for every stage run
HOME_ENV = "LOGITFLOW_HOME"
DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")
MAX_PARAM_KEY_LENGTH = 250


@dataclass(frozen=True)
class TrackingTarget:
    tracking_uri: str
    artifact_root: str | None  # None: the server decides


def shared_root(project_root: Path) -> Path:
    """The repository whose embedded store every run of this project shares."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).resolve()
    root = project_root.resolve()
    parts = root.parts
    for index in range(len(parts) - len(DVC_TEMP_WORKSPACE) + 1):
        if parts[index : index + len(DVC_TEMP_WORKSPACE)] == DVC_TEMP_WORKSPACE:
            return Path(*parts[:index])
    return root


def resolve_target(params: Params, project_root: Path) -> TrackingTarget:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri
    if uri:
        return TrackingTarget(uri, None)
    store = shared_root(project_root) / params.paths.mlflow
    store.mkdir(parents=True, exist_ok=True)
    return TrackingTarget(f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri())


def configure(params: Params, project_root: Path) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    target = resolve_target(params, project_root)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # schema-migration chatter
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(target.tracking_uri)
    mlflow.set_registry_uri(target.tracking_uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that so a later configure() in this
    # process (another project, a test) still sees only what the user set.
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment)
    if experiment is None:
        location = f"{target.artifact_root}/{params.tracking.experiment}" if target.artifact_root else None
        experiment_id = mlflow.create_experiment(params.tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def start_run(
    params: Params,
    project_root: Path,
    *,
    stage: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    enabled: bool = True,
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun | None]:
    """An MLflow run for one stage, with every param logged (flattened), nested under the parent
    run named by the environment when there is one. `resume_run_id` continues an earlier run (its
    params stay as first logged). Not enabled (e.g. torchrun ranks other than 0): yields None and
    touches nothing."""
    if not enabled:
        yield None
        return
    configure(params, project_root)
    if resume_run_id and _run_exists(resume_run_id):
        with mlflow.start_run(run_id=resume_run_id, tags=dict(tags or {})) as run:
            yield run
        return
    parent = os.environ.get(PARENT_RUN_ENV) or None
    lineage = json.loads(os.environ.get(LINEAGE_ENV) or "{}")
    all_tags = {"logitflow.stage": stage, **lineage, **(tags or {})}
    with mlflow.start_run(run_name=run_name or stage, parent_run_id=parent, tags=all_tags) as run:
        log_params(flatten_params(params.model_dump(mode="json")))
        yield run


def _run_exists(run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False  # e.g. the store was reset: the session starts a new run
    return True


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys with string values within MLflow's length limits."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = "null" if value is None else str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        flat[name[:MAX_PARAM_KEY_LENGTH]] = text
    return flat


def log_params(flat: Mapping[str, str]) -> None:
    items = list(flat.items())
    for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))


_METRIC_NAME = re.compile(r"[^0-9A-Za-z_\-./ ]")


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Finite numeric metrics only; names are made MLflow-safe (e.g. TRL's `rewards/chosen` stays)."""
    clean = {
        _METRIC_NAME.sub("_", name): float(value)
        for name, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def metric_history(run_id: str, key: str) -> list[Any]:
    return mlflow.MlflowClient().get_metric_history(run_id, key)


def log_dict(obj: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(dict(obj), artifact_file)


def log_input(name: str, path: str | os.PathLike[str], digest: str, context: str) -> None:
    """Record a dataset the run read (a cache, a selection, a split) by location and content
    digest, without uploading it: the run's Inputs in the MLflow UI."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow registers its local-file source class twice, which makes plain resolution warn.
    local = [next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")]
    source = resolve_dataset_source(str(Path(path).resolve()), candidate_sources=local)
    mlflow.log_input(MetaDataset(source, name=name, digest=digest[:32]), context=context)


def log_figure(figure: Any, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def log_artifacts(directory: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(directory), artifact_path)


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    packages = ["torch", "transformers", "tokenizers", "safetensors", "accelerate"]
    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def log_transformers_model(
    model: Any, tokenizer: Any, *, name: str = "model", registered_model_name: str | None = None
) -> Any:
    """Log a causal LM with the transformers flavour (explicit pip requirements: inferring them
    is slow and fails without torchvision); optionally register it. Returns MLflow's ModelInfo."""
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name=name,
        task="text-generation",
        pip_requirements=_pip_requirements(),
        registered_model_name=registered_model_name,
    )


def set_alias(name: str, version: str | int, alias: str) -> None:
    """Point `models:/<name>@<alias>` at a registered version."""
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


@dataclass(frozen=True)
class Promotion:
    name: str
    challenger_version: str
    champion_version: str | None  # before the decision
    challenger_value: float
    champion_value: float | None
    decision: Decision


def _version(client: mlflow.MlflowClient, name: str, version: int | None) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, CHALLENGER)
    except MlflowException:
        pass
    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        versions = []
    if not versions:
        raise LogitflowError(f"promote: no registered model '{name}' in {mlflow.get_registry_uri()}")
    if version is not None:
        raise LogitflowError(f"promote: version {version} of '{name}' does not exist (versions: {versions})")
    raise LogitflowError(f"promote: '{name}' has no '{CHALLENGER}' alias (versions: {versions}); train one first")


def _gate_value(client: mlflow.MlflowClient, name: str, version: Any, metric: str) -> float:
    metrics = client.get_run(version.run_id).data.metrics
    if metric not in metrics:
        raise LogitflowError(
            f"promote: gate metric '{metric}' is not in run {version.run_id} (version {version.version} of "
            f"'{name}'); it has: {', '.join(sorted(metrics)) or 'no metrics'}"
        )
    return float(metrics[metric])


def promote(name: str, gate: GateSettings, *, version: int | None = None, force: bool = False) -> Promotion:
    """Compare `name`'s challenger (or `version`) with its champion on `gate`; move `champion` when
    the challenger wins or when forced. The decision, both values and the reason become tags of the
    challenger version. Every check happens before anything is written."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    challenger = _version(client, name, version)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    challenger_value = _gate_value(client, name, challenger, gate.metric)
    champion_value = None if champion is None else _gate_value(client, name, champion, gate.metric)
    if champion is not None and champion.version == challenger.version:
        decision = Decision("already_champion", f"version {challenger.version} is already the champion")
    else:
        keys = [
            None if v is None else client.get_run(v.run_id).data.tags.get(HELDOUT_TAG) for v in (challenger, champion)
        ]
        decision = decide(challenger_value, champion_value, gate, comparable=keys[0] == keys[1], force=force)
    tags = {
        "decision": decision.outcome,
        "reason": decision.reason,
        "metric": gate.metric,
        "challenger_value": repr(challenger_value),
        "champion_value": "none" if champion_value is None else repr(champion_value),
        "champion_version": "none" if champion is None else str(champion.version),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(challenger.version), f"promotion.{key}", value)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
    return Promotion(
        name,
        str(challenger.version),
        None if champion is None else str(champion.version),
        challenger_value,
        champion_value,
        decision,
    )
