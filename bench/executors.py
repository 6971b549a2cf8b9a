"""Where a grid's tasks run: a local process pool, a Slurm job array (submitit) or a Ray cluster.

Every executor takes a batch of calls ``fn(*args)``, each with the resources it asks for, and hands
back one ``concurrent.futures.Future`` per call, so the grid's scheduler (``bench/grid.py``) is the
same loop whatever runs the work. What stays in the scheduler, identical for every backend: which
task is ready, how many run at once, the retry policy (no backend retries on its own: Ray's retries
are turned off, submitit and process pools have none), and the records store, which only the driver
writes. Workers read and write the artifact store (``bench/store.py``) and return results.

- ``local``: a ``ProcessPoolExecutor`` (spawn) on this machine; nothing to install. A worker killed
  by the OS breaks the pool; the next submission starts a new one.
- ``slurm``: submitit (facebookincubator/submitit, ``submitit/auto/auto.py``, ``slurm/slurm.py``):
  the calls submitted together go out as one job array per distinct resource request, with
  ``cpus_per_task``, ``gpus_per_node``, ``mem_gb``, ``timeout_min`` and the partition from the grid
  file's ``resources:``. ``cluster="local"`` or ``"debug"`` is submitit's own stand-in for Slurm on one
  machine (every job at once, the first GPU for all): for trying the path, not for scheduling.
- ``ray``: a ``ray.remote`` task per call with ``num_cpus`` / ``num_gpus`` (``max_retries=0``). Without
  an address it starts a private one-machine Ray bound to 127.0.0.1 (FULL-SCALE.md "Traps": Ray binds
  the machine's outside address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; usage stats are turned off).
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.errors import BenchError

EXECUTORS = ("local", "slurm", "ray")
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")


@dataclass(frozen=True)
class Resources:
    """What one task asks of the machine that runs it (a grid file's ``resources:``). ``cpus`` is also
    the task's torch thread count; ``mem_gb`` None leaves memory to the backend's default."""

    cpus: int = 1
    gpus: int = 0
    mem_gb: float | None = None
    time_min: int = 120
    partition: str | None = None
    slurm: tuple = field(default=())          # extra sbatch options, (key, value) pairs

    def merge(self, other: "Resources") -> "Resources":
        """The request of a task running both stages one after the other: the larger cpus / gpus /
        memory, the summed time."""
        mem = [m for m in (self.mem_gb, other.mem_gb) if m is not None]
        return Resources(cpus=max(self.cpus, other.cpus), gpus=max(self.gpus, other.gpus),
                         mem_gb=max(mem) if mem else None, time_min=self.time_min + other.time_min,
                         partition=self.partition or other.partition, slurm=self.slurm or other.slurm)


def parse_resources(raw: Any, where: str, base: Resources | None = None) -> Resources:
    """A ``resources:`` mapping (cpus, gpus, mem_gb, time_min, partition, slurm) over ``base``."""
    base = base or Resources()
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise BenchError(f"{where} must be a mapping of cpus, gpus, mem_gb, time_min, partition, slurm")
    valid = {"cpus", "gpus", "mem_gb", "time_min", "partition", "slurm"}
    unknown = set(raw) - valid
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {sorted(unknown)} (valid: {', '.join(sorted(valid))})")
    out = asdict(base)
    for k in ("cpus", "time_min"):
        if k in raw:
            if isinstance(raw[k], bool) or not isinstance(raw[k], int) or raw[k] < 1:
                raise BenchError(f"{where}.{k} must be an integer >= 1, got {raw[k]!r}")
            out[k] = raw[k]
    if "gpus" in raw:
        if isinstance(raw["gpus"], bool) or not isinstance(raw["gpus"], int) or raw["gpus"] < 0:
            raise BenchError(f"{where}.gpus must be an integer >= 0, got {raw['gpus']!r}")
        out["gpus"] = raw["gpus"]
    if "mem_gb" in raw:
        if isinstance(raw["mem_gb"], bool) or not isinstance(raw["mem_gb"], (int, float)) or raw["mem_gb"] <= 0:
            raise BenchError(f"{where}.mem_gb must be a number > 0, got {raw['mem_gb']!r}")
        out["mem_gb"] = float(raw["mem_gb"])
    if "partition" in raw:
        out["partition"] = str(raw["partition"])
    if "slurm" in raw:
        if not isinstance(raw["slurm"], dict):
            raise BenchError(f"{where}.slurm must be a mapping of extra sbatch options (e.g. account: abc)")
        out["slurm"] = tuple(sorted((str(k), v) for k, v in raw["slurm"].items()))
    return Resources(**out)


Call = tuple[tuple, Resources]       # a call's arguments and what it asks for


class LocalExecutor:
    """A spawn process pool of ``workers`` processes on this machine."""

    name = "local"

    def __init__(self, workers: int) -> None:
        import multiprocessing

        self.workers, self._ctx = workers, multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(workers, mp_context=self._ctx)

    def submit_many(self, fn: Callable, calls: list[Call]) -> list[Future]:
        out = []
        for args, _ in calls:
            try:
                out.append(self._pool.submit(fn, *args))
            except BrokenProcessPool:          # a worker died (OOM kill, SIGKILL): start a fresh pool
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = ProcessPoolExecutor(self.workers, mp_context=self._ctx)
                out.append(self._pool.submit(fn, *args))
        return out

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


class SubmititExecutor:
    """Slurm through submitit: the calls of one submission go out as one job array per resource
    request; a thread polls the jobs and completes their futures."""

    name = "slurm"

    def __init__(self, folder: Path, workers: int, cluster: str = "slurm", job_name: str = "bench-grid",
                 poll_s: float | None = None) -> None:
        check_executor("slurm", cluster=cluster)
        import submitit

        self.cluster, self.workers, self.job_name = cluster, workers, job_name
        # a fresh submitit executor per resource request: update_parameters merges into the old ones,
        # so one shared executor would hand a GPU request's --gres / --mem to a later CPU-only array
        self._new = lambda: submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self._new()                                     # fails now (no srun...) rather than mid-grid
        self._poll_s = poll_s if poll_s is not None else (10.0 if cluster == "slurm" else 0.5)
        self._pending: list[tuple[Any, Future]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="submitit-watch", daemon=True)
        self._thread.start()
        self.job_ids: list[str] = []

    def _params(self, r: Resources) -> dict:
        p = {"timeout_min": r.time_min, "cpus_per_task": r.cpus, "tasks_per_node": 1, "nodes": 1,
             "name": self.job_name, "slurm_array_parallelism": self.workers}
        if r.gpus:                               # no --gpus-per-node=0: some clusters refuse it
            p["gpus_per_node"] = r.gpus
        if r.mem_gb is not None:
            p["mem_gb"] = r.mem_gb
        if r.partition:
            p["slurm_partition"] = r.partition
        if r.slurm:
            p["slurm_additional_parameters"] = dict(r.slurm)
        return p

    def submit_many(self, fn: Callable, calls: list[Call]) -> list[Future]:
        futures: list[Future | None] = [None] * len(calls)
        by_request: dict[Resources, list[int]] = {}
        for i, (_, r) in enumerate(calls):
            by_request.setdefault(r, []).append(i)
        for r, idx in by_request.items():
            ex = self._new()
            ex.update_parameters(**self._params(r))
            with ex.batch():                            # one sbatch --array for these calls
                jobs = [ex.submit(fn, *calls[i][0]) for i in idx]
            for i, job in zip(idx, jobs):
                fut: Future = Future()
                fut.set_running_or_notify_cancel()
                futures[i] = fut
                self.job_ids.append(str(job.job_id))
                with self._lock:
                    self._pending.append((job, fut))
        return futures  # type: ignore[return-value]

    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending = list(self._pending)
            for job, fut in pending:
                if self.cluster != "debug" and not job.done():
                    continue
                try:                 # a failed or killed job raises here (submitit's FailedJobError etc.)
                    fut.set_result(job.result())
                except BaseException as e:  # noqa: BLE001 - the scheduler decides what a failure means
                    fut.set_exception(e)
                with self._lock:
                    self._pending.remove((job, fut))
            self._stop.wait(self._poll_s)

    def close(self, cancel: bool = False) -> None:
        self._stop.set()
        if cancel:
            with self._lock:
                for job, fut in self._pending:
                    try:
                        job.cancel(check=False)
                    except Exception:      # noqa: BLE001 - best effort on the way out
                        pass
                    fut.cancel()
        self._thread.join(timeout=5)


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",   # else Ray binds the machine's outside address
                "RAY_USAGE_STATS_ENABLED": "0"}             # never report usage to anyone


class RayExecutor:
    """Ray tasks; without ``address`` a private single-machine Ray on 127.0.0.1 with
    ``workers * threads`` CPUs, shut down on close."""

    name = "ray"

    def __init__(self, workers: int, threads: int, address: str | None = None) -> None:
        imported_before = "ray" in sys.modules
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
        check_executor("ray")
        import ray
        from ray._private import ray_constants

        self._ray = ray
        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # Ray reads the variable once, when it is imported; imported before it was set, a private
                # Ray would listen on every address of the machine: refuse rather than start it.
                if getattr(ray_constants, "ENABLE_RAY_CLUSTER", True) or \
                        (imported_before and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0"):
                    raise BenchError("--executor ray: ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was "
                                     "set, so a private Ray would listen on outside addresses; set it in the "
                                     "environment (or give --ray-address)")
                # the workers import this checkout, whatever their working directory
                root = str(Path(__file__).resolve().parent.parent)
                os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
                ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=workers * threads,
                         include_dashboard=False, log_to_driver=False)
                self.started = True
        self._remote: dict[Callable, Any] = {}

    def submit_many(self, fn: Callable, calls: list[Call]) -> list[Future]:
        remote = self._remote.setdefault(fn, self._ray.remote(max_retries=0)(fn))   # retries are ours
        out = []
        for args, r in calls:
            opts: dict = {"num_cpus": r.cpus, "num_gpus": r.gpus}
            if r.mem_gb is not None and not self.started:
                opts["memory"] = int(r.mem_gb * 2**30)
            out.append(remote.options(**opts).remote(*args).future())
        return out

    def close(self, cancel: bool = False) -> None:
        if self.started:
            self._ray.shutdown()


def check_executor(name: str, cluster: str = "slurm", **_: Any) -> None:
    """Fail in one line, before any work, when an executor cannot start here."""
    if name not in EXECUTORS:
        raise BenchError(f"unknown executor {name!r} (valid: {', '.join(EXECUTORS)})")
    if name == "slurm":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise BenchError("--executor slurm needs submitit: pip install 'vl-backdoor-bench[slurm]'") from None
        if cluster not in SUBMITIT_CLUSTERS:
            raise BenchError(f"unknown submitit cluster {cluster!r} (valid: {', '.join(SUBMITIT_CLUSTERS)})")
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise BenchError("--executor slurm: no sbatch on PATH (run the driver on a Slurm login node; "
                             "--cluster local tries the same path on this machine)")
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BenchError("--executor ray needs ray: pip install 'vl-backdoor-bench[ray]'") from None


def make_executor(name: str, workers: int, threads: int, *, folder: Path | None = None, cluster: str = "slurm",
                  address: str | None = None, job_name: str = "bench-grid"):
    """The executor called ``name`` (``local``, ``slurm`` or ``ray``)."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "slurm":
        return SubmititExecutor(Path(folder or ".submitit"), workers, cluster=cluster, job_name=job_name)
    if name == "ray":
        return RayExecutor(workers, threads, address=address)
    raise BenchError(f"unknown executor {name!r} (valid: {', '.join(EXECUTORS)})")

