"""Append-only records store: ``<results>/records.jsonl``, one JSON object (one evaluated row) per line.

Writes are atomic per run: the rows of one ``bench run`` are serialized first and written with a single
``os.write`` under a file lock, then fsynced, so a killed process never leaves half a record or part
of a run's rows, and two processes appending at once never interleave. Per-sample outputs go to ``<results>/outputs/<run_id>.jsonl``
(written whole: tmp file + ``os.replace``); a record points at them by relative path.

An outputs row is a dict with at least ``id`` (input id) and ``output`` (generated text); the
evaluator also writes ``triggered`` (bool: the trigger was applied), ``prompt`` and ``verdicts``
(``{judge name: bool}``). ``bench show`` reads these keys.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from filelock import FileLock

from core.errors import BenchError

RECORDS_FILE = "records.jsonl"
OUTPUTS_DIR = "outputs"

log = logging.getLogger(__name__)


def records_path(results_dir: Path) -> Path:
    """The records file of a results dir."""
    return Path(results_dir) / RECORDS_FILE


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj``: numpy scalars/arrays -> Python, Paths -> str, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot store {type(obj).__name__} in a record: {obj!r}")


def _dumps(obj: Any) -> bytes:
    """One JSON line (newline-terminated, no raw newlines inside), UTF-8."""
    return (json.dumps(_jsonable(obj), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append(results_dir: Path, record: dict) -> None:
    """Append one record as one line, atomically and safely against concurrent appenders."""
    append_many(results_dir, [record])


def spec_key(spec: dict) -> str:
    """A record's spec as canonical JSON: two records of the same cell have the same key.

    Records written before ``recipe.train_length`` existed trained their answers in the decoding window
    (the field's default is ``decoding.gen_length``), so their key carries that value: they are the same
    cell as a spec that states it, and a resumed grid does not compute them again."""
    recipe, decoding = spec.get("recipe"), spec.get("decoding")
    if isinstance(recipe, dict) and "train_length" not in recipe and isinstance(decoding, dict) \
            and "gen_length" in decoding:
        spec = {**spec, "recipe": {**recipe, "train_length": decoding["gen_length"]}}
    return json.dumps(spec, sort_keys=True, default=str)


def append_many(results_dir: Path, recs: Sequence[dict], once: bool = False) -> bool:
    """Append the records of one run (its rows) in one locked write: all of them or none. With `once`,
    nothing is written if the file already holds a record of the same cell (checked under the lock,
    so two grids sharing a results dir record each cell once). Returns whether it wrote."""
    results_dir = Path(results_dir)
    line = b"".join(_dumps(r) for r in recs)  # serialize first: a bad record raises before anything is written
    results_dir.mkdir(parents=True, exist_ok=True)
    path = records_path(results_dir)
    with FileLock(str(path) + ".lock"):
        if once and recs and spec_key(recs[0]["spec"]) in {spec_key(r.get("spec")) for r in _read_jsonl(path)}:
            return False
        created = not path.exists()
        # O_RDWR (not O_WRONLY) so we can peek at the last byte; O_APPEND makes the write go to the end.
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A fragment left by a crash (e.g. power loss mid-write): terminate it so this record
                # stays on a line of its own; load() skips the fragment.
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):  # regular files only write short on disk-full and the like
                raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(results_dir)
    return True


def _read_jsonl(path: Path) -> list[dict]:
    """Parse a JSONL file, skipping (with a warning) an unterminated last line and unparseable lines."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        log.warning("%s: skipping an unterminated last line (%d bytes; interrupted write?)", path, len(tail))
    out = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("%s:%d: skipping an unparseable line (%s)", path, n, e)
            continue
        if not isinstance(obj, dict):
            log.warning("%s:%d: skipping a line that is not a JSON object", path, n)
            continue
        out.append(obj)
    return out


def load(results_dir: Path) -> list[dict]:
    """All records in append order (oldest first); damaged lines are skipped with a warning."""
    return _read_jsonl(records_path(results_dir))


def check_writable(results_dir: Path) -> None:
    """Fail early (BenchError) when the results dir can't be created or written, before any work."""
    results_dir = Path(results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".writable-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        reason = e.strerror or str(e)
        raise BenchError(f"results dir {results_dir} is not writable: {reason}") from None


def _atomic_write_bytes(path: Path, chunks: Iterable[bytes]) -> None:
    """Write a file whole or not at all: tmp file in the same dir, fsync, ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_outputs(results_dir: Path, run_id: str, rows: list[dict]) -> Path:
    """Write one run's per-sample outputs atomically; returns the path relative to ``results_dir``."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise BenchError(f"bad run id {run_id!r} for an outputs file")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "id" not in row or "output" not in row:
            raise ValueError(f"outputs row {i} must be a dict with 'id' and 'output' keys")
    rel = Path(OUTPUTS_DIR) / f"{run_id}.jsonl"
    path = Path(results_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [_dumps(row) for row in rows]  # serialize all before touching the disk
    _atomic_write_bytes(path, lines)
    return rel


def read_outputs(results_dir: Path, rel_path: str | Path) -> list[dict]:
    """The per-sample outputs a record points at (``record["outputs"]``); [] when the file is gone."""
    return _read_jsonl(Path(results_dir) / rel_path)
