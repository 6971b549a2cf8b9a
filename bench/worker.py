"""What a grid worker runs: one task, a few stages of the cells of a grid, in dependency order, into
the artifact store; for a task that finishes a cell, that cell's records, returned to the driver.

This module is what every backend imports on the worker side (a process-pool child, a Slurm job, a
Ray worker), so its top level imports nothing heavy: the progress-bar switch and the thread count
are set before the pipeline (and with it tqdm and torch) is imported.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any


def run_stage(cell, label: str) -> None:
    """Compute one stage of a cell into its store (the stages it reads are there already)."""
    if label.startswith("evaluated_"):
        row = label[len("evaluated_"):]
        _, model_key, fn = next(r for r in cell.rows() if r[0] == row)
        cell.evaluated(row, model_key, fn)
    else:
        {"base": cell.base, "clean": cell.clean, "trigger": cell.fitted_trigger,
         "backdoored": cell.backdoored, "defended": cell.defended}[label]()


def run_task(stages: list, record: Any, store: str, threads: int, verbose: bool = False) -> dict:
    """Run ``stages`` ((RunSpec, stage label) pairs) in order, then build ``record``'s cell records
    (a RunSpec, or None) without writing them. Returns ``{"records": [(record, output rows), ...] or
    None, "seconds": [(label, s), ...], "host": ..., "pid": ...}``; bad input comes back as ``{"error": line}``
    (the scheduler does not retry it), anything else raises (the scheduler may retry it)."""
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from bench.pipeline import Cell, cell_records
    from bench.records import spec_key
    from bench.store import open_store
    from core.errors import BenchError

    torch.set_num_threads(threads)
    art = open_store(store)
    log = (lambda m: print(m, flush=True)) if verbose else (lambda _: None)
    cells: dict[str, Any] = {}

    def cell(spec):
        key = spec_key(spec.to_dict())
        if key not in cells:
            cells[key] = Cell(spec, art, log=log)
        return cells[key]
    seconds: list[tuple[str, float]] = []
    try:
        for spec, label in stages:
            t0 = time.perf_counter()
            run_stage(cell(spec), label)
            seconds.append((label, round(time.perf_counter() - t0, 2)))
        recs = cell_records(cell(record)) if record is not None else None
    except BenchError as e:
        return {"error": str(e)}
    return {"records": recs, "seconds": seconds, "host": socket.gethostname(), "pid": os.getpid()}
