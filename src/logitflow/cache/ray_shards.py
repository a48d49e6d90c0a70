"""Scoring shards on Ray (`compute.ray`): the shards of `cache_teacher` and `score_prefs` run as
Ray actors; this process still writes every shard file and the manifest (`shards.run_sharded`).

Where the work runs (`compute.ray`):
- null: in this process (no Ray; `ray` is an optional extra: `pip install -e '.[ray]'`);
- `local`: a local Ray instance started for the stage and stopped after it (all local CPUs/GPUs);
- `auto`: the cluster `ray start` made on this machine (or `RAY_ADDRESS`); `ray://host:10001`
  joins through Ray Client; `host:6379` joins a cluster's GCS directly.
If this process already holds a Ray session (a caller ran `ray.init`: a test, a notebook, a Ray
job's driver), the stage uses it and leaves it running. The address is checked (TCP, a few
seconds) when the stage starts, before it loads or computes anything: an unreachable one is a
`RayUnavailableError` naming it.

Workers: one actor per slot the cluster has for `compute.ray_task` (num_cpus, num_gpus each: on a
GPU cluster num_gpus = 1 gives one shard at a time per GPU), at most one per shard to compute.
Each actor loads the model once. The weights travel through Ray's object store, not a shared
file system: the scoring nodes of a cluster made with `ray up` (infra/ray/cluster.yaml) get the
git checkout, not the DVC outputs under `paths.models`. The driver reads the files of the
directory the `models` stage materialised (bytes only: it never builds the model, and it does so
only when some shard is missing), puts each in the object store once, and every node writes one
local copy under `$LOGITFLOW_WORKER_MODELS` (default `<tmp>/logitflow-models/`), named by the
files' content digest, that its workers and later passes reuse. Each worker then loads it exactly
as the in-process path loads the original and refuses weights whose hash differs from the model
card the driver read. Every node needs this package installed (the same image or venv).

Determinism: a worker runs the same shard function as the in-process path with the same inputs
(the shard's slice of the data, at its place in the full list), the same per-shard seed and
batching, the same dtype, and torch threads pinned to `compute.threads`, so each shard has the
same bytes wherever it ran and the cache key does not depend on where shards ran (it records the
workers' device type). With `compute.threads: null` each worker uses Ray's per-task CPU share.

Failures: a worker returns the shard's tensors and the driver writes the file atomically, so a
worker lost mid-shard leaves nothing behind. The shard is then recomputed, at most
`compute.ray_task.max_retries` times (each actor restarts as often), then a `CacheError` names
it. An exception raised by the computation itself (weights that do not match the card, a bug)
is not retried: it is raised here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logitflow.cache.format import encode_shard
from logitflow.cache.ref_scores import ScoreJob, compute_score_shard
from logitflow.cache.shards import CacheError, ShardResult
from logitflow.cache.teacher_pass import CacheJob, compute_shard
from logitflow.compute import apply_threads, autocast, inference_dtype, resolve_device
from logitflow.config import ComputeSection, ModelSpec, RayTaskSettings
from logitflow.errors import LogitflowError, ModelError, ParamsError, RayUnavailableError

log = logging.getLogger(__name__)

WORKER_MODELS_ENV = "LOGITFLOW_WORKER_MODELS"
HINT = "start the head with `ray start --head` (then compute.ray: auto) or set compute.ray: local"
CONNECT_TIMEOUT_S = 3.0


# ---------------------------------------------------------------- connecting


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            "compute.ray is set but Ray is not installed: pip install -e '.[ray]' (or set compute.ray: null)"
        ) from None
    return ray


def worker_device(compute: ComputeSection) -> torch.device:
    """The device Ray workers compute on: Ray hides GPUs from actors that reserve none, so `auto`
    means cuda exactly when `compute.ray_task.num_gpus` > 0."""
    if compute.device == "cuda" and compute.ray_task.num_gpus == 0:
        raise ParamsError(
            "compute.device = 'cuda' with compute.ray needs compute.ray_task.num_gpus > 0 "
            "(Ray hides GPUs from workers that reserve none)"
        )
    if compute.device == "auto":
        return torch.device("cuda" if compute.ray_task.num_gpus > 0 else "cpu")
    return torch.device(compute.device)


def _host_port(address: str) -> tuple[str, int] | None:
    client = address.startswith("ray://")
    address = address.removeprefix("ray://")
    host, _, port = address.rpartition(":")
    if client and (not port.isdigit() or address.endswith("]")):
        host, port = address, "10001"  # Ray Client's default port
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _resolve(address: str) -> str:
    """`address` as ray.init takes it; `auto` resolved the way Ray resolves it (RAY_ADDRESS, then
    the cluster `ray start` recorded on this machine), so it can be checked before joining."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    if env:
        return env
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        return canonicalize_bootstrap_address_or_die("auto")
    except ConnectionError:
        raise RayUnavailableError(
            f"compute.ray = 'auto': no running Ray cluster found on this machine; {HINT}"
        ) from None
    except (ImportError, AttributeError):  # a Ray without this helper: ray.init checks it instead
        return address


def _check_reachable(configured: str, address: str) -> None:
    if address in ("local", "auto"):
        return
    target = _host_port(address)
    if target is None:
        raise ParamsError(
            f"compute.ray = {configured!r} is not a Ray address: use null, local, auto, ray://host:port or host:port"
        )
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        resolved = "" if configured == address else f" (resolved to {address})"
        raise RayUnavailableError(
            f"compute.ray = {configured!r}{resolved}: cannot reach a Ray cluster at {target[0]}:{target[1]} "
            f"({err.strerror or err}); {HINT}"
        ) from None


@dataclass(frozen=True)
class RaySession:
    """A joined Ray cluster; `executor(worker)` runs a pass's shards on it."""

    address: str
    task: RayTaskSettings

    def executor(self, worker: ShardWorker) -> RayShardExecutor:
        return RayShardExecutor(worker, self.task, self.address)


@contextlib.contextmanager
def session(compute: ComputeSection) -> Iterator[RaySession | None]:
    """None when `compute.ray` is null (shards run in this process); otherwise join (or start) Ray
    for the duration of the block. Every check happens here, before the stage does any work."""
    if compute.ray is None:
        yield None
        return
    ray = _import_ray()
    worker_device(compute)  # a device the workers cannot have is a params error, not a hang
    address = _resolve(compute.ray)
    _check_reachable(compute.ray, address)
    if compute.threads is None:
        log.warning("compute.threads is null: Ray workers use their per-task CPU share; pin it for identical shards")
    owned = not ray.is_initialized()
    if owned:
        try:
            if address == "local":
                ray.init(address="local", include_dashboard=False)
            else:
                ray.init(address=address)
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            raise RayUnavailableError(
                f"compute.ray = {compute.ray!r}: cannot join Ray at {address}: {err}; {HINT}"
            ) from None
    try:
        yield RaySession(compute.ray, compute.ray_task)
    finally:
        if owned:
            ray.shutdown()


# ---------------------------------------------------------------- what a worker computes


class ShardSlice(Sequence):
    """One shard's items at their place in the full list: `view[a:b]` inside the shard returns
    what `full[a:b]` would, so the shard functions run unchanged on a worker that holds only its
    shard's data."""

    def __init__(self, items: Sequence, offset: int) -> None:
        self._items, self._offset = list(items), offset

    def __len__(self) -> int:
        return self._offset + len(self._items)

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a shard slice supports only contiguous slices")
        start, stop, _ = index.indices(len(self))
        if start < self._offset and stop > start:
            raise IndexError(f"[{start}:{stop}] reaches before this shard's first item ({self._offset})")
        return self._items[start - self._offset : stop - self._offset]


def load_driver_side(model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, config) of a materialised model, without its weights: what the driver needs
    when Ray workers compute the shards."""
    from transformers import AutoConfig

    from logitflow.models import load_tokenizer

    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model directory (no config.json); run `logitflow stage models`")
    return load_tokenizer(ModelSpec(source="local", path=str(model_dir))), AutoConfig.from_pretrained(model_dir)


@dataclass(frozen=True)
class ShippedModel:
    """A materialised model directory in Ray's object store: one object per file."""

    source: str  # the driver's directory, for messages
    digest: str  # sha256 over every file's name and content: names the node-local copy
    files: dict[str, Any]  # relative path -> ObjectRef of its bytes


def ship_model(ray: Any, directory: Path) -> ShippedModel:
    """Put every file of `directory` in the object store (driver side; bytes only, one file at a time)."""
    digest, files = hashlib.sha256(), {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name, data = path.relative_to(directory).as_posix(), path.read_bytes()
        digest.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
        files[name] = ray.put(data)
    return ShippedModel(str(directory), digest.hexdigest(), files)


def node_copy(ray: Any, shipped: ShippedModel) -> Path:
    """This node's copy of a shipped model (worker side). Written to a temp dir and renamed into
    place, so a copy under its digest's name is complete; the first worker of a node writes it."""
    root = Path(os.environ.get(WORKER_MODELS_ENV) or Path(tempfile.gettempdir()) / "logitflow-models")
    target = root / shipped.digest
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{shipped.digest[:12]}.", suffix=".tmp"))
    try:
        for name, ref in shipped.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(ray.get(ref))
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not another worker of this node having written it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_worker_model(
    model_dir: Path, source: str, weights_sha256: str, compute: ComputeSection
) -> tuple[torch.nn.Module, torch.device]:
    """The model in `model_dir` (this node's copy of `source`) on this worker's device and
    inference dtype, loaded as the in-process path loads it and verified against the weights hash
    of the model card the driver read."""
    from logitflow.models import load_model, weights_hash

    apply_threads(compute)
    device = resolve_device(compute)
    expected = worker_device(compute)
    if device.type != expected.type:
        raise ParamsError(f"this Ray worker computes on {device.type}, but the pass is keyed for {expected.type}")
    model = load_model(ModelSpec(source="local", path=str(model_dir)))
    if weights_hash(model) != weights_sha256:
        raise CacheError(
            f"{source} (copied to Ray worker {socket.gethostname()}:{model_dir}): weights differ from the model "
            "card the driver read; rerun `logitflow stage models`"
        )
    return model.to(device=device, dtype=inference_dtype(compute)), device


@dataclass(frozen=True)
class TeacherWorker:
    """Computes teacher-cache shards in a Ray worker. `job` carries no sequences: each call brings
    its shard's. `model_dir` is the driver's materialised teacher (shipped, see `ship_model`)."""

    model_dir: str
    weights_sha256: str
    compute: ComputeSection
    job: CacheJob

    def load(self, local_dir: Path) -> Callable[[int, Any], ShardResult]:
        """Once per actor: load the model from this node's copy; returns the shard function."""
        model, device = load_worker_model(local_dir, self.model_dir, self.weights_sha256, self.compute)

        def compute(index: int, sequences: list[list[int]]) -> ShardResult:
            view = ShardSlice(sequences, index * self.job.sequences_per_shard)
            job = dataclasses.replace(self.job, sequences=view)
            shard = compute_shard(model, job, index, device, lambda: autocast(self.compute, device))
            return encode_shard(shard, mode=job.mode, n_samples=job.rskd.n_samples, vocab_size=job.vocab_size)

        return compute


@dataclass(frozen=True)
class ScoreWorker:
    """Computes reference-score shards in a Ray worker. `job` carries no pairs: each call brings its
    shard's. `model_dir` is the driver's materialised policy (shipped, see `ship_model`)."""

    model_dir: str
    weights_sha256: str
    compute: ComputeSection
    job: ScoreJob

    def load(self, local_dir: Path) -> Callable[[int, Any], ShardResult]:
        """Once per actor: load the model from this node's copy; returns the shard function."""
        model, device = load_worker_model(local_dir, self.model_dir, self.weights_sha256, self.compute)

        def compute(index: int, pairs: list) -> ShardResult:
            job = dataclasses.replace(self.job, pairs=ShardSlice(pairs, index * self.job.pairs_per_shard))
            return compute_score_shard(model, job, index, device, lambda: autocast(self.compute, device))

        return compute


ShardWorker = TeacherWorker | ScoreWorker


def template(job: CacheJob | ScoreJob) -> CacheJob | ScoreJob:
    """The job without its data, to ship to workers once (each shard call brings its own slice)."""
    if isinstance(job, CacheJob):
        return dataclasses.replace(job, sequences=[])
    return dataclasses.replace(job, pairs=[])


# ---------------------------------------------------------------- the actors


class _ShardActor:
    """Holds one loaded model; computes shards one at a time. A failure to load is kept and
    raised by every call, so it reaches the driver as the original error, not as a dead actor."""

    def __init__(self, worker: Any, model: ShippedModel) -> None:
        import ray

        self._compute: Callable[[int, Any], ShardResult] | None = None
        self._error: BaseException | None = None
        try:
            self._compute = worker.load(node_copy(ray, model))
        except Exception as err:  # reported by compute(); an actor that fails in __init__ hides the error type
            self._error = err

    def ready(self) -> None:
        """Answers once the actor is up (after a restart: once it has reloaded the model)."""

    def compute(self, index: int, inputs: Any) -> ShardResult:
        if self._error is not None:
            raise self._error
        assert self._compute is not None
        return self._compute(index, inputs)


def _lost_worker_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Errors that mean the worker (process or node) went away, not that the shard is bad."""
    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "NodeDiedError")
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))


class RayShardExecutor:
    """`shards.ShardExecutor` on Ray actors (see the module docstring)."""

    def __init__(self, worker: Any, task: RayTaskSettings, address: str) -> None:
        self.worker, self.task, self.address = worker, task, address

    def _slots(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        limits = [
            math.floor(resources.get(name, 0.0) / need + 1e-9)
            for name, need in (("CPU", self.task.num_cpus), ("GPU", self.task.num_gpus))
            if need > 0
        ]
        slots = min(limits) if limits else int(resources.get("CPU", 1))
        if slots < 1:
            have = ", ".join(f"{k} = {resources.get(k, 0):g}" for k in ("CPU", "GPU"))
            raise RayUnavailableError(
                f"the Ray cluster ({self.address}) has no room for one shard worker: it has {have}; "
                f"compute.ray_task asks num_cpus = {self.task.num_cpus:g}, num_gpus = {self.task.num_gpus:g}"
            )
        return slots

    def map(self, indices: list[int], inputs: Callable[[int], Any]) -> Generator[tuple[int, ShardResult], None, None]:
        if not indices:
            return
        ray = _import_ray()
        lost_errors = _lost_worker_errors(ray)
        died_for_good = getattr(ray.exceptions, "ActorDiedError", ())
        retries = self.task.max_retries
        actor_class = ray.remote(_ShardActor).options(
            num_cpus=self.task.num_cpus, num_gpus=self.task.num_gpus, max_restarts=retries, max_task_retries=0
        )
        slots = min(len(indices), self._slots(ray))
        model = ship_model(ray, Path(self.worker.model_dir))  # held here until the end: restarts need it
        # The worker holds no data (each call brings its shard's), so it travels inline with each
        # actor's creation and a restarted actor gets it again.
        actors = [actor_class.remote(self.worker, model) for _ in range(slots)]
        todo, attempts = deque(indices), dict.fromkeys(indices, 0)
        running: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor number)
        # A call sent to a restarting actor fails without running: after a loss, the actor gets new
        # work only once a probe (retried by Ray until the restart ends) has come back.
        probing: dict[Any, int] = {}  # ref -> actor number
        alive = set(range(len(actors)))
        last_loss = ""

        def fill() -> None:
            busy = {number for _, number in running.values()} | set(probing.values())
            for number in sorted(alive - busy):
                if todo:
                    index = todo.popleft()
                    running[actors[number].compute.remote(index, inputs(index))] = (index, number)
            if todo and not alive:
                raise CacheError(
                    f"every Ray shard worker died (each restarted {retries} times); last error: {last_loss}"
                )

        try:
            fill()
            while running or probing:
                [ref], _ = ray.wait([*running, *probing], num_returns=1)
                if ref in probing:
                    number = probing.pop(ref)
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayError:  # out of restarts: the other actors take its work
                        alive.discard(number)
                    fill()
                    continue
                index, number = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # raised by the computation itself: not retried
                    if isinstance(getattr(err, "cause", None), LogitflowError):
                        raise err.cause from None
                    raise
                except lost_errors as err:
                    if getattr(err, "actor_init_failed", False):  # e.g. the worker cannot unpickle its job
                        raise CacheError(f"a Ray shard worker could not start: {err}") from None
                    attempts[index] += 1
                    last_loss = str(err).splitlines()[0] if str(err) else type(err).__name__
                    if attempts[index] > retries:
                        raise CacheError(
                            f"shard {index}: its Ray worker was lost {attempts[index]} times "
                            f"(compute.ray_task.max_retries = {retries}); last error: {last_loss}"
                        ) from None
                    log.warning("shard %d: its Ray worker was lost (%s); computing it again", index, last_loss)
                    todo.appendleft(index)
                    if isinstance(err, died_for_good):
                        alive.discard(number)
                    else:
                        probing[actors[number].ready.options(max_task_retries=-1).remote()] = number
                else:
                    yield index, result
                fill()
        finally:
            for actor in actors:  # also stops what they are computing; nothing of it was written
                ray.kill(actor)
