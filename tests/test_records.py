"""Records store: atomic concurrent appends, tolerant loading, early writability check, outputs files."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from bench import records
from core.errors import BenchError


def _writer(results_dir: str, worker: int, n: int) -> None:
    for i in range(n):
        # a few KB per line, so unsynchronized writers would visibly interleave
        records.append(Path(results_dir), {"worker": worker, "i": i, "pad": "x" * 4000})


def test_concurrent_appends_from_two_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 200)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 400
    parsed = [json.loads(line) for line in lines]  # every line is a whole record
    for w in (0, 1):
        assert sorted(r["i"] for r in parsed if r["worker"] == w) == list(range(200))
    assert len(records.load(tmp_path)) == 400


def test_load_skips_partial_and_garbage_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records.append(tmp_path, {"a": 1})
    with open(tmp_path / "records.jsonl", "ab") as f:
        f.write(b"not json\n")
    records.append(tmp_path, {"a": 2})
    with open(tmp_path / "records.jsonl", "ab") as f:
        f.write(b'{"a": 3, "trunc')  # a write cut short
    assert [r["a"] for r in records.load(tmp_path)] == [1, 2]
    assert "unterminated" in caplog.text and "unparseable" in caplog.text
    # the next append terminates the fragment instead of gluing onto it
    records.append(tmp_path, {"a": 4})
    assert [r["a"] for r in records.load(tmp_path)] == [1, 2, 4]


def test_load_missing_file_is_empty(tmp_path: Path) -> None:
    assert records.load(tmp_path / "nope") == []


def test_append_converts_numpy_and_nan(tmp_path: Path) -> None:
    records.append(tmp_path, {"v": np.float64(0.5), "n": np.int64(3), "arr": np.arange(2), "bad": float("nan")})
    assert records.load(tmp_path) == [{"v": 0.5, "n": 3, "arr": [0, 1], "bad": None}]


def test_check_writable_raises_under_a_regular_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BenchError, match="not writable"):
        records.check_writable(blocker / "results")
    with pytest.raises(BenchError, match="not writable"):
        records.check_writable(blocker)
    records.check_writable(tmp_path / "fresh" / "results")  # creatable: fine, and leaves no temp file
    assert os.listdir(tmp_path / "fresh" / "results") == []


def test_write_outputs_atomic_and_relative(tmp_path: Path) -> None:
    rows = [{"id": "s1", "triggered": True, "prompt": "p", "output": "o", "verdicts": {"asr": True}}]
    rel = records.write_outputs(tmp_path, "run1", rows)
    assert rel == Path("outputs/run1.jsonl")
    assert records.read_outputs(tmp_path, str(rel)) == rows
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["run1.jsonl"]  # no tmp leftovers
    with pytest.raises(BenchError):
        records.write_outputs(tmp_path, "../escape", rows)


def test_records_from_before_train_length_are_the_cell_that_states_the_default():
    """A record written before recipe.train_length existed trained in the decoding window: its key equals
    the key of the spec that states train_length = gen_length, and differs from any other window."""
    from bench.records import spec_key

    old = {"model": "llada-v", "recipe": {"lr": 0.001, "epochs": 20}, "decoding": {"gen_length": 32, "steps": 32}}
    assert spec_key(old) == spec_key({**old, "recipe": {**old["recipe"], "train_length": 32}})
    assert spec_key(old) != spec_key({**old, "recipe": {**old["recipe"], "train_length": 48}})
