"""Executors: stages grouped into tasks by the cells that need them, the grid file's resources, one
retry policy for every backend, the Slurm path through submitit (its sbatch text with a stand-in
sbatch, and end to end on submitit's local cluster), and Ray on this machine bound to loopback only."""
from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from bench import records
from bench.cache import ArtifactCache
from bench.executors import Resources, SubmititExecutor, parse_resources
from bench.grid import load_grid, plan_tasks, run_grid
from bench.worker import run_task
from core.errors import BenchError
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parent.parent


def grid_file(tmp_path, defenses: str = "[none]", extra: str = "") -> Path:
    p = tmp_path / "g.yaml"
    p.write_text(f"name: t\ngrid: {{defense: {defenses}}}\n" + TINY + extra)
    return p


def test_stages_are_grouped_into_tasks_by_the_cells_that_need_them(tmp_path):
    specs = load_grid(grid_file(tmp_path, "[none, pruning]")).specs()
    tasks, n = plan_tasks(specs, ArtifactCache(tmp_path / "cache"))
    assert n == 8                                               # 6 shared + defended + evaluated_pruning
    shared, *cells = tasks
    assert shared.cells == {0, 1} and shared.record is None and not shared.deps
    assert [label for _, _, label in shared.stages][:1] in (["base"], ["trigger"])
    assert {label for _, _, label in shared.stages} == {"base", "clean", "trigger", "backdoored", "evaluated_clean",
                                                        "evaluated_backdoored"}
    by_cell = {t.record: t for t in cells}
    assert [label for _, _, label in by_cell[0].stages] == [] and by_cell[0].deps == {shared.id}
    assert [label for _, _, label in by_cell[1].stages] == ["defended", "evaluated_pruning"]
    assert by_cell[1].deps == {shared.id}


def test_resources_come_from_the_grid_file_with_defaults_and_per_stage_overrides(tmp_path):
    g = load_grid(grid_file(tmp_path, extra="resources: {cpus: 4, mem_gb: 16, partition: gpu, slurm: {account: abc},"
                                            " stages: {base: {gpus: 1, time_min: 600}}}\n"))
    assert g.resources == Resources(cpus=4, gpus=0, mem_gb=16.0, time_min=120, partition="gpu", slurm=(("account", "abc"),))
    assert g.stage_resources["base"].gpus == 1 and g.stage_resources["base"].cpus == 4
    assert load_grid(grid_file(tmp_path)).resources == Resources()
    tasks, _ = plan_tasks(g.specs(), ArtifactCache(tmp_path / "cache"), g.resources, g.stage_resources)
    assert tasks[0].resources.gpus == 1 and tasks[0].resources.time_min == 600 + 5 * 120   # a task sums its stages
    for bad, needle in [("resources: {cpus: 0}", "resources.cpus must be an integer >= 1"),
                        ("resources: {ram: 3}", "unknown key(s) ['ram']"),
                        ("resources: {stages: {bogus: {}}}", "resources.stages must map stage names")]:
        with pytest.raises(BenchError) as e:
            load_grid(grid_file(tmp_path, extra=bad + "\n"))
        assert needle in str(e.value)
    assert parse_resources({"gpus": 2}, "x", Resources(cpus=3)).cpus == 3


class InProcess:
    """An executor that runs tasks in this process; `fail` decides, per call number, whether the call
    dies the way a lost node does (raises) or returns `reply` instead of running."""

    name = "in-process"

    def __init__(self, fail=lambda n: False, reply=None):
        self.calls, self.fail, self.reply = 0, fail, reply

    def submit_many(self, fn, calls):
        out = []
        for args, _ in calls:
            self.calls += 1
            fut = Future()
            if self.fail(self.calls):
                fut.set_exception(RuntimeError("node lost"))
            else:
                fut.set_result(self.reply if self.reply is not None else fn(*args))
            out.append(fut)
        return out

    def close(self, cancel=False):
        pass


@pytest.fixture
def worker_env(monkeypatch):
    """run_task sets these in the process that runs it; restore them after in-process runs."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_retry_policy_is_the_runners_whatever_the_backend(tmp_path, worker_env):
    specs = load_grid(grid_file(tmp_path)).specs()
    cache, logs = tmp_path / "cache", []
    with pytest.raises(BenchError) as e:                     # no retries: the lost task fails the grid
        run_grid(specs, tmp_path / "a", cache, executor=InProcess(fail=lambda n: True), retries=0, log=logs.append)
    assert "1 task(s) failed" in str(e.value) and "node lost" in str(e.value)
    assert records.load(tmp_path / "a") == []
    flaky = InProcess(fail=lambda n: n == 1)                 # lost once, then runs
    out = run_grid(specs, tmp_path / "a", cache, executor=flaky, retries=2, log=logs.append)
    assert out["recorded"] == 1 and flaky.calls == 2 and any("retry 1/2" in m for m in logs)
    assert sorted(r["row"] for r in records.load(tmp_path / "a")) == ["backdoored", "clean"]
    bad = InProcess(reply={"error": "gen_length 3 cannot hold the longest training response"})
    with pytest.raises(BenchError) as e:                      # bad input is reported, never retried
        run_grid(specs, tmp_path / "b", cache, executor=bad, retries=5, log=logs.append)
    assert bad.calls == 1 and "cannot hold the longest" in str(e.value)


def fake_slurm(tmp_path) -> Path:
    """sbatch / srun / sacct / scancel stand-ins: sbatch keeps a copy of what it was handed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"sbatch": f'cp "$1" {tmp_path}/sbatch-$(date +%s%N).sh\necho "Submitted batch job 4242"\n',
               "srun": "exit 0\n", "sacct": "exit 0\n", "scancel": "exit 0\n"}
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return bin_dir


def test_slurm_executor_submits_one_job_array_per_request_with_the_grid_resources(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    ex = SubmititExecutor(tmp_path / "jobs", workers=2, cluster="slurm", job_name="bench-t", poll_s=60)
    try:
        gpu = Resources(cpus=4, gpus=1, mem_gb=32, time_min=90, partition="gpu", slurm=(("account", "abc"),))
        futs = ex.submit_many(run_task, [((i,), gpu) for i in range(3)] + [((9,), Resources())])
    finally:
        ex.close(cancel=True)
    assert len(futs) == 4
    texts = [p.read_text() for p in sorted(tmp_path.glob("sbatch-*.sh"))]
    assert len(texts) == 2                                     # one sbatch per distinct request
    array = next(t for t in texts if "--gpus-per-node=1" in t)
    for flag in ("--array=0-2%2", "--cpus-per-task=4", "--mem=32GB", "--time=90", "--partition=gpu",
                 "--account=abc", "--job-name=bench-t"):
        assert flag in array, flag
    single = next(t for t in texts if t is not array)
    assert "--cpus-per-task=1" in single and "--time=120" in single and "--array" not in single
    assert "--gpus" not in single and "--mem" not in single and "--partition" not in single


@pytest.mark.slow
def test_submitit_local_cluster_runs_the_grid_end_to_end(tmp_path, monkeypatch):
    """The driver here, the cell in a submitit job (a child process of submitit's local cluster)."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    specs, logs = load_grid(grid_file(tmp_path)).specs(), []
    out = run_grid(specs, tmp_path / "r", tmp_path / "cache", workers=1, executor="slurm", log=logs.append,
                   executor_options={"cluster": "local", "folder": tmp_path / "jobs"})
    assert out["recorded"] == 1 and any("on slurm executor" in m for m in logs)
    recs = records.load(tmp_path / "r")
    assert sorted(r["row"] for r in recs) == ["backdoored", "clean"]
    assert all((tmp_path / "r" / r["outputs"]).is_file() for r in recs)
    job_logs = "".join(p.read_text() for p in (tmp_path / "jobs").rglob("*.out"))
    assert "computing" in job_logs                             # the stages ran in the job, not here
    again = run_grid(specs, tmp_path / "r", tmp_path / "cache", executor="slurm", log=logs.append,
                     executor_options={"cluster": "local", "folder": tmp_path / "jobs"})
    assert again == {"cells": 1, "skipped": 1, "recorded": 0, "stages": 0}


def test_slurm_executor_without_sbatch_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    from bench.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))                 # no sbatch anywhere
    with pytest.raises(SystemExit) as e:
        main(["grid", str(grid_file(tmp_path)), "--executor", "slurm", "--results", str(tmp_path / "r"),
              "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["bench: error: --executor slurm: no sbatch on PATH (run the driver on a "
                                         "Slurm login node; --cluster local tries the same path on this machine)"]
    assert records.load(tmp_path / "r") == []


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if getattr(addr, "ipv4_mapped", None) is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@pytest.mark.slow
def test_ray_executor_on_loopback_only(tmp_path, monkeypatch):
    # Ray reads this when it is imported (and binds every address without it): set before the import
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))   # RayExecutor prepends this checkout
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from ray._private import ray_constants

    from bench.executors import RayExecutor

    with monkeypatch.context() as m:
        m.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)          # as if imported without the variable
        with pytest.raises(BenchError, match="would listen on outside addresses"):
            RayExecutor(workers=1, threads=1)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ex = RayExecutor(workers=1, threads=1)
    try:
        out = run_grid(load_grid(grid_file(tmp_path)).specs(), tmp_path / "r", tmp_path / "cache", workers=1,
                       executor=ex, log=lambda _: None)
        ray_procs = psutil.Process().children(recursive=True)
        assert ray_procs, "a private Ray was started"
        listening, remote = [], []
        for p in ray_procs:
            try:
                conns = p.net_connections(kind="inet")
            except psutil.Error:
                continue
            listening += [(p.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
            remote += [(p.name(), c.raddr.ip) for c in conns if c.raddr]
        assert listening, "Ray's servers listen somewhere"
        assert all(_loopback(ip) for _, ip in listening), listening
        assert all(_loopback(ip) for _, ip in remote), remote
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True)
        pids = {str(p.pid) for p in ray_procs}
        for line in ss.stdout.splitlines() if ss.returncode == 0 else []:
            if any(f"pid={pid}," in line for pid in pids):
                local = line.split()[3].rsplit(":", 1)[0].strip("[]")
                assert local != "*" and _loopback(local), line
    finally:
        ex.close()
    assert out["recorded"] == 1
    assert sorted(r["row"] for r in records.load(tmp_path / "r")) == ["backdoored", "clean"]


def test_local_executor_replaces_a_pool_that_a_killed_worker_broke():
    """A worker the OS kills breaks a process pool; the scheduler's retry then lands on a fresh pool."""
    from concurrent.futures.process import BrokenProcessPool

    from bench.executors import LocalExecutor

    ex = LocalExecutor(1)
    try:
        [dead] = ex.submit_many(os._exit, [((3,), Resources())])          # the worker dies mid-task
        with pytest.raises(BrokenProcessPool):
            dead.result(timeout=120)
        [ok] = ex.submit_many(abs, [((-3,), Resources())])
        assert ok.result(timeout=120) == 3
    finally:
        ex.close()
