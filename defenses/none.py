"""No defense: the backdoored model is evaluated as is."""
from __future__ import annotations

from dataclasses import dataclass

from core.registry import register
from defenses.base import Defense


@dataclass(frozen=True)
class NoneConfig:
    pass


@register("defenses", "none")
class NoDefense(Defense):
    """No defense: only the Clean and Backdoored rows."""

    Config, kind = NoneConfig, "none"

    def purify(self, model, data, ctx):
        return model
