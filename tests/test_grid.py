"""Grids: the YAML format, the stage scheduler (shared stages once, only missing cells, the driver the
only writer), and a SIGKILL-and-restart that ends with exactly one record per cell and the same tables."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import records, tables
from bench.grid import load_grid, run_grid, stage_tasks
from bench.cache import ArtifactCache
from core.errors import BenchError
from tests.helpers import TINY  # smaller still than SMALL: tests of structure, not timing

ROOT = Path(__file__).resolve().parent.parent
SMALL = """
fixed:
  attack: badnets
  target: insertion
  model_args: {enc_dim: 32, enc_layers: 2, enc_heads: 2, d_model: 48, n_layers: 2, n_heads: 2, mlp_hidden: 96,
               mim_epochs: 1, base_epochs: 2}
  task_args: {n_base: 200, n_pool: 100, n_test: 16, n_mc: 24, n_encoder: 200}
  recipe: {epochs: 2}
  decoding: {steps: 4}
"""



def write(tmp_path, body: str, name: str = "g.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


@pytest.mark.parametrize("body, needle", [
    ("grid: {defense: disp}", "grid.defense must be a non-empty list"),
    ("grid: {defense: [disp]}\nfixed: {seed: 1}", "seeds go under 'seeds'"),
    ("grid: {defense: [disp]}\nbogus: 1", "unknown key(s) ['bogus']"),
    ("name: x", "names no cells"),
    ("grid: {defense: [nope]}", "unknown defense 'nope'"),
    ("grid: [1, 2", "is not valid YAML"),
])
def test_bad_grid_files_are_refused_with_one_line(tmp_path, body, needle):
    with pytest.raises(BenchError, match=None) as e:
        load_grid(write(tmp_path, body)).specs()
    assert needle in str(e.value)


def test_grid_expands_the_cross_product_with_fixed_settings_and_extra_cells(tmp_path):
    g = load_grid(write(tmp_path, "name: t\nseeds: [0, 1]\ngrid: {defense: [disp, pruning], target: [insertion, refusal]}\n"
                                  "fixed: {attack: blended}\ncells: [{defense: none, attack: noise}]"))
    specs = g.specs()
    assert len(specs) == 2 * (4 + 1) and {s.seed for s in specs} == {0, 1}
    assert sum(s.attack == "blended" for s in specs) == 8 and sum(s.attack == "noise" for s in specs) == 2
    assert len(g.specs((3,))) == 5


def test_shared_stages_are_one_task_and_only_missing_cells_run(tmp_path):
    cache = tmp_path / "cache"
    g = load_grid(write(tmp_path, "name: t\ngrid: {defense: [pruning, random-drop]}\n" + TINY))
    specs = g.specs()
    a, b = (stage_tasks(s, ArtifactCache(cache)) for s in specs)
    shared = {tid for tid, _ in a.values()} & {tid for tid, _ in b.values()}
    assert {t[0] for t in shared} == {"base", "clean", "trigger", "backdoored", "evaluated"}   # clean + backdoored rows
    assert a["defended"][1] == [a["backdoored"][0], a["trigger"][0]]                           # purify reads backdoored
    assert set(b["defended"][1]) == {b["base"][0], b["backdoored"][0], b["trigger"][0]}        # a filter: base too
    out = run_grid(specs, tmp_path / "r", cache, workers=2, log=lambda _: None)
    assert out == {"cells": 2, "skipped": 0, "recorded": 2, "stages": 10}
    recs = records.load(tmp_path / "r")
    assert sorted(r["row"] for r in recs) == ["backdoored", "backdoored", "clean", "clean", "pruning", "random-drop"]
    again = run_grid(specs, tmp_path / "r", cache, workers=2, log=lambda _: None)
    assert again == {"cells": 2, "skipped": 2, "recorded": 0, "stages": 0}
    assert len(records.load(tmp_path / "r")) == 6


@pytest.mark.slow
def test_sigkill_and_restart_end_with_one_record_per_cell_and_the_same_tables(tmp_path):
    grid = write(tmp_path, "name: t\ngrid: {defense: [pruning, none]}\n" + SMALL)
    env = dict(os.environ, TQDM_DISABLE="1")

    def bench(results, cache, wait_for=None):
        cmd = [sys.executable, "-m", "bench.cli", "grid", str(grid), "--workers", "2", "--results", str(results),
               "--cache", str(cache)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if wait_for is None:
            assert proc.wait(timeout=600) == 0
            return
        deadline = time.time() + 600
        while not list((cache / wait_for).glob("*/*/payload.pt")):      # a stage finished: kill mid-grid
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    bench(tmp_path / "killed", tmp_path / "cache-k", wait_for="backdoored")
    assert not (tmp_path / "killed" / "records.jsonl").exists() or \
        len(records.load(tmp_path / "killed")) < 5
    bench(tmp_path / "killed", tmp_path / "cache-k")                        # restart: finishes the grid
    bench(tmp_path / "clean-run", tmp_path / "cache-c")                     # an uninterrupted run, own cache
    killed, straight = records.load(tmp_path / "killed"), records.load(tmp_path / "clean-run")
    key = lambda r: (json.dumps(r["spec"], sort_keys=True), r["row"])
    assert sorted(map(key, killed)) == sorted(map(key, straight)) and len(killed) == 3 + 2  # one record per row
    render = lambda recs: tables.to_markdown(tables.table1(recs, "llada-v", "badnets", ["insertion"]))
    assert render(killed) == render(straight)


@pytest.mark.slow
def test_two_grids_on_one_results_dir_record_each_cell_once(tmp_path):
    """Two overlapping grids run at the same time on one results dir and one cache."""
    a = write(tmp_path, "name: a\ngrid: {defense: [pruning, none]}\n" + SMALL, "a.yaml")
    b = write(tmp_path, "name: b\ngrid: {defense: [none, random-drop]}\n" + SMALL, "b.yaml")
    env = dict(os.environ, TQDM_DISABLE="1")
    cmd = lambda g: [sys.executable, "-m", "bench.cli", "grid", str(g), "--workers", "1", "--results",
                     str(tmp_path / "r"), "--cache", str(tmp_path / "cache")]
    procs = [subprocess.Popen(cmd(g), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for g in (a, b)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    recs = records.load(tmp_path / "r")
    cells = {}
    for r in recs:
        cells.setdefault(records.spec_key(r["spec"]), []).append(r["row"])
    assert len(cells) == 3                                                     # pruning, none, random-drop
    assert sorted(len(rows) for rows in cells.values()) == [2, 3, 3]           # each cell's rows exactly once


@pytest.mark.parametrize("name", ["mdlm-main", "triggers", "ar-crossview", "cross-product", "poison-rate", "committed"])
def test_committed_grid_files_are_valid(name):
    g = load_grid(ROOT / "leaderboards" / f"{name}.yaml")
    specs = g.specs()                         # every cell resolves: names, args, capabilities at run time
    assert specs and g.name == name


def test_regenerate_runs_grids_whose_cells_cover_every_committed_record():
    """leaderboards/regenerate.sh is bench grid on committed.yaml: each committed record is one of its
    cells, so a rerun resumes (skips them) instead of adding a second record per cell."""
    keys = {records.spec_key(s.to_dict()) for s in load_grid(ROOT / "leaderboards" / "committed.yaml").specs()}
    recs = records.load(ROOT / "leaderboards")
    assert recs and all(records.spec_key(r["spec"]) in keys for r in recs)
    script = (ROOT / "leaderboards" / "regenerate.sh").read_text()
    assert '"$bench" grid' in script and '"$bench" run' not in script


def test_grid_table_means_over_seeds_and_marks_missing_cells(tmp_path):
    from bench.grid import Grid
    g = Grid(name="t", title="test", cells=({"defense": "disp", "target": "insertion"},
                                           {"defense": "pruning", "target": "insertion"},
                                           {"defense": "disp", "target": "refusal"}))

    def rec(row, defense, target, seed, cp, wt):
        return {"row": row, "spec": {"model": "llada-v", "attack": "badnets", "defense": defense, "target": target,
                                     "seed": seed}, "code_revision": "abcdef1234567",
                "metrics": {"cp": {"value": cp}, "asr_wo": {"value": 0.0}, "asr_wt": {"value": wt}}}
    recs = [rec("backdoored", "disp", "insertion", 0, 60.0, 100.0), rec("backdoored", "disp", "insertion", 1, 64.0, 90.0),
            rec("disp", "disp", "insertion", 0, 58.0, 0.0), rec("disp", "disp", "insertion", 1, 62.0, 10.0),
            rec("clean", "disp", "insertion", 0, 65.0, 0.0)]
    df, used = tables.grid_table(g, recs)
    assert len(used) == 5
    flat = tables._flat_columns(df)
    assert flat.loc["Backdoored", "insertion CP"] == "62.00 ± 25.41"             # mean 62, t(0.975, 1) * 2.83 / 1.41
    assert flat.loc["Clean", "insertion CP"] == "65.00"                          # one seed: no interval
    assert flat.loc["Pruning", "insertion CP"] == "-" and flat.loc["DiSP", "refusal ASR (w/t)"] == "-"
    paths = tables.render_grid(g, recs, tmp_path)
    assert [p.suffix for p in paths] == [".md", ".csv", ".tex"]
    head = paths[0].read_text().splitlines()[2]
    assert head.startswith("5 records · seeds 0, 1 · code revision(s) abcdef1234")
    assert "\\toprule" in paths[2].read_text()
