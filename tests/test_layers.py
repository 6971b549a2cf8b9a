"""The packages import one way: core <- tasks <- attacks <- models <- defenses <- bench."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["core", "tasks", "attacks", "models", "defenses", "bench"]


def imported_packages(path: Path) -> set[str]:
    """Top-level in-repo packages a module imports (anywhere in the file, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(ORDER)


@pytest.mark.parametrize("package", ORDER)
def test_a_package_imports_only_the_layers_below_it(package):
    allowed = set(ORDER[:ORDER.index(package) + 1])
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) - allowed)
           for p in sorted((ROOT / package).glob("*.py")) if imported_packages(p) - allowed}
    assert not bad, f"{package} imports layers above it: {bad}"


def test_the_checker_sees_a_violation(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from bench.pipeline import Cell\n")
    assert imported_packages(p) == {"bench"}
