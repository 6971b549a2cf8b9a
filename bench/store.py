"""Where grid workers read and write stage artifacts: a small store interface and how to open one.

A grid's workers may run on other machines (a Slurm job array, a Ray cluster). They compute stages
into the artifact store and hand records back to the driver; nothing else is shared. The store is
named by a *location* string that travels with every task, so a worker opens the same store the
driver planned against. Today the one implementation is ``ArtifactCache`` (``bench/cache.py``): a
directory, local or on a filesystem every node mounts (NFS, Lustre, GPFS). Its layout and cache keys
are unchanged; an object-store implementation would only have to provide the methods of ``Store``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

from bench.cache import ArtifactCache, default_root
from core.errors import BenchError

T = TypeVar("T")
SCHEMES = ("file",)


@runtime_checkable
class Store(Protocol):
    """What the pipeline needs from an artifact store, addressed by (stage, cache key)."""

    def has(self, stage: str, key: str) -> bool: ...

    def load(self, stage: str, key: str, map_location: Any = "cpu") -> Any: ...

    def save(self, stage: str, key: str, obj: Any, meta: dict) -> None: ...

    def meta(self, stage: str, key: str) -> dict: ...

    def lock(self, stage: str, key: str) -> contextlib.AbstractContextManager[None]: ...

    def get_or_compute(self, stage: str, key: str, compute: Callable[[], T], meta: dict | Callable[[T], dict]) -> T: ...


def location(path: str | Path | None) -> str:
    """The store location for a ``--cache`` value: ``file://`` + the absolute path (the default cache
    dir when None), so a worker in another working directory opens the same store."""
    if path is None:
        return "file://" + str(default_root().expanduser().resolve())
    text = str(path)
    if "://" in text:
        open_store(text)            # refuses an unknown scheme now, before any work
        return text
    return "file://" + str(Path(text).expanduser().resolve())


def open_store(loc: str) -> Store:
    """The store at a location string (``file:///abs/path`` or a plain path)."""
    scheme, sep, rest = loc.partition("://")
    if not sep:
        return ArtifactCache(Path(loc))
    if scheme not in SCHEMES:
        raise BenchError(f"artifact store {loc!r}: unknown scheme {scheme!r} (supported: {', '.join(SCHEMES)}; "
                         "a plain path is a file store)")
    return ArtifactCache(Path(rest))
