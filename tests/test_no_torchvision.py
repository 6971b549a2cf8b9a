"""torchvision must never be in the project's environment, and no project module may import it.

The only torchvision build the registry serves for our torch pin here is a CUDA one: installing it
breaks `import torch`'s vision ops and, through transformers' image utilities (which import torchvision
whenever it is present), `import transformers` too (pyproject.toml, docs/victims.md). Packages that
pull it in (open_clip, timm, lmms-eval) go in with `--no-deps`. This test imports nothing from it: it
asks the import system and the installed distributions, and reads our sources as syntax trees.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "venv", "__pycache__", "build", "dist", "node_modules"}


def test_torchvision_is_not_installed():
    assert importlib.util.find_spec("torchvision") is None, "torchvision is importable: uninstall it"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("torchvision")


def project_sources() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if not SKIP & set(p.relative_to(ROOT).parts)]


def imports_of(path: Path) -> set[str]:
    """Top-level names of every module a file imports (`import a.b`, `from a.b import c`, and string
    arguments of `importlib.import_module` / `__import__`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            found.add(node.args[0].value.split(".")[0])
    return found


def test_no_project_module_imports_torchvision():
    files = project_sources()
    assert any(p.parts[-2:] == ("models", "llava.py") for p in files)          # the scan sees the packages
    offenders = [str(p.relative_to(ROOT)) for p in files if "torchvision" in imports_of(p)]
    assert offenders == []


def test_the_scan_would_catch_an_import(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from torchvision.transforms import functional\n    return importlib.import_module('torchvision')\n")
    assert "torchvision" in imports_of(f)
