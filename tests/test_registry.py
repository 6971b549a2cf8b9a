"""Registry: decorator, helpful unknown-name error, third-party entry points."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core import registry
from core.errors import BenchError


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty registry that skips the built-in modules and is restored afterwards."""
    monkeypatch.setattr(registry, "BUILTIN_MODULES", ())
    monkeypatch.setattr(registry, "_REGISTRY", {kind: {} for kind in registry.KINDS})
    monkeypatch.setattr(registry, "_loaded", False)


def test_decorator_registers(fresh_registry: None) -> None:
    @registry.register("attacks", "toy")
    class Toy:
        pass

    assert registry.get("attacks", "toy") is Toy
    assert "toy" in registry.names("attacks")


def test_unknown_name_lists_valid_ones(fresh_registry: None) -> None:
    registry.register("defenses", "alpha")(object)
    registry.register("defenses", "beta")(object)
    with pytest.raises(BenchError, match=r"unknown defense 'gamma' \(valid: alpha, beta\)"):
        registry.get("defenses", "gamma")
    with pytest.raises(ValueError):
        registry.register("nonsense", "x")


def test_entry_point_from_installed_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fresh_registry: None) -> None:
    (tmp_path / "thirdparty_defense.py").write_text("class MyDefense:\n    name = 'my-defense'\n")
    info = tmp_path / "thirdparty_defense-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-defense\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bench.defenses]\nmy-defense = thirdparty_defense:MyDefense\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "thirdparty_defense", raising=False)

    registry.reload_entry_points()

    cls = registry.get("defenses", "my-defense")
    assert cls.__name__ == "MyDefense" and cls.__module__ == "thirdparty_defense"
    assert cls is sys.modules["thirdparty_defense"].MyDefense
    assert "my-defense" in registry.names("defenses")


@pytest.mark.parametrize("model", ["llada-v", "lavida", "llava", "blip2", "openflamingo", "otter"])
def test_every_model_entry_resolves_scales_alike(model: str) -> None:
    """One resolver (models.base.scale_resolver) behind every entry: tiny args are the config's fields,
    unknown keys and scales are refused with the same sorted, deterministic message."""
    entry = registry.get("models", model)
    args = entry.resolve("tiny", {})
    assert isinstance(args, dict) and "weights" not in args
    with pytest.raises(BenchError, match=rf"^unknown scale 'huge' for {model} \(valid: tiny, full\)$"):
        entry.resolve("huge", {})
    with pytest.raises(BenchError) as err:
        entry.resolve("tiny", {"bogus": 1, "zzz": 2})
    head, valid = str(err.value).split(" (valid: ")
    assert head == "unknown model arg(s) ['bogus', 'zzz']"
    names = valid.rstrip(")").split(", ")
    assert names == sorted(args)
    with pytest.raises(BenchError, match=f"scale 'full' for {model} needs --weights"):
        entry.build(entry.resolve("full", {}), None, "", 0)
