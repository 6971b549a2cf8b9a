"""How fast `bench grid` computes a grid from a cold cache, and how its time grows with cells and workers
(issue 19's must-hold: mdlm-main, one seed, under 45 minutes at --workers 2 on a 2-core machine,
parallel efficiency >= 0.8). Not a test.

    python benchmarks/bench_grid.py leaderboards/mdlm-main.yaml                  # the real grid, 1 and 2 workers
    python benchmarks/bench_grid.py leaderboards/mdlm-main.yaml --overlay benchmarks/grid_tiny.yaml \\
        --cells 3,6 --workers 1,2                                               # a quick try on a reduced replica

Each measurement is one `bench grid` in a child process with an empty artifact cache and results dir
(so every shared stage is computed once within the run, none before it): for every cell count N in
--cells (the first N cells of the grid, in its order; default all) and every worker count W in
--workers. It reports the wall time, cells per hour, the CPU seconds of the run (driver and workers),
the stages computed, and per N the parallel efficiency T(1 worker) / (W x T(W workers)); over N, the
seconds each further cell added. --overlay merges a YAML mapping into every cell (nested *_args and
recipe / decoding merge key by key), so the same grid can be timed on a smaller replica.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MERGED = ("model_args", "task_args", "attack_args", "target_args", "defense_args", "recipe", "decoding")


def cells_of(grid_file: Path, overlay: dict, n: int | None) -> tuple[dict, list[dict]]:
    """The grid file's raw mapping and its first n expanded cells with the overlay merged in."""
    from bench.grid import load_grid

    raw = yaml.safe_load(grid_file.read_text())
    cells = [dict(c) for c in load_grid(grid_file).cells][:n]
    for c in cells:
        for k, v in overlay.items():
            c[k] = {**(c.get(k) or {}), **v} if k in MERGED and isinstance(v, dict) else v
    return raw, cells


def run_once(grid_file: Path, overlay: dict, n: int | None, workers: int, seeds: str, executor: str) -> dict:
    """One cold `bench grid` of the first n cells: wall seconds, CPU seconds, stages, cells."""
    raw, cells = cells_of(grid_file, overlay, n)
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        tmp = Path(tmp)
        spec = {"name": raw.get("name", grid_file.stem), "cells": cells}
        if raw.get("resources"):
            spec["resources"] = raw["resources"]
        (tmp / "g.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        cmd = [sys.executable, "-m", "bench.cli", "grid", str(tmp / "g.yaml"), "--workers", str(workers),
               "--threads", "1", "--seeds", seeds, "--executor", executor, "--results", str(tmp / "results"),
               "--cache", str(tmp / "cache")]
        env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1", BENCH_THREADS="1")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"bench grid failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        # "grid: S distinct stages in T tasks on ..." (absent when nothing was left to run)
        plan = next((line for line in proc.stderr.splitlines() if "distinct stages in" in line), "grid: 0 x in 0")
        stages, tasks = int(plan.split()[1]), int(plan.split(" in ")[1].split()[0])
    n_cells = len(cells) * len(seeds.split(","))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cells": n_cells, "workers": workers, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "cells_per_hour": round(3600 * n_cells / wall, 1), "stages": stages, "tasks": tasks}


def report(rows: list[dict]) -> str:
    lines = ["| cells | workers | stages | tasks | wall | CPU s | CPU / wall | cells per hour | parallel efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    t1 = {r["cells"]: r["wall_s"] for r in rows if r["workers"] == 1}
    for r in rows:
        eff = f"{t1[r['cells']] / (r['workers'] * r['wall_s']):.2f}" if r["cells"] in t1 else "-"
        lines.append(f"| {r['cells']} | {r['workers']} | {r['stages']} | {r['tasks']} | {r['wall_s']:.0f} s "
                     f"({r['wall_s'] / 60:.1f} min) | {r['cpu_s']:.0f} | {r['cpu_s'] / r['wall_s']:.2f} | "
                     f"{r['cells_per_hour']:.0f} | {eff} |")
    for w in sorted({r["workers"] for r in rows}):
        pts = sorted((r["cells"], r["wall_s"]) for r in rows if r["workers"] == w)
        if len(pts) > 1:
            (n0, t0), (n1, t1_) = pts[0], pts[-1]
            lines.append(f"\n{w} worker(s): {t0:.0f} s for {n0} cells, {t1_:.0f} s for {n1}: "
                         f"{(t1_ - t0) / (n1 - n0):.1f} s per further cell")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path, help="a grid file, e.g. leaderboards/mdlm-main.yaml")
    ap.add_argument("--workers", default="1,2", help="worker counts to time (comma-separated)")
    ap.add_argument("--cells", default=None, help="cell counts to time: the first N cells (default: all)")
    ap.add_argument("--seeds", default="0", help="seeds, as bench grid --seeds")
    ap.add_argument("--overlay", type=Path, default=None, help="YAML merged into every cell (a smaller replica)")
    ap.add_argument("--executor", default="local", help="bench grid --executor")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    a = ap.parse_args()
    overlay = yaml.safe_load(a.overlay.read_text()) if a.overlay else {}
    counts = [int(x) for x in a.cells.split(",")] if a.cells else [None]
    rows = []
    load0 = os.getloadavg()[0]
    for n in counts:
        for w in (int(x) for x in a.workers.split(",")):
            r = run_once(a.grid, overlay, n, w, a.seeds, a.executor)
            print(f"{r['cells']} cells, {w} worker(s): {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s CPU, "
                  f"{r['stages']} stages in {r['tasks']} tasks", file=sys.stderr, flush=True)
            rows.append(r)
    print(f"{a.grid}" + (f" with {a.overlay}" if a.overlay else "") + f", seeds {a.seeds}, on {os.cpu_count()} cores; "
          f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share the cores when it "
          "is above 0: CPU / wall below the worker count shows how much)\n")
    print(report(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
