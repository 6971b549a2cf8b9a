"""Name -> factory registries for attacks, targets, defenses, models and tasks.

In-tree entries register with a decorator (``@register("defenses", "disp")``); a package outside this
repo adds entries through the entry-point groups ``bench.attacks|targets|defenses|models|tasks``
(each entry point names the object to register under its own name). ``bench list`` shows them all.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

from core.errors import BenchError

KINDS = ("attacks", "targets", "defenses", "models", "tasks")
# The in-tree modules whose import registers the built-in entries.
BUILTIN_MODULES = (
    "tasks.synthetic",
    "tasks.cc_sbu_align",
    "tasks.flickr8k_dogs",
    "tasks.coco_captions",
    "tasks.flickr30k",
    "attacks.badnets",
    "attacks.noise",
    "attacks.multi",
    "attacks.blended",
    "attacks.lowfreq",
    "attacks.wanet",
    "attacks.inputaware",
    "attacks.dualkey",
    "attacks.targets",
    "models.llada_v",
    "models.lavida",
    "models.llava",
    "models.blip2",
    "models.flamingo",
    "defenses.none",
    "defenses.disp",
    "defenses.random_drop",
    "defenses.oracle_filter",
    "defenses.pruning",
    "defenses.strip",
    "defenses.crossview",
    "defenses.entropy_filter",
    "defenses.fine_pruning",
    "defenses.bye",
)

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_loaded = False


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: register ``obj`` under ``name`` in registry ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry {kind!r}; valid: {', '.join(KINDS)}")

    def deco(obj: Any) -> Any:
        _REGISTRY[kind][name] = obj
        return obj

    return deco


def load_all() -> None:
    """Import the built-in modules and every installed entry point (once)."""
    global _loaded
    if _loaded:
        return
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    for kind in KINDS:
        for ep in entry_points(group=f"bench.{kind}"):
            _REGISTRY[kind].setdefault(ep.name, ep.load())
    _loaded = True


def reload_entry_points() -> None:
    """Forget the load marker so newly installed distributions are seen (tests, notebooks)."""
    global _loaded
    _loaded = False
    load_all()


def names(kind: str) -> list[str]:
    load_all()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> Any:
    """The registered object, or a BenchError naming the valid choices."""
    load_all()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        singular = kind[:-1]
        raise BenchError(f"unknown {singular} {name!r} (valid: {', '.join(names(kind))})") from None
