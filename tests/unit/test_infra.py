"""Validation of the team-infrastructure files (infra/, prefect.yaml, params/cluster.yaml).

Nothing here starts a container, a GPU job or a cluster (none of those exist on this machine): each file
is checked by the tool that will read it, where that tool installs from PyPI (the Compose specification's
JSON schema, Prefect's own models and workers, docker-py, Ray's config schema, the params models), and by
project rules (ports on 127.0.0.1, no secrets, names that agree across files). Every validator has a test
that feeds it a broken input, so none of the checks passes vacuously.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import inspect
import io
import ipaddress
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.helpers.net import free_port

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
ENV_EXAMPLE = INFRA / ".env.example"
COMPOSE_SCHEMA = INFRA / "schemas" / "compose-spec.json"
POOLS_DIR = INFRA / "work-pools"
CREATE_POOLS = POOLS_DIR / "create.sh"
PREFECT_YAML = REPO / "prefect.yaml"
GPU_DOCKERFILE = INFRA / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
RAY_CLUSTER = INFRA / "ray" / "cluster.yaml"
INFRA_README = INFRA / "README.md"

# Extras that another change of the same issue adds to pyproject.toml; checked as soon as they exist.
PENDING_EXTRAS = {"ray"}


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- compose: interpolation and variables

# Compose interpolation: $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
# ${VAR?error}, ${VAR:+alt}, ${VAR+alt}, $VAR.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def referenced_variables(text: str) -> set[str]:
    return {m["braced"] or m["named"] for m in _VARIABLE.finditer(text) if not m["escaped"]}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The compose file's values with variables substituted as `docker compose` does."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        is_set, current = name in env, env.get(name, "")
        usable = is_set and (current != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return current if usable else arg
        if op in (":?", "?"):
            if not usable:
                raise KeyError(f"${{{name}}} is required: {arg}")
            return current
        if op in (":+", "+"):
            return arg if usable else ""
        return current

    return _VARIABLE.sub(substitute, value)


def parse_env_file(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path}:{number}: not KEY=value: {line!r}")
        entries[key] = value
    return entries


def compose_document(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(read_yaml(COMPOSE), parse_env_file(ENV_EXAMPLE) if env is None else env)


# ---------------------------------------------------------------- compose: validators


def compose_schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in validator.iter_errors(document)]


def _host_ip_of_short_port(spec: str) -> str | None:
    """The host address of a short-syntax port ('[IP:][HOST:]CONTAINER[/proto]'); None: every interface."""
    spec = spec.split("/")[0]
    if spec.startswith("["):
        return spec[1 : spec.index("]")]
    parts = spec.split(":")
    return parts[0] if len(parts) == 3 else None


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def published_port_problems(document: dict[str, Any]) -> list[str]:
    """Every published port bound to a loopback address; host networking publishes everything."""
    problems = []
    for name, service in (document.get("services") or {}).items():
        if service.get("network_mode") == "host":
            problems.append(f"{name}: network_mode host publishes every port on every interface")
        for port in service.get("ports") or []:
            host_ip = port.get("host_ip") if isinstance(port, dict) else _host_ip_of_short_port(str(port))
            if not _is_loopback(host_ip):
                problems.append(f"{name}: port {port!r} is published on {host_ip or 'every interface (0.0.0.0)'}")
    return problems


def healthcheck_problems(document: dict[str, Any]) -> list[str]:
    """Long-running services have a healthcheck; `service_healthy` waits only on services that have one."""
    services = document.get("services") or {}
    problems = []
    for name, service in services.items():
        one_shot = str(service.get("restart", "no")) == "no"
        if not one_shot and not service.get("healthcheck"):
            problems.append(f"{name}: long-running service without a healthcheck")
        depends = service.get("depends_on") or {}
        for target, rule in depends.items() if isinstance(depends, dict) else []:
            if rule.get("condition") == "service_healthy" and not (services.get(target) or {}).get("healthcheck"):
                problems.append(f"{name}: waits for {target} to be healthy, but {target} has no healthcheck")
    return problems


def volume_and_image_problems(document: dict[str, Any]) -> list[str]:
    """Named volumes are declared; images are pinned to a tag (locally built ones excepted)."""
    declared = set(document.get("volumes") or {})
    problems = []
    for name, service in (document.get("services") or {}).items():
        for volume in service.get("volumes") or []:
            source = volume.get("source") if isinstance(volume, dict) else str(volume).split(":")[0]
            if source and not source.startswith(("/", ".", "~")) and source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared under top-level volumes")
        image = service.get("image")
        if image and not service.get("build"):
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"{name}: image {image!r} is not pinned to a version tag")
    return problems


# Names whose values must be placeholders, and shapes of real credentials.
_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|CREDENTIAL", re.IGNORECASE)
_PLACEHOLDER = "change-me"
_CREDENTIAL_SHAPES = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY"),
    "a GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "a JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "an API key (sk-...)": re.compile(r"\bsk-[A-Za-z0-9]{20,}"),
    "a password inside a URL": re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
}


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def secret_problems(entries: dict[str, str]) -> list[str]:
    problems = []
    for key, value in entries.items():
        placeholder = value.startswith(_PLACEHOLDER)
        if _SECRET_NAME.search(key) and not placeholder:
            problems.append(f"{key}: a secret's value must be a placeholder starting with {_PLACEHOLDER!r}")
        for what, shape in _CREDENTIAL_SHAPES.items():
            if shape.search(value):
                problems.append(f"{key}: the value looks like {what}")
        has_letters_and_digits = re.search(r"[A-Za-z]", value) and re.search(r"\d", value)
        if not placeholder and len(value) >= 16 and has_letters_and_digits and _entropy(value) >= 3.7:
            problems.append(f"{key}: the value looks randomly generated (a real secret?)")
    return problems


# ---------------------------------------------------------------- compose: tests


def test_compose_validates_against_the_compose_specification() -> None:
    document = compose_document()
    assert compose_schema_errors(document) == []
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio", "minio-init"} <= set(document["services"])


def test_compose_schema_check_catches_unknown_keys_and_bad_types() -> None:
    document = compose_document()
    document["services"]["mlflow"]["portz"] = ["127.0.0.1:5000:5000"]
    document["services"]["minio"]["volumes"] = "minio-data:/data"  # a list in the specification
    errors = compose_schema_errors(document)
    assert any("portz" in error for error in errors), errors
    assert any(error.startswith("services.minio.volumes") for error in errors), errors


def test_every_published_port_is_bound_to_loopback() -> None:
    document = compose_document()
    assert published_port_problems(document) == []
    published = [p for s in document["services"].values() for p in s.get("ports", [])]
    assert len(published) >= 4  # Prefect, MLflow, MinIO's API and console


@pytest.mark.parametrize(
    ("port", "exposed"),
    [
        ("4200:4200", True),
        ("4200", True),
        ("0.0.0.0:4200:4200", True),
        ("[::]:4200:4200/tcp", True),
        ({"target": 4200, "published": 4200}, True),
        ({"target": 4200, "published": 4200, "host_ip": "0.0.0.0"}, True),
        ("127.0.0.1:4200:4200", False),
        ("[::1]:4200:4200", False),
        ({"target": 4200, "published": "4200", "host_ip": "127.0.0.1"}, False),
    ],
)
def test_port_check_catches_ports_on_every_interface(port: Any, exposed: bool) -> None:
    problems = published_port_problems({"services": {"web": {"image": "x:1", "ports": [port]}}})
    assert bool(problems) is exposed, problems


def test_port_check_catches_host_networking() -> None:
    assert published_port_problems({"services": {"web": {"image": "x:1", "network_mode": "host"}}})


def test_every_variable_of_the_compose_file_is_in_the_env_example_and_none_is_stale() -> None:
    referenced = referenced_variables(COMPOSE.read_text(encoding="utf-8"))
    defined = set(parse_env_file(ENV_EXAMPLE))
    assert referenced, "the compose file takes its secrets from variables"
    assert referenced - defined == set(), "referenced by infra/compose.yaml but missing in infra/.env.example"
    assert defined - referenced == set(), "in infra/.env.example but used nowhere in infra/compose.yaml"
    compose_document()  # every required ${VAR:?...} resolves with the example's values


def test_variable_scan_sees_every_form_and_skips_escaped_dollars() -> None:
    text = "a: ${ONE}\nb: ${TWO:-x}\nc: $THREE\nd: $$NOT_ME\ne: ${FOUR:?set it}\n"
    assert referenced_variables(text) == {"ONE", "TWO", "THREE", "FOUR"}
    with pytest.raises(KeyError, match="FOUR"):
        interpolate(yaml.safe_load(text), {"ONE": "1"})
    assert interpolate("${TWO:-x}/$$HOME/${ONE}", {"ONE": "1"}) == "x/$HOME/1"


def test_the_env_example_holds_no_real_looking_secret() -> None:
    entries = parse_env_file(ENV_EXAMPLE)
    assert secret_problems(entries) == []
    assert any(_SECRET_NAME.search(key) for key in entries), "the example names the secrets to set"


@pytest.mark.parametrize(
    "entry",
    [
        {"MINIO_ROOT_PASSWORD": "hunter2hunter2"},
        {"S3_ACCESS_KEY": "AKIAIOSFODNN7EXAMPLE"},
        {"S3_ACCESS_KEY": "f2c3369bbfa53d4c1b424a6a7d458e97"},
        {"DATABASE_URL": "postgresql://mlflow:s3cret@db:5432/mlflow"},
        {"DEPLOY_KEY": "-----BEGIN OPENSSH PRIVATE KEY-----"},
    ],
)
def test_secret_check_catches_real_looking_values(entry: dict[str, str]) -> None:
    assert secret_problems(entry)


def test_the_real_env_file_is_git_ignored() -> None:
    result = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO, check=False)
    assert result.returncode == 0, "infra/.env (real secrets) must be ignored by git"
    result = subprocess.run(["git", "check-ignore", "-q", "infra/.env.example"], cwd=REPO, check=False)
    assert result.returncode == 1, "infra/.env.example must stay committed"


def test_services_have_healthchecks_declared_volumes_and_pinned_images() -> None:
    document = compose_document()
    assert healthcheck_problems(document) == []
    assert volume_and_image_problems(document) == []


def test_service_checks_catch_missing_healthchecks_undeclared_volumes_and_floating_images() -> None:
    document = compose_document()
    del document["services"]["minio"]["healthcheck"]  # minio-init waits for it to be healthy
    document["services"]["mlflow-db"]["volumes"] = ["undeclared:/var/lib/postgresql/data"]
    document["services"]["prefect-db"]["image"] = "postgres:latest"
    problems = healthcheck_problems(document) + volume_and_image_problems(document)
    assert any("minio: long-running" in p for p in problems), problems
    assert any("minio-init: waits for minio" in p for p in problems), problems
    assert any("undeclared" in p for p in problems), problems
    assert any("postgres:latest" in p for p in problems), problems


def test_servers_match_the_clients_in_this_venv() -> None:
    """The Prefect server image and the MLflow server build use this package's Prefect and MLflow."""
    import mlflow
    import prefect

    services = compose_document()["services"]
    prefect_tag = services["prefect-server"]["image"].partition(":")[2]
    assert prefect_tag.split("-")[0].split(".")[:2] == prefect.__version__.split(".")[:2]
    assert read_yaml(PREFECT_YAML)["prefect-version"].split(".")[:2] == prefect.__version__.split(".")[:2]
    built = services["mlflow"]["build"]["args"]["MLFLOW_VERSION"]
    assert f"ARG MLFLOW_VERSION={built}" in MLFLOW_DOCKERFILE.read_text(encoding="utf-8")
    assert built.split(".")[0] == mlflow.__version__.split(".")[0]


def _compose_cli() -> list[str] | None:
    """A Docker Compose v2 command line (no daemon needed for `config`): $LOGITFLOW_COMPOSE_BIN,
    `docker compose` or `docker-compose`."""
    candidates = []
    if os.environ.get("LOGITFLOW_COMPOSE_BIN"):
        candidates.append([os.environ["LOGITFLOW_COMPOSE_BIN"]])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        try:
            version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30, check=False)
        except OSError:
            continue
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            return command
    return None


def test_docker_compose_itself_accepts_the_file() -> None:
    command = _compose_cli()
    if command is None:
        pytest.skip("no Docker Compose v2 here (set LOGITFLOW_COMPOSE_BIN to a docker-compose binary)")
    base = [*command, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "--profile", "worker"]
    result = subprocess.run([*base, "config", "--format", "json"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    normalized = json.loads(result.stdout)
    assert published_port_problems(normalized) == []  # the ports as Compose itself reads them
    assert "prefect-worker" in normalized["services"]


# ---------------------------------------------------------------- work pools


def pool_commands() -> dict[str, tuple[str, Path]]:
    """{pool name: (worker type, base job template)} from infra/work-pools/create.sh."""
    pattern = re.compile(r"work-pool create (\S+) --type (\S+) --base-job-template (\S+)")
    found = {m[1]: (m[2], REPO / m[3]) for m in pattern.finditer(CREATE_POOLS.read_text(encoding="utf-8"))}
    assert found, f"no `prefect work-pool create` in {CREATE_POOLS}"
    return found


def worker_class(pool_type: str) -> Any:
    if pool_type == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker
    if pool_type == "docker":
        pytest.importorskip("prefect_docker", reason="prefect-docker (dev extra) validates the docker pool")
        from prefect_docker.worker import DockerWorker

        return DockerWorker
    raise AssertionError(f"no worker class known for pool type {pool_type!r}")


# Worker variables a template deliberately replaces (with the variables that take their place).
REPLACED_VARIABLES = {"docker": {"container_create_kwargs"}}


class _NoServer:
    """Stands in for a Prefect client: building a job configuration must not need the API."""

    async def __aenter__(self) -> _NoServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the template needs the Prefect API ({name}): a block or variable reference?")


def template_problems(pool_type: str, template: dict[str, Any]) -> list[str]:
    """The checks `prefect work-pool create` (server side) and the worker apply, plus: the template keeps
    every variable of the worker's own default template, with the same schema."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import is_valid_schema, validate

    problems = []
    try:
        WorkPoolCreate(name="check", type=pool_type, base_job_template=template)
    except ValueError as err:
        return [f"the Prefect server refuses the template: {err}"]
    variables = template["variables"]
    try:
        is_valid_schema(variables, preprocess=False)
        defaults = {k: v["default"] for k, v in variables.get("properties", {}).items() if "default" in v}
        validate(defaults, variables, raise_on_error=True, preprocess=True, ignore_required=True)
    except (ValueError, SchemaError) as err:
        problems.append(f"variable defaults do not fit their schema: {err}")

    worker = worker_class(pool_type)
    reference = worker.get_default_base_job_template()
    replaced = REPLACED_VARIABLES.get(pool_type, set())
    if set(template["job_configuration"]) != set(reference["job_configuration"]):
        problems.append(f"job_configuration keys differ from the {pool_type} worker's")
    ignore = {"default", "description", "title", "examples"}
    for name, schema in reference["variables"]["properties"].items():
        ours = variables["properties"].get(name)
        if name in replaced:
            continue
        if ours is None:
            problems.append(f"variable {name!r} of the {pool_type} worker is missing")
        elif {k: v for k, v in ours.items() if k not in ignore} != {k: v for k, v in schema.items() if k not in ignore}:
            problems.append(f"variable {name!r} has another schema than the {pool_type} worker's")
    try:
        configuration = asyncio.run(worker.job_configuration.from_template_and_values(template, {}, client=_NoServer()))
        assert configuration is not None
    except Exception as err:  # pydantic, templating: any failure is the finding
        problems.append(f"the {pool_type} worker cannot build a job configuration: {err}")
    return problems


def load_template(name: str) -> tuple[str, dict[str, Any]]:
    pool_type, path = pool_commands()[name]
    return pool_type, json.loads(path.read_text(encoding="utf-8"))


def test_create_script_covers_every_template_file() -> None:
    commands = pool_commands()
    assert {name: t for name, (t, _) in commands.items()} == {"gpu-box": "process", "gpu-docker": "docker"}
    assert {path for _, path in commands.values()} == set(POOLS_DIR.glob("*.json"))


@pytest.mark.parametrize("pool", ["gpu-box", "gpu-docker"])
def test_work_pool_template_passes_prefect_and_its_worker(pool: str) -> None:
    pool_type, template = load_template(pool)
    assert template_problems(pool_type, template) == []


def test_template_check_catches_undeclared_placeholders_bad_defaults_and_dropped_variables() -> None:
    pool_type, template = load_template("gpu-docker")
    broken = copy.deepcopy(template)
    broken["job_configuration"]["image"] = "{{ imag }}"
    assert any("refuses" in p for p in template_problems(pool_type, broken))

    broken = copy.deepcopy(template)
    broken["variables"]["properties"]["gpus"]["default"] = "all"
    assert any("defaults" in p for p in template_problems(pool_type, broken))

    broken = copy.deepcopy(template)
    del broken["variables"]["properties"]["volumes"]
    broken["job_configuration"]["volumes"] = []
    assert any("'volumes'" in p for p in template_problems(pool_type, broken))

    broken = copy.deepcopy(template)
    broken["variables"]["properties"]["auto_remove"]["type"] = "string"
    broken["variables"]["properties"]["auto_remove"]["default"] = "yes"
    assert any("'auto_remove'" in p for p in template_problems(pool_type, broken))


def docker_create_request(template: dict[str, Any], job_variables: dict[str, Any]) -> dict[str, Any]:
    """What the docker worker would send to the Docker API to create a flow run's container."""
    pytest.importorskip("prefect_docker", reason="prefect-docker (dev extra) validates the docker pool")
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration

    configuration = asyncio.run(
        DockerWorkerJobConfiguration.from_template_and_values(template, job_variables, client=_NoServer())
    )
    fake_engine = type("Engine", (), {"version": lambda self: {"Version": "27.3.1"}})()
    settings = DockerWorker(work_pool_name="gpu-docker")._build_container_settings(fake_engine, configuration)
    return _create_container_args({**settings, "version": "1.47"})


def test_docker_pool_requests_gpus_shared_memory_and_the_compose_network() -> None:
    _, template = load_template("gpu-docker")
    request = docker_create_request(template, {})
    host = request["host_config"]
    [gpus] = host["DeviceRequests"]
    assert gpus["Count"] == -1 and gpus["Capabilities"] == [["gpu"]] and gpus["Driver"] == "nvidia"
    assert host["ShmSize"] >= 8 * 2**30
    assert {u["Name"] for u in host["Ulimits"]} == {"memlock", "stack"}
    assert request["image"] == "logitflow-gpu:latest"
    # the flow-run containers join the compose network and reach the servers by their service names
    compose = compose_document()
    assert host["NetworkMode"] == compose["networks"]["default"]["name"]
    environment = request["environment"]
    if isinstance(environment, list):  # docker-py's list form, KEY=value
        environment = dict(item.split("=", 1) for item in environment)
    for variable in ("MLFLOW_TRACKING_URI", "LOGITFLOW_DVC_ENDPOINT"):
        address = urlsplit(environment[variable])
        assert address.hostname in compose["services"], f"{variable}: {address.hostname} is no compose service"
        assert any(str(address.port) in str(p) for p in compose["services"][address.hostname]["ports"])

    assert docker_create_request(template, {"gpus": 2})["host_config"]["DeviceRequests"][0]["Count"] == 2


def test_docker_pool_refuses_a_bad_gpu_count() -> None:
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import validate

    _, template = load_template("gpu-docker")
    with pytest.raises(SchemaError):
        validate({"gpus": -2}, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)


# ---------------------------------------------------------------- prefect.yaml


def deployments() -> list[dict[str, Any]]:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates the file with

    raw = read_yaml(PREFECT_YAML)
    PrefectYamlModel.model_validate(raw)
    return raw["deployments"]


def deployment_problems(deployment: dict[str, Any], pools: dict[str, dict[str, Any]]) -> list[str]:
    """One deployment of prefect.yaml: known keys only (Prefect ignores unknown ones silently), a real
    flow at its entrypoint, parameters and job variables its flow and work pool accept, pull steps
    whose functions exist and take the given arguments."""
    from prefect.cli.deploy._models import DeploymentConfig
    from prefect.flows import Flow, load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.importtools import import_object
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import validate

    name = deployment.get("name", "?")
    problems = [f"{name}: unknown key {key!r}" for key in set(deployment) - set(DeploymentConfig.model_fields)]
    try:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        assert isinstance(flow, Flow)
    except Exception as err:
        return [*problems, f"{name}: entrypoint {deployment.get('entrypoint')!r} is no flow: {err}"]
    name = f"{flow.name}/{name}"
    schema = parameter_schema(flow).model_dump_for_openapi()
    parameters = deployment.get("parameters") or {}
    unknown = set(parameters) - set(schema["properties"])
    problems += [f"{name}: {key!r} is not a parameter of the flow" for key in sorted(unknown)]
    try:
        validate(parameters, schema, raise_on_error=True, ignore_required=True)
    except SchemaError as err:
        problems.append(f"{name}: parameters: {err}")
    pool = (deployment.get("work_pool") or {}).get("name")
    if pool not in pools:
        problems.append(f"{name}: work pool {pool!r} is not created by {CREATE_POOLS.name}")
    else:
        try:
            job_variables = deployment["work_pool"].get("job_variables") or {}
            validate(job_variables, pools[pool]["variables"], raise_on_error=True, ignore_required=True)
        except SchemaError as err:
            problems.append(f"{name}: job_variables: {err}")
    for step in deployment.get("pull") or []:
        [(function_name, arguments)] = step.items()
        arguments = {k: v for k, v in (arguments or {}).items() if k not in ("id", "requires")}
        try:
            inspect.signature(import_object(function_name)).bind(**arguments)
        except (ImportError, AttributeError, TypeError) as err:
            problems.append(f"{name}: pull step {function_name}: {err}")
    return problems


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(REPO)  # entrypoints are relative to the repository root, as for `prefect deploy`
    monkeypatch.syspath_prepend(str(REPO))
    return REPO


def pools_by_name() -> dict[str, dict[str, Any]]:
    return {name: json.loads(path.read_text(encoding="utf-8")) for name, (_, path) in pool_commands().items()}


def test_every_deployment_is_a_real_flow_on_a_real_pool(in_repo: Path) -> None:
    pools = pools_by_name()
    problems = [p for deployment in deployments() for p in deployment_problems(deployment, pools)]
    assert problems == []


def test_every_flow_is_deployed_on_the_gpu_box_and_names_are_unique(in_repo: Path) -> None:
    from flows.feedback import feedback
    from flows.pipeline import FLOWS

    entries = [(d["entrypoint"], d["name"]) for d in deployments()]
    assert len(entries) == len(set(entries)), "two deployments of one flow share a name"
    on_box = {d["entrypoint"].split(":")[1] for d in deployments() if d["work_pool"]["name"] == "gpu-box"}
    assert {f.fn.__name__ for f in (*FLOWS, feedback)} <= on_box
    assert {d["work_pool"]["name"] for d in deployments()} == set(pool_commands())


def test_deployment_check_catches_typos_missing_flows_bad_parameters_and_pull_steps(in_repo: Path) -> None:
    pools = pools_by_name()
    good = deployments()[0]
    cases = {
        "work_poll": {**good, "work_poll": good["work_pool"]},
        "is no flow": {**good, "entrypoint": "flows/pipeline.py:no_such_flow"},
        "not a parameter": {**good, "parameters": {"projekt": "."}},
        "parameters": {**good, "parameters": {"project": 3}},
        "work pool 'gpu-cluster'": {**good, "work_pool": {"name": "gpu-cluster"}},
        "pull step": {**good, "pull": [{"prefect.deployments.steps.set_working_directory": {"dir": "/x"}}]},
    }
    for expected, deployment in cases.items():
        problems = deployment_problems(deployment, pools)
        assert any(expected in p for p in problems), (expected, problems)
    docker = next(d for d in deployments() if d["work_pool"]["name"] == "gpu-docker")
    bad_variables = {**docker, "work_pool": {**docker["work_pool"], "job_variables": {"gpus": "two"}}}
    assert any("job_variables" in p for p in deployment_problems(bad_variables, pools))


def test_deploy_time_variables_are_documented() -> None:
    text = json.dumps(read_yaml(PREFECT_YAML))  # the values, not the comments
    used = set(re.findall(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", text))
    assert used, "prefect.yaml takes the checkout and repository from the environment"
    readme = INFRA_README.read_text(encoding="utf-8")
    assert {name for name in used if name not in readme} == set()


@pytest.mark.slow
def test_documented_commands_create_the_pools_and_deploy_every_flow(tmp_path: Path) -> None:
    """`infra/work-pools/create.sh` and `prefect deploy --all` against a real (local) Prefect server."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "LOGITFLOW_PROJECT_DIR": "/srv/logitflow",
        "LOGITFLOW_GIT_REPO": "https://git.example.invalid/team/logitflow.git",
        "LOGITFLOW_GIT_BRANCH": "main",
    }
    env["PREFECT"] = str(bin_dir / "prefect")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        created = subprocess.run(["bash", str(CREATE_POOLS)], env=env, capture_output=True, text=True, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = subprocess.run(
            [str(bin_dir / "prefect"), "--no-prompt", "deploy", "--all"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        listed = subprocess.run(
            [str(bin_dir / "python"), "-c", _READ_BACK], env=env, capture_output=True, text=True, check=False
        )
        assert listed.returncode == 0, listed.stderr
        found = json.loads(listed.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    expected = {f"{d['entrypoint']}|{d['name']}" for d in deployments()}
    assert len(found["deployments"]) == len(expected)
    assert found["pools"] == {"gpu-box": ["process", 1], "gpu-docker": ["docker", None]}
    box = found["deployments"]["pipeline/gpu-box"]
    assert box["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/srv/logitflow"
    assert box["parameters"] == {"project": "."} and "params" in box["parameter_names"]
    clone = found["deployments"]["pipeline/gpu-docker"]["pull_steps"][0]["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == env["LOGITFLOW_GIT_REPO"]


_READ_BACK = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        pools = {p.name: [p.type, p.concurrency_limit] for p in await client.read_work_pools()}
        flows = {f.id: f.name for f in await client.read_flows()}
        found = {}
        for d in await client.read_deployments():
            found[f"{flows[d.flow_id]}/{d.name}"] = {
                "pull_steps": d.pull_steps,
                "parameters": d.parameters,
                "parameter_names": sorted(d.parameter_openapi_schema.get("properties", {})),
                "pool": d.work_pool_name,
            }
        print(json.dumps({"pools": pools, "deployments": found}))

asyncio.run(main())
"""


# ---------------------------------------------------------------- Dockerfiles

KNOWN_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
    "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER",
}  # fmt: skip


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    return [(i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"]


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(value.split("=", 1) for kind, value in instructions if kind == "ARG" and "=" in value)


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m[1], m[0]), text)


def dockerfile_problems(text: str) -> list[str]:
    """Structure every image shares: FROM first (ARGs may come before it), known instructions only,
    a non-root USER at the end, exec-form ENTRYPOINT/CMD."""
    instructions = dockerfile_instructions(text)
    problems = [f"unknown instruction {kind}" for kind, _ in instructions if kind not in KNOWN_INSTRUCTIONS]
    kinds = [kind for kind, _ in instructions]
    if "FROM" not in kinds:
        return [*problems, "no FROM"]
    if set(kinds[: kinds.index("FROM")]) - {"ARG"}:
        problems.append("instructions other than ARG before the first FROM")
    users = [value.split(":")[0].strip() for kind, value in instructions[kinds.index("FROM") :] if kind == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("the image runs as root (no final non-root USER)")
    for kind, value in instructions:
        if kind in ("ENTRYPOINT", "CMD") and not value.lstrip().startswith("["):
            problems.append(f"{kind} in shell form (signals do not reach the process)")
    return problems


def gpu_image_problems(text: str) -> list[str]:
    """The GPU worker image: a CUDA base, CUDA torch, the package with extras that exist, git and DVC."""
    instructions = dockerfile_instructions(text)
    args = _arg_defaults(instructions)
    base = next((_expand(value, args) for kind, value in instructions if kind == "FROM"), "")
    runs = " ".join(_expand(value, args) for kind, value in instructions if kind == "RUN")
    copies = " ".join(value for kind, value in instructions if kind in ("COPY", "ADD"))
    problems = []
    if not re.match(r"(docker\.io/)?(nvidia/cuda|pytorch/pytorch|nvcr\.io/nvidia/)", base):
        problems.append(f"base image {base!r} is not a CUDA image")
    if not re.search(r"pip install [^&]*torch[^&]*--(extra-)?index-url \S*download\.pytorch\.org/whl/cu\d+", runs):
        problems.append("torch is not installed from a CUDA wheel index")
    package = re.search(r"pip install[^&]*?[\"' ]\.(\[([^\]]*)\])?[\"' ]", runs + " ")
    if not package:
        problems.append("the package itself (`pip install .[extras]`) is not installed")
    if not ("pyproject.toml" in copies and re.search(r"\bsrc\b", copies)):
        problems.append("pyproject.toml and src/ are not copied into the image")
    if not re.search(r"apt-get install[^&]*\bgit\b", runs):
        problems.append("git is not installed (DVC and the clone pull step need it)")
    if not re.search(r"pip install[^&]*dvc\[s3\]", runs):
        problems.append("DVC with its S3 remote (dvc[s3]) is not installed")
    return problems


def declared_extras() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"])


def _check_extras(named: set[str]) -> None:
    missing = named - declared_extras()
    if missing and missing <= PENDING_EXTRAS:
        pytest.skip(f"extra(s) {sorted(missing)} not in pyproject.toml yet (added by the Ray change of issue #10)")
    assert missing == set(), f"extras {sorted(missing)} are not defined in pyproject.toml: pip would ignore them"


def test_gpu_worker_dockerfile_parses_and_installs_the_package() -> None:
    text = GPU_DOCKERFILE.read_text(encoding="utf-8")
    assert dockerfile_problems(text) == []
    assert gpu_image_problems(text) == []


def test_gpu_worker_dockerfile_names_only_real_extras() -> None:
    instructions = dockerfile_instructions(GPU_DOCKERFILE.read_text(encoding="utf-8"))
    runs = " ".join(_expand(value, _arg_defaults(instructions)) for kind, value in instructions if kind == "RUN")
    named = {e.strip() for m in re.finditer(r"[\"' ]\.\[([^\]]*)\]", runs) for e in m[1].split(",")}
    assert named
    _check_extras(named)


def test_mlflow_server_dockerfile_parses() -> None:
    text = MLFLOW_DOCKERFILE.read_text(encoding="utf-8")
    assert dockerfile_problems(text) == []
    assert re.search(r"pip install[^&]*psycopg2[^&]*boto3", text), "the server needs the PostgreSQL and S3 clients"


def test_build_context_of_the_gpu_image_sends_only_what_it_copies() -> None:
    patterns = [
        line.strip()
        for line in (INFRA / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything (.venv, data, models) is excluded first"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    instructions = dockerfile_instructions(GPU_DOCKERFILE.read_text(encoding="utf-8"))
    copied = {src.rstrip("/") for kind, value in instructions if kind == "COPY" for src in value.split()[:-1]}
    assert copied and copied <= included


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("RUN echo hi\nFROM python:3.11-slim\nUSER app\n", "before the first FROM"),
        ("FROM python:3.11-slim\nRUNN echo hi\nUSER app\n", "unknown instruction RUNN"),
        ("FROM python:3.11-slim\nRUN echo hi\n", "runs as root"),
        ("FROM python:3.11-slim\nUSER app\nUSER root\n", "runs as root"),
        ("FROM python:3.11-slim\nUSER app\nCMD python -m x\n", "shell form"),
        ("USER app\n", "no FROM"),
    ],
)
def test_dockerfile_check_catches_broken_files(text: str, expected: str) -> None:
    assert any(expected in p for p in dockerfile_problems(text)), dockerfile_problems(text)


def test_gpu_image_check_catches_a_cpu_image_without_the_package() -> None:
    text = "FROM python:3.11-slim\nCOPY README.md ./\nRUN pip install torch numpy\nUSER app\n"
    problems = " | ".join(gpu_image_problems(text))
    for expected in ("not a CUDA image", "CUDA wheel index", "package itself", "src/", "git", "dvc[s3]"):
        assert expected in problems, problems


def test_extras_check_catches_an_unknown_extra() -> None:
    with pytest.raises(AssertionError, match="no-such-extra"):
        _check_extras({"dev", "no-such-extra"})


# ---------------------------------------------------------------- Ray cluster


def ray_validate(config: dict[str, Any]) -> None:
    """What `ray up` checks before it launches anything: defaults filled in, then Ray's JSON schema."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (the optional `ray` extra): the cluster config is not validated here")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_ray_cluster_config_validates() -> None:
    config = read_yaml(RAY_CLUSTER)
    ray_validate(config)
    gpu_types = [t for t in config["available_node_types"] if t.startswith("gpu")]
    assert gpu_types and config["head_node_type"] == "head"


def test_ray_cluster_check_catches_a_misspelt_key() -> None:
    config = read_yaml(RAY_CLUSTER)
    config["available_node_types"]["gpu-train"]["max_wrkers"] = 1
    with pytest.raises(Exception, match="max_wrkers"):
        ray_validate(config)


def test_ray_cluster_nodes_install_the_package_with_real_extras() -> None:
    config = read_yaml(RAY_CLUSTER)
    commands = " ".join(config["setup_commands"])
    install = re.search(r"pip install[^;&]*-e \"\$HOME/logitflow\[([^\]]*)\]\"", commands)
    assert install, "every node installs the synced checkout"
    assert "~/logitflow" in config["file_mounts"] and config["file_mounts"]["~/logitflow"] == "."
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    _check_extras({e.strip() for e in install[1].split(",")})


# ---------------------------------------------------------------- params/cluster.yaml


def test_cluster_overlay_validates_and_points_at_the_team_servers() -> None:
    from logitflow.config import load_params

    params = load_params(REPO / "params.yaml", overlays=[REPO / "params" / "cluster.yaml"])
    assert params.compute.device == "cuda"
    assert params.compute.ray == "auto" and params.compute.ray_task.num_gpus >= 1
    assert params.compute.distributed == "fsdp"
    tracking = urlsplit(params.tracking.uri or "")
    assert _is_loopback(tracking.hostname)
    assert f"127.0.0.1:{tracking.port}:5000" in compose_document()["services"]["mlflow"]["ports"]


def test_cluster_overlay_check_catches_a_bad_value(tmp_path: Path) -> None:
    from logitflow.config import load_params
    from logitflow.errors import ParamsError

    overlay = read_yaml(REPO / "params" / "cluster.yaml")
    overlay["compute"]["distributed"] = "zero3"
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(overlay))
    with pytest.raises(ParamsError, match=r"compute\.distributed"):
        load_params(REPO / "params.yaml", overlays=[tmp_path / "cluster.yaml"])
