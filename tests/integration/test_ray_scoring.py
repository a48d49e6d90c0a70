"""Scoring shards on Ray (compute.ray): the same bytes as the in-process pass, a fast clear error for
an unreachable cluster, lost workers retried, resume across both paths.

One local Ray instance (2 CPUs) serves the whole module; the stages use it as the session the
process already holds. Each Ray pass costs ~8 s here, mostly the workers importing torch.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]'; `make setup` installs it)")

from logitflow.cache import ray_shards  # noqa: E402
from logitflow.cache.shards import CacheError  # noqa: E402
from logitflow.config import Params, load_params  # noqa: E402
from logitflow.errors import ParamsError, RayUnavailableError  # noqa: E402
from logitflow.stages import STAGES, cache_teacher, score_prefs  # noqa: E402
from tests.conftest import tiny_params  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402

STAGE_DIRS = {"rskd": "teacher_rskd", "topk": "teacher_topk", "score": "ref_scores"}
# Workers cannot import this test module: CrashingTeacher travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def worker_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker_models")


@pytest.fixture(scope="module")
def ray_instance(worker_models: Path) -> Any:
    # Workers inherit the environment of ray.init: their model copies go to this module's temp dir.
    saved = os.environ.get(ray_shards.WORKER_MODELS_ENV)
    os.environ[ray_shards.WORKER_MODELS_ENV] = str(worker_models)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop(ray_shards.WORKER_MODELS_ENV)
    else:
        os.environ[ray_shards.WORKER_MODELS_ENV] = saved


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared project whose in-process caches (cache/) are the reference."""
    root = tmp_path_factory.mktemp("ray_project")
    data = tiny_params(root)
    data["score_prefs"]["pairs_per_shard"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = load_params(root / "params.yaml")
    STAGES["prepare"](params, root)
    STAGES["models"](params, root)
    for mode in ("rskd", "topk"):
        cache_teacher.run(params, root, mode)
    score_prefs.run(params, root)
    return root


def _params(root: Path, name: str, **updates: Any) -> Params:
    """The project's params with dotted `updates`, written to params-<name>.yaml."""
    data = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in updates.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = root / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_params(path)


def _run(params: Params, root: Path, which: str) -> dict:
    return score_prefs.run(params, root) if which == "score" else cache_teacher.run(params, root, which)


def _assert_identical(root: Path, caches: str, which: str) -> None:
    reference, produced = root / "cache" / STAGE_DIRS[which], root / caches / STAGE_DIRS[which]
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in produced.iterdir()) == names, "no tmp or extra files, no missing shard"
    assert "manifest.json" in names and len(names) > 3
    for name in names:
        assert (produced / name).read_bytes() == (reference / name).read_bytes(), f"{which}: {name} differs"


@pytest.mark.parametrize("which", ["rskd", "topk", "score"])
def test_ray_shards_equal_the_in_process_pass(
    ray_instance: Any, project: Path, worker_models: Path, which: str
) -> None:
    params = _params(project, which, **{"compute.ray": "local", "paths.caches": f"cache_ray_{which}"})
    _run(params, project, which)
    _assert_identical(project, f"cache_ray_{which}", which)
    # The workers loaded the model from their node's copy (shipped through the object store).
    copies = sorted(worker_models.iterdir())
    assert copies and all(len(c.name) == 64 and (c / "config.json").is_file() for c in copies), copies


def test_ray_resumes_shards_of_the_in_process_pass(ray_instance: Any, project: Path) -> None:
    """Same key either way: Ray reuses the complete in-process shards and computes only the missing."""
    directory = project / "cache_resume" / STAGE_DIRS["rskd"]
    shutil.copytree(project / "cache" / STAGE_DIRS["rskd"], directory)
    (directory / "manifest.json").unlink()
    for index in (2, 7):
        (directory / f"shard-{index:05d}.safetensors").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    metrics = _run(
        _params(project, "resume", **{"compute.ray": "local", "paths.caches": "cache_resume"}), project, "rskd"
    )
    assert {name: (directory / name).stat().st_mtime_ns for name in kept} == kept, "complete shards reused"
    assert metrics["tokens_per_second"] > 0
    _assert_identical(project, "cache_resume", "rskd")


@pytest.mark.parametrize("which", ["rskd", "score"])
@pytest.mark.parametrize("form", ["ray://127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_unreachable_cluster_fails_fast_and_writes_nothing(
    project: Path, monkeypatch: pytest.MonkeyPatch, which: str, form: str
) -> None:
    address = form.format(port=free_port())

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the Ray address was checked")

    for module in (cache_teacher, score_prefs):
        monkeypatch.setattr(module, "load_materialized", no_work)
    monkeypatch.setattr(ray_shards, "load_driver_side", no_work)
    params = _params(project, "unreachable", **{"compute.ray": address, "paths.caches": "cache_unreachable"})
    reports = sorted((project / "reports").rglob("*"))
    with pytest.raises(RayUnavailableError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:\d+") as caught:
        _run(params, project, which)
    message = str(caught.value)
    assert address in message and "ray start --head" in message and "compute.ray: local" in message
    assert isinstance(caught.value, ParamsError)
    assert not (project / "cache_unreachable").exists()
    assert sorted((project / "reports").rglob("*")) == reports


def test_not_an_address_is_a_params_error(project: Path) -> None:
    params = _params(project, "bad", **{"compute.ray": "head-node", "paths.caches": "cache_bad"})
    with pytest.raises(ParamsError, match="compute.ray = 'head-node' is not a Ray address"):
        _run(params, project, "rskd")


@dataclass(frozen=True)
class CrashingTeacher(ray_shards.TeacherWorker):
    """Kills its worker process (as a lost node or the OOM killer would) when it reaches `shard`:
    once (while `marker` does not exist) or on every attempt; each crash appends a line to `marker`."""

    marker: str = ""
    shard: int = 0
    always: bool = False

    def load(self, local_dir: Path) -> Any:
        compute = super().load(local_dir)

        def run(index: int, inputs: Any) -> Any:
            if index == self.shard and (self.always or not os.path.exists(self.marker)):
                with open(self.marker, "a") as handle:
                    handle.write(f"{os.getpid()}\n")
                os._exit(1)
            return compute(index, inputs)

        return run


def _crash(monkeypatch: pytest.MonkeyPatch, marker: Path, shard: int, *, always: bool = False) -> None:
    crashing = functools.partial(CrashingTeacher, marker=str(marker), shard=shard, always=always)
    monkeypatch.setattr(ray_shards, "TeacherWorker", crashing)


def test_a_shard_whose_worker_dies_is_computed_again(
    ray_instance: Any, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "crashed"
    _crash(monkeypatch, marker, shard=3)
    _run(_params(project, "crash", **{"compute.ray": "local", "paths.caches": "cache_crash"}), project, "rskd")
    assert len(marker.read_text().splitlines()) == 1, "the worker died once, mid-shard"
    _assert_identical(project, "cache_crash", "rskd")


def test_exhausted_retries_name_the_shard_and_the_rerun_resumes(
    ray_instance: Any, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "crashed"
    _crash(monkeypatch, marker, shard=5, always=True)
    updates = {"compute.ray": "local", "compute.ray_task.max_retries": 1, "paths.caches": "cache_lost"}
    with pytest.raises(
        CacheError, match=r"shard 5: its Ray worker was lost 2 times \(compute.ray_task.max_retries = 1\)"
    ):
        _run(_params(project, "lost", **updates), project, "rskd")
    assert len(marker.read_text().splitlines()) == 2, "one try and one retry"
    directory = project / "cache_lost" / STAGE_DIRS["rskd"]
    names = {p.name for p in directory.iterdir()}
    assert "manifest.json" not in names and "shard-00005.safetensors" not in names
    assert not [name for name in names if name.endswith(".tmp")], "no partial shard"

    monkeypatch.undo()
    kept = {name: (directory / name).stat().st_mtime_ns for name in names}
    _run(_params(project, "lost", **updates), project, "rskd")
    assert {name: (directory / name).stat().st_mtime_ns for name in kept} == kept
    _assert_identical(project, "cache_lost", "rskd")


def test_a_worker_error_is_raised_as_is_and_not_retried(
    ray_instance: Any, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose model copy holds other weights than the driver's model card refuses to
    compute; the stage fails with that error (not a Ray one, not retried)."""
    real = ray_shards.ScoreWorker
    monkeypatch.setattr(ray_shards, "ScoreWorker", lambda path, _, *rest: real(path, "0" * 64, *rest))
    params = _params(project, "mismatch", **{"compute.ray": "local", "paths.caches": "cache_mismatch"})
    with pytest.raises(
        CacheError, match=r"models/policy \(copied to Ray worker .*\): weights differ from the model card"
    ):
        _run(params, project, "score")
    assert not (project / "cache_mismatch" / STAGE_DIRS["score"] / "manifest.json").exists()
