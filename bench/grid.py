"""Grids: a YAML file names a set of cells; `run_grid` computes the missing ones on a pool of worker
processes, scheduling by *stage* rather than by cell.

Every cell is a chain of cached stages (base -> clean / trigger -> backdoored -> defended ->
evaluated), and cells share stages: every defense of one (model, attack, target, seed) reuses its
base, clean and backdoored models. The scheduler builds one graph of the distinct stages all missing
cells need (a stage is its cache key, so a shared stage appears once), hands a worker a stage only when
the stages it reads are finished — so no worker waits on another's lock while holding cores — and
writes a cell's records from the driver as soon as its last stage is done. Workers only fill the
artifact cache; the driver is the only process that appends to `records.jsonl`. A killed grid
resumes from its finished stages, and a cell already recorded is not run again.

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
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from tqdm.auto import tqdm

from bench import records
from bench.cache import ArtifactCache
from bench.pipeline import DEFENDED_DEPS, Cell, make_spec, run_cell
from bench.spec import RunSpec
from core.errors import BenchError

GRID_KEYS = {"name", "title", "seeds", "grid", "fixed", "cells", "layout"}
SPEC_ARGS = {"model", "attack", "target", "defense", "seed", "poison_rate", "scale", "task", "trainable", "recipe",
             "decoding", "prompt_template", "model_args", "task_args", "attack_args", "target_args", "defense_args"}


@dataclass(frozen=True)
class Grid:
    name: str
    title: str
    cells: tuple            # make_spec keyword dicts, without seed
    seeds: tuple = (0,)
    layout: dict = field(default_factory=dict)

    def specs(self, seeds: tuple | None = None) -> list[RunSpec]:
        """Every cell x seed as a validated spec (bad names or args fail here, before any work)."""
        return [make_spec(**cell, seed=s) for s in (seeds or self.seeds) for cell in self.cells]


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
    return Grid(name=str(raw.get("name") or path.stem), title=str(raw.get("title") or ""), cells=tuple(cells),
                seeds=seeds, layout=dict(raw.get("layout") or {}))


def recorded_specs(results_dir: Path) -> set[str]:
    """Specs (as canonical JSON) whose cell already has records in results_dir."""
    return {records.spec_key(r["spec"]) for r in records.load(results_dir)}


# ---- the stage graph ---------------------------------------------------------------------------
STAGE_DEPS = {"base": [], "clean": ["base"], "trigger": [], "backdoored": ["base", "trigger"]}


def stage_tasks(spec: RunSpec, cache: ArtifactCache) -> dict[str, tuple[tuple, list[tuple]]]:
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


def _init_worker(threads: int, cache_dir: str | None) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["TQDM_DISABLE"] = "1"
    if cache_dir:
        os.environ["BENCH_CACHE"] = cache_dir


def _run_stage(spec: RunSpec, label: str, cache_dir: str | None) -> str:
    """In a worker: compute one stage of a cell into the cache (its inputs are cached already)."""
    cell = Cell(spec, ArtifactCache(Path(cache_dir) if cache_dir else None), log=lambda _: None)
    if label.startswith("evaluated_"):
        row = label[len("evaluated_"):]
        _, model_key, fn = next(r for r in cell.rows() if r[0] == row)
        cell.evaluated(row, model_key, fn)
    else:
        {"base": cell.base, "clean": cell.clean, "trigger": cell.fitted_trigger,
         "backdoored": cell.backdoored, "defended": cell.defended}[label]()
    return label


def run_grid(specs: list[RunSpec], results_dir: Path, cache_dir: Path | None = None, workers: int = 2,
             threads: int = 1, log: Callable[[str], None] = print) -> dict:
    """Compute and record every cell of `specs` that results_dir does not hold yet. Returns counts."""
    results_dir = Path(results_dir)
    records.check_writable(results_dir)
    cache = ArtifactCache(cache_dir)
    done_specs = recorded_specs(results_dir)
    todo = [s for s in specs if records.spec_key(s.to_dict()) not in done_specs]
    log(f"grid: {len(specs)} cells, {len(specs) - len(todo)} already recorded, {len(todo)} to run")
    graph: dict[tuple, tuple[RunSpec, str, set]] = {}          # task id -> (a spec that needs it, label, deps)
    needs: dict[int, set] = {}
    for i, spec in enumerate(todo):
        tasks = stage_tasks(spec, cache)
        needs[i] = {tid for tid, _ in tasks.values()}
        for label, (tid, deps) in tasks.items():
            graph.setdefault(tid, (spec, label, set(deps)))
    log(f"grid: {len(graph)} distinct stages to compute on {workers} worker(s) at {threads} thread(s) each")
    finished: set = set()
    recorded = 0

    def record_ready() -> None:
        nonlocal recorded
        for i in [i for i, n in needs.items() if n <= finished]:
            spec = todo[i]
            recorded += bool(run_cell(spec, results_dir, cache, log=lambda _: None, once=True))   # cached: records only
            del needs[i]
            log(f"cell {len(todo) - len(needs)}/{len(todo)} done: {spec.model} {spec.attack} {spec.target} "
                f"{spec.defense} seed {spec.seed}")
    record_ready()
    if graph:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, str(cache_dir) if cache_dir else None)) as pool, \
                tqdm(total=len(graph), desc="grid stages", unit="stage") as bar:
            running: dict = {}
            while len(finished) < len(graph):
                for tid, (spec, label, deps) in graph.items():
                    if tid not in finished and tid not in running.values() and deps <= finished and len(running) < workers:
                        fut = pool.submit(_run_stage, spec, label, str(cache_dir) if cache_dir else None)
                        running[fut] = tid
                if not running:
                    raise BenchError("grid: stages left that nothing can run (a dependency cycle?)")
                ready, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in ready:
                    tid = running.pop(fut)
                    spec, label, _ = graph[tid]
                    try:
                        fut.result()
                    except BenchError as e:
                        raise BenchError(f"grid: {label} of {spec.model} {spec.attack} {spec.target} {spec.defense} "
                                         f"seed {spec.seed}: {e}") from None
                    finished.add(tid)
                    bar.update(1)
                record_ready()
    return {"cells": len(specs), "skipped": len(specs) - len(todo), "recorded": recorded, "stages": len(graph)}
