"""Where a number came from: the code a stage runs (its transitive in-repo source), the software and
thread count of the process that produced an artifact, and the repository revision.

A stage's cache key hashes ``code_hash(...)`` of the modules it calls: the module files *and every
in-repo module they import, transitively* (computed from the import statements, not a hand list), so
editing a helper such as ``attacks/badnets.py`` moves the key of every attack that stamps through it
and of no other. The torch and numpy versions go into every key as well: a kernel change can change a
trained model.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import bench

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "tasks", "attacks", "models", "defenses", "bench")


def module_file(module: str, root: Path) -> Path | None:
    """The in-repo file of a dotted module name (``attacks.badnets`` -> attacks/badnets.py), or None."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    for cand in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names a file imports (module-level and lazy imports alike; ``from a import b`` yields
    both ``a`` and ``a.b`` since b may be a submodule)."""
    out: set[str] = set()
    pkg = path.parent.name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import inside an in-repo package
                base = f"{pkg}.{base}".rstrip(".")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def closure(paths: list[Path], root: Path) -> list[Path]:
    """``paths`` and every in-repo module they import, transitively; sorted, relative to ``root``
    (a method from another package keeps its absolute path; its own imports outside this repo are
    covered by the versions it runs with, not hashed)."""
    seen: set[Path] = set()
    todo = [Path(p).resolve() for p in paths]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for name in _imports(p):
            f = module_file(name, root)
            if f is not None:
                todo.append(f.resolve())
            pkg_init = module_file(name.split(".")[0], root)
            if pkg_init is not None:
                todo.append(pkg_init.resolve())
    root = root.resolve()
    return sorted((p.relative_to(root) if p.is_relative_to(root) else p for p in seen), key=str)


def _path_of(obj, root: Path) -> Path:
    """A repo-relative path, or a module / class / function defined in this repo, as a file under ``root``."""
    if isinstance(obj, (str, Path)):
        return root / obj
    src = Path(inspect.getsourcefile(obj)).resolve()
    try:
        return root / src.relative_to(ROOT)     # the same file in another checkout (tests use a copy)
    except ValueError:
        return src                              # a third-party method: its own file


def code_of(path: Path) -> str:
    """A module's code without its comments and docstrings (the AST), so editing prose moves no key."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def _hash_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for rel in files:
        h.update(str(rel).encode() + b"\0")
        h.update(code_of(rel if rel.is_absolute() else root / rel).encode())
    h.update(f"torch {torch.__version__} numpy {np.__version__}".encode())
    return h.hexdigest()[:16]


def code_hash(*objs, root: Path | None = None) -> str:
    """sha256 over the transitive in-repo code of ``objs`` (paths relative to the repo, or modules,
    classes, functions; comments and docstrings excluded) plus the torch and numpy versions: a stage's
    code version."""
    root = Path(root or ROOT)
    files = closure([_path_of(o, root) for o in objs], root)
    return _hash_files(files, root)


def code_files(*objs, root: Path | None = None) -> list[str]:
    """The files ``code_hash`` covers (for the record and for debugging a key)."""
    root = Path(root or ROOT)
    return [str(p) for p in closure([_path_of(o, root) for o in objs], root)]


def code_revision() -> str:
    """``git rev-parse HEAD`` (+ ``-dirty`` when tracked files differ), or the package version."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"unknown (package {bench.__version__})"


def versions() -> dict:
    """Software and the torch thread count: CPU float reductions depend on it, so a run with another
    BENCH_THREADS can differ in the last sample or two."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "vl-backdoor-bench": bench.__version__, "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


def provenance() -> dict:
    """What the producing process was: stored beside every artifact it writes and copied into records."""
    return {"versions": versions(), "code_revision": code_revision(),
            "produced": datetime.now(timezone.utc).isoformat(timespec="seconds")}
