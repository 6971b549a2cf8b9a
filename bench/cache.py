"""Content-addressed artifact cache: one directory per (stage, key) holding ``payload.pt`` + ``meta.json``.

The key is the digest of everything that determines the artifact (``bench.spec.digest``), so a grid
computes each stage once and a killed run resumes. Writes are crash-safe: the payload is written to a
tmp file, fsynced and ``os.replace``d, and only then ``meta.json`` (with the payload's sha256) is
written the same way. An entry is present only when both files exist, so a kill between the two
writes leaves an entry that is simply recomputed. Loads verify the sha256.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import platformdirs
import torch
from filelock import FileLock

from core.errors import BenchError
from core.files import file_sha256

PAYLOAD = "payload.pt"
META = "meta.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

T = TypeVar("T")


def default_root() -> Path:
    """``$BENCH_CACHE`` if set, else the platform's user cache dir for vl-backdoor-bench."""
    env = os.environ.get("BENCH_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("vl-backdoor-bench"))


def _entry_path(root: Path, stage: str, key: str) -> Path:
    """``<root>/<stage>/<key[:2]>/<key>``, rejecting names that could escape the root."""
    for what, name in (("stage", stage), ("key", key)):
        if not isinstance(name, str) or not _NAME.match(name):
            raise BenchError(f"bad cache {what} {name!r}: use letters, digits, '.', '_' or '-'")
    if len(key) < 2:
        raise BenchError(f"bad cache key {key!r}: at least 2 characters")
    return Path(root) / stage / key[:2] / key




def _replace_durably(write: Callable[[Any], None], dest: Path) -> None:
    """Write via ``write(fileobj)`` to a tmp file next to ``dest``, fsync, then atomically replace."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def lock(stage: str, key: str, root: Path | None = None) -> Iterator[None]:
    """Hold ``<entry>.lock`` so two processes computing the same entry don't both write it."""
    entry = _entry_path(Path(root) if root is not None else default_root(), stage, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        yield


class ArtifactCache:
    """Stage artifacts on disk, addressed by (stage, key); see the module docstring for the layout."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, stage: str, key: str) -> Path:
        """The entry's directory (may not exist yet)."""
        return _entry_path(self.root, stage, key)

    def has(self, stage: str, key: str) -> bool:
        """True when the entry is complete: both the payload and its meta.json exist."""
        entry = self.path(stage, key)
        return (entry / PAYLOAD).is_file() and (entry / META).is_file()

    def lock(self, stage: str, key: str) -> contextlib.AbstractContextManager[None]:
        """The entry's inter-process lock (see module-level ``lock``)."""
        return lock(stage, key, self.root)

    def save(self, stage: str, key: str, obj: Any, meta: dict) -> None:
        """Store ``obj`` (``torch.save``) and then its meta.json (meta + payload sha256 + time)."""
        entry = self.path(stage, key)
        entry.mkdir(parents=True, exist_ok=True)
        # Overwriting: drop the old meta first so the entry reads as absent, never as old meta + new payload.
        with contextlib.suppress(FileNotFoundError):
            os.remove(entry / META)
        payload = entry / PAYLOAD
        _replace_durably(lambda f: torch.save(obj, f), payload)
        full_meta = {
            **meta,
            "stage": stage,
            "key": key,
            "sha256": file_sha256(payload),
            "bytes": payload.stat().st_size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        blob = json.dumps(full_meta, indent=2, sort_keys=True, default=str).encode()
        _replace_durably(lambda f: f.write(blob), entry / META)

    def meta(self, stage: str, key: str) -> dict:
        """The entry's meta.json (BenchError when missing or unreadable)."""
        path = self.path(stage, key) / META
        try:
            meta = json.loads(path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not a JSON object")
            return meta
        except FileNotFoundError:
            raise BenchError(f"no cache entry {path.parent}") from None
        except (OSError, ValueError) as e:
            raise BenchError(f"corrupt cache entry {path.parent}: unreadable meta.json ({e}); "
                             "delete it to recompute") from None

    def load(self, stage: str, key: str, map_location: Any = "cpu") -> Any:
        """The stored object, after checking its sha256; tensors go to ``map_location`` (cpu default)."""
        entry = self.path(stage, key)
        if not self.has(stage, key):
            raise BenchError(f"no cache entry {entry}")
        meta = self.meta(stage, key)
        payload = entry / PAYLOAD
        actual = file_sha256(payload)
        if actual != meta.get("sha256"):
            raise BenchError(f"corrupt cache entry {entry}: payload sha256 {actual[:12]}… does not match "
                             f"meta.json's {str(meta.get('sha256'))[:12]}…; delete it to recompute")
        try:
            return torch.load(payload, map_location=map_location, weights_only=False)
        except Exception as e:  # unpickling can fail in many ways; all mean the same to the user
            raise BenchError(f"corrupt cache entry {entry}: cannot load payload ({type(e).__name__}: {e}); "
                             "delete it to recompute") from None

    def get_or_compute(self, stage: str, key: str, compute: Callable[[], T],
                       meta: dict | Callable[[T], dict]) -> T:
        """Load the entry if present, else compute and store it once (locked against other processes).
        ``meta`` may be a function of the computed object (e.g. to store what the stage measured)."""
        if self.has(stage, key):
            return self.load(stage, key)
        with self.lock(stage, key):
            if self.has(stage, key):  # another process finished it while we waited
                return self.load(stage, key)
            obj = compute()
            self.save(stage, key, obj, meta(obj) if callable(meta) else meta)
            return obj
