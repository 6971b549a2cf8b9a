"""Artifact cache: round trip, corruption detection, two-file presence rule, compute-once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.cache import ArtifactCache, default_root
from core.errors import BenchError

KEY = "ab" + "0" * 62


def test_round_trip_and_layout(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    obj = {"w": torch.arange(4.0), "name": "x"}
    assert not cache.has("backdoored", KEY)
    cache.save("backdoored", KEY, obj, {"spec": {"seed": 0}})
    entry = tmp_path / "backdoored" / "ab" / KEY
    assert cache.path("backdoored", KEY) == entry
    assert cache.has("backdoored", KEY)
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["spec"] == {"seed": 0} and len(meta["sha256"]) == 64 and "created" in meta
    back = cache.load("backdoored", KEY)
    assert back["name"] == "x" and torch.equal(back["w"], obj["w"])


def test_tampered_payload_is_corrupt(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("clean", KEY, torch.ones(3), {})
    payload = cache.path("clean", KEY) / "payload.pt"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))
    with pytest.raises(BenchError, match="corrupt"):
        cache.load("clean", KEY)


def test_unloadable_payload_with_matching_hash_is_corrupt(tmp_path: Path) -> None:
    import hashlib

    cache = ArtifactCache(tmp_path)
    cache.save("clean", KEY, torch.ones(3), {})
    entry = cache.path("clean", KEY)
    (entry / "payload.pt").write_bytes(b"garbage")
    meta = json.loads((entry / "meta.json").read_text())
    meta["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BenchError, match="corrupt.*delete it to recompute"):
        cache.load("clean", KEY)


def test_payload_without_meta_is_not_present(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.save("base", KEY, [1, 2], {})
    (cache.path("base", KEY) / "meta.json").unlink()  # as if killed between the two writes
    assert not cache.has("base", KEY)
    assert cache.get_or_compute("base", KEY, lambda: [3], {}) == [3]  # recomputed
    assert cache.load("base", KEY) == [3]


def test_get_or_compute_computes_once(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"v": 7}

    assert cache.get_or_compute("evaluated", KEY, compute, {"a": 1}) == {"v": 7}
    assert ArtifactCache(tmp_path).get_or_compute("evaluated", KEY, compute, {"a": 1}) == {"v": 7}
    assert len(calls) == 1


def test_bad_names_and_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(BenchError):
        cache.path("../x", KEY)
    with pytest.raises(BenchError):
        cache.path("clean", "../../etc")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "c"))
    assert default_root() == tmp_path / "c" and ArtifactCache().root == tmp_path / "c"


def _racer(root: str, log: str) -> None:
    import time

    def compute() -> list[int]:
        with open(log, "a") as f:
            f.write("computed\n")
        time.sleep(0.3)  # long enough that the other process is waiting on the lock
        return [1, 2, 3]

    assert ArtifactCache(Path(root)).get_or_compute("backdoored", KEY, compute, {}) == [1, 2, 3]


def test_two_processes_compute_an_entry_once(tmp_path: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "cache"), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text() == "computed\n"
