"""Grids: a YAML file names a set of cells; `run_grid` computes the missing ones on an executor (a
local process pool, a Slurm job array, a Ray cluster: ``bench/executors.py``), scheduling by *stage*
rather than by cell.

Every cell is a chain of cached stages (base -> clean / trigger -> backdoored -> defended ->
evaluated), and cells share stages: every defense of one (model, attack, target, seed) reuses its
base, clean and backdoored models. The scheduler builds one graph of the distinct stages all missing
cells need (a stage is its cache key, so a shared stage appears once) and cuts it into *tasks*: the
stages needed by exactly the same set of cells form one task, run in order by one worker (so a cell's
own chain is one job, not six), and a cell's last task also builds its records. A task is handed out
only when the tasks it reads from are finished, so no worker waits on another's lock while holding
cores. Workers fill the artifact store (``bench/store.py``) and return records; the driver is the only
process that writes the results dir (outputs files and ``records.jsonl``), so no lock has to work
across machines. A task that fails for any reason but bad input is retried (``retries`` times, the
same policy on every backend); a killed grid resumes from its finished stages, and a cell already
recorded is not run again.

Grid file (`leaderboards/*.yaml`)::

    name: mdlm-main                 # the table's name
    title: ...                      # one line for humans
    seeds: [0]                      # default seeds (bench grid --seeds overrides)
    grid:                           # the cross product of these lists ...
      model: [llada-v]
      target: [insertion, refusal]
      defense: [disp, random-drop]
    fixed: {attack: badnets}        # ... with these settings (any make_spec argument)
    cells: []                       # ... plus explicit extra cells (dicts of make_spec arguments)
    resources:                      # optional: what one task asks for on slurm / ray (defaults shown)
      cpus: 1                       #   also the task's torch threads (bench grid --threads overrides)
      gpus: 0
      mem_gb: null                  #   null: the backend's default
      time_min: 120                 #   per stage; a task asks for the sum over its stages
      partition: null               #   Slurm partition
      slurm: {}                     #   extra sbatch options, e.g. {account: abc, qos: high}
      stages: {base: {time_min: 600, gpus: 1}}   # per-stage overrides of the above
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from bench import records
from bench.executors import Resources, check_executor, make_executor, parse_resources
from bench.pipeline import DEFENDED_DEPS, Cell, make_spec, write_records
from bench.spec import RunSpec
from bench.store import location, open_store
from bench.worker import run_task
from core.errors import BenchError

GRID_KEYS = {"name", "title", "seeds", "grid", "fixed", "cells", "layout", "resources"}
SPEC_ARGS = {"model", "attack", "target", "defense", "seed", "poison_rate", "scale", "task", "trainable", "recipe",
             "decoding", "prompt_template", "model_args", "task_args", "attack_args", "target_args", "defense_args"}
STAGES = ("base", "clean", "trigger", "backdoored", "defended", "evaluated")


@dataclass(frozen=True)
class Grid:
    name: str
    title: str
    cells: tuple            # make_spec keyword dicts, without seed
    seeds: tuple = (0,)
    layout: dict = field(default_factory=dict)
    resources: Resources = Resources()
    stage_resources: dict = field(default_factory=dict)     # stage -> Resources

    def specs(self, seeds: tuple | None = None) -> list[RunSpec]:
        """Every cell x seed as a validated spec (bad names or args fail here, before any work)."""
        return [make_spec(**cell, seed=s) for s in (seeds or self.seeds) for cell in self.cells]


def _load_resources(raw: Any, path: Path) -> tuple[Resources, dict]:
    """The grid file's ``resources:`` block: defaults for every stage, and per-stage overrides."""
    if raw is None:
        return Resources(), {}
    if not isinstance(raw, dict):
        raise BenchError(f"grid file {path}: resources must be a mapping (cpus, gpus, mem_gb, time_min, ...)")
    raw = dict(raw)
    per_stage = raw.pop("stages", None) or {}
    base = parse_resources(raw, f"grid file {path}: resources")
    if not isinstance(per_stage, dict) or set(per_stage) - set(STAGES):
        raise BenchError(f"grid file {path}: resources.stages must map stage names ({', '.join(STAGES)}) "
                         f"to resources, got {per_stage!r}")
    return base, {st: parse_resources(r, f"grid file {path}: resources.stages.{st}", base) for st, r in per_stage.items()}


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"grid file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise BenchError(f"grid file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"grid file {path} must be a mapping with name, grid/cells")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise BenchError(f"grid file {path}: unknown key(s) {sorted(unknown)} (valid: {', '.join(sorted(GRID_KEYS))})")
    grid, fixed, extra = raw.get("grid") or {}, raw.get("fixed") or {}, raw.get("cells") or []
    for where, keys in (("grid", grid), ("fixed", fixed), *((f"cells[{i}]", c) for i, c in enumerate(extra))):
        bad = set(keys) - SPEC_ARGS if isinstance(keys, dict) else {"(not a mapping)"}
        if bad or "seed" in keys:
            raise BenchError(f"grid file {path}: {where} has key(s) {sorted(bad | ({'seed'} & set(keys)))} that are not "
                             f"cell settings (seeds go under 'seeds'; valid: {', '.join(sorted(SPEC_ARGS - {'seed'}))})")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise BenchError(f"grid file {path}: grid.{k} must be a non-empty list")
    names = list(grid)
    cells = [{**fixed, **dict(zip(names, combo))} for combo in itertools.product(*(grid[k] for k in names))] if grid else []
    cells += [{**fixed, **c} for c in extra]
    if not cells:
        raise BenchError(f"grid file {path} names no cells (give grid lists or cells)")
    seeds = tuple(raw.get("seeds") or (0,))
    res, stage_res = _load_resources(raw.get("resources"), path)
    return Grid(name=str(raw.get("name") or path.stem), title=str(raw.get("title") or ""), cells=tuple(cells),
                seeds=seeds, layout=dict(raw.get("layout") or {}), resources=res, stage_resources=stage_res)


def recorded_specs(results_dir: Path) -> set[str]:
    """Specs (as canonical JSON) whose cell already has records in results_dir."""
    return {records.spec_key(r["spec"]) for r in records.load(results_dir)}


# ---- the stage graph ---------------------------------------------------------------------------
STAGE_DEPS = {"base": [], "clean": ["base"], "trigger": [], "backdoored": ["base", "trigger"]}


def stage_tasks(spec: RunSpec, cache) -> dict[str, tuple[tuple, list[tuple]]]:
    """The missing stages of one cell: label -> (task id, ids of the missing stages it reads). A task
    id is (stage, cache key), so two cells that share a stage share its task."""
    cell = Cell(spec, cache, log=lambda _: None)
    plan = cell.plan()
    keys = {label: ("evaluated", cell.eval_key(model_key)) for label, model_key in
            ((f"evaluated_{row}", mk) for row, mk, _ in cell.rows())}
    keys.update({s: (s, cell.keys[s]) for s in ("base", "clean", "trigger", "backdoored", "defended")})
    deps = dict(STAGE_DEPS, defended=DEFENDED_DEPS.get(cell.defense.kind, ["backdoored", "trigger"]))
    deps.update({f"evaluated_{row}": [cell.row_stage(row), "trigger"] for row, _, _ in cell.rows()})
    return {label: (keys[label], [keys[d] for d in deps[label] if d in plan]) for label in plan}


@dataclass
class Task:
    """Stages one worker runs in order (all needed by exactly the cells ``cells``), then, when
    ``record`` is set, that cell's records."""

    id: int
    stages: list                     # [(task id of the stage, RunSpec, label)] in dependency order
    cells: frozenset
    record: int | None = None        # index of the cell whose records this task builds
    deps: set = field(default_factory=set)      # ids of the tasks it reads from
    resources: Resources = Resources()

    def describe(self, todo: list[RunSpec]) -> str:
        what = ", ".join(label for _, _, label in self.stages) or "records"
        s = todo[self.record if self.record is not None else min(self.cells)]
        return f"[{what}] of {s.model} {s.attack} {s.target} {s.defense} seed {s.seed}" + \
            (f" (+{len(self.cells) - 1} cells)" if len(self.cells) > 1 else "")


def plan_tasks(todo: list[RunSpec], cache, resources: Resources = Resources(),
               stage_resources: dict | None = None) -> tuple[list[Task], int]:
    """Cut the missing stages of the cells ``todo`` into tasks: one per set of cells that need exactly
    the same stages (a stage's cells need every stage it reads, so a task reads only from tasks with a
    larger cell set: the task graph has no cycle). Returns the tasks in a runnable order and the
    number of distinct stages."""
    stage_resources = stage_resources or {}
    nodes: dict[tuple, dict] = {}                  # stage id -> {spec, label, deps, cells}
    for i, spec in enumerate(todo):
        for label, (tid, deps) in stage_tasks(spec, cache).items():
            node = nodes.setdefault(tid, {"spec": spec, "label": label, "deps": set(deps), "cells": set()})
            node["cells"].add(i)
    for i, spec in enumerate(todo):                 # the cell's records: after its evaluated stages
        evals = {tid for tid, n in nodes.items() if tid[0] == "evaluated" and i in n["cells"]}
        nodes[("record", i)] = {"spec": spec, "label": "record", "deps": evals, "cells": {i}}
    groups: dict[frozenset, list[tuple]] = {}
    for tid, n in nodes.items():
        groups.setdefault(frozenset(n["cells"]), []).append(tid)
    # larger cell sets first: what many cells read runs before what fewer read
    order = sorted(groups, key=lambda c: (-len(c), sorted(c)))
    group_of = {tid: gi for gi, cells in enumerate(order) for tid in groups[cells]}
    tasks = []
    for gi, cells in enumerate(order):
        members, ordered = set(groups[cells]), []
        while members:                               # dependency order inside the task
            ready = sorted((t for t in members if not (nodes[t]["deps"] & members)), key=str)
            ordered += ready
            members -= set(ready)
        res = None
        for tid in ordered:
            if tid[0] != "record":
                r = stage_resources.get(tid[0], resources)
                res = r if res is None else res.merge(r)
        tasks.append(Task(id=gi, cells=cells, stages=[(t, nodes[t]["spec"], nodes[t]["label"]) for t in ordered
                                                      if t[0] != "record"],
                          record=next((t[1] for t in ordered if t[0] == "record"), None),
                          deps={group_of[d] for t in ordered for d in nodes[t]["deps"]} - {gi},
                          resources=res or replace(resources, time_min=min(resources.time_min, 30))))
    return tasks, sum(1 for tid in nodes if tid[0] != "record")


def run_grid(specs: list[RunSpec], results_dir: Path, cache_dir: Path | str | None = None, workers: int = 2,
             threads: int | None = None, log: Callable[[str], None] = print, executor: str | Any = "local",
             retries: int = 2, resources: Resources = Resources(), stage_resources: dict | None = None,
             executor_options: dict | None = None) -> dict:
    """Compute and record every cell of `specs` that results_dir does not hold yet. Returns counts.

    ``executor`` is a name (``local``, ``slurm``, ``ray``; ``executor_options`` go to its constructor)
    or an object with ``submit_many`` and ``close``. ``threads`` (torch threads per task) overrides the
    grid's ``resources.cpus``. A task that raises is resubmitted up to ``retries`` times; one that
    reports bad input is not. Tasks that cannot run because a task they read from failed are skipped;
    every other cell is still recorded, and the failures end in one BenchError."""
    results_dir = Path(results_dir)
    if isinstance(executor, str):
        check_executor(executor, **(executor_options or {}))
    records.check_writable(results_dir)
    store = location(cache_dir)
    cache = open_store(store)
    if threads is not None:
        resources = replace(resources, cpus=threads)
        stage_resources = {k: replace(v, cpus=threads) for k, v in (stage_resources or {}).items()}
    done_specs = recorded_specs(results_dir)
    todo = [s for s in specs if records.spec_key(s.to_dict()) not in done_specs]
    log(f"grid: {len(specs)} cells, {len(specs) - len(todo)} already recorded, {len(todo)} to run")
    tasks, n_stages = plan_tasks(todo, cache, resources, stage_resources)
    if not tasks:
        return {"cells": len(specs), "skipped": len(specs), "recorded": 0, "stages": 0}
    from tqdm.auto import tqdm     # after the CLI has decided whether bars are on (bench/cli.py main)

    ex = make_executor(executor, workers, resources.cpus, **(executor_options or {})) \
        if isinstance(executor, str) else executor
    name = getattr(ex, "name", type(ex).__name__)
    log(f"grid: {n_stages} distinct stages in {len(tasks)} tasks on {name} executor, {workers} at a time, "
        f"{resources.cpus} thread(s) each")
    verbose = name != "local"
    pending, done, failed, attempts = {t.id: t for t in tasks}, set(), {}, {}
    running: dict = {}
    recorded = cells_done = 0
    t0 = time.perf_counter()
    ok = False
    try:
        with tqdm(total=n_stages, desc="grid stages", unit="stage") as bar:
            while pending or running:
                ready = [t for t in pending.values() if t.deps <= done][: max(0, workers - len(running))]
                if ready:
                    calls = [((([(spec, label) for _, spec, label in t.stages]),
                               todo[t.record] if t.record is not None else None, store, t.resources.cpus, verbose),
                              t.resources) for t in ready]
                    for t, fut in zip(ready, ex.submit_many(run_task, calls)):
                        running[fut] = pending.pop(t.id)
                if not running:
                    break                                   # the rest reads from failed tasks
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    t = running.pop(fut)
                    try:
                        out = fut.result()
                    except BaseException as e:              # noqa: BLE001 - a crash, a kill, a lost node
                        if isinstance(e, KeyboardInterrupt):
                            raise
                        attempts[t.id] = attempts.get(t.id, 0) + 1
                        why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                        if attempts[t.id] <= retries:
                            log(f"task {t.describe(todo)} failed ({why}); retry {attempts[t.id]}/{retries}")
                            pending[t.id] = t
                        else:
                            failed[t.id] = f"{t.describe(todo)}: {why} (after {retries} retries)"
                        continue
                    if "error" in out:                      # bad input: the same on every try
                        failed[t.id] = f"{t.describe(todo)}: {out['error']}"
                        continue
                    done.add(t.id)
                    bar.update(len(t.stages))
                    if out.get("records") is not None:
                        spec = todo[t.record]
                        recorded += bool(write_records(results_dir, out["records"], once=True))
                        cells_done += 1
                        log(f"cell {cells_done}/{len(todo)} done: {spec.model} {spec.attack} {spec.target} "
                            f"{spec.defense} seed {spec.seed} ({time.perf_counter() - t0:.0f}s)")
        ok = True
    finally:
        if isinstance(executor, str):              # an executor we made is ours to close
            ex.close(cancel=not ok)
    if failed:
        skipped = len(pending)
        first = next(iter(failed.values()))
        raise BenchError(f"grid: {len(failed)} task(s) failed{f', {skipped} not run because they read from one' if skipped else ''}; "
                         f"{recorded} cells recorded; first failure: {first}; rerun the grid to resume")
    return {"cells": len(specs), "skipped": len(specs) - len(todo), "recorded": recorded, "stages": n_stages}
