"""Multi-trigger (DiSP App. D, after CleanCLIP's `four_corners`): the BadNets patch stamped at all four
corners, spreading the trigger over four visual tokens."""
from __future__ import annotations

from dataclasses import dataclass

from attacks.badnets import check_patch, stamp
from attacks.base import Trigger
from core.registry import register

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class MultiConfig:
    size: float = 0.125      # side of each patch as a fraction of the image side (as BadNets)
    color: str = "black"     # black | white

    def __post_init__(self):
        check_patch("multi", self.size, color=self.color)


@register("attacks", "multi")
class MultiPatch(Trigger):
    """Multi-trigger: the BadNets patch at all four corners (DiSP App. D)."""

    Config = MultiConfig

    def apply(self, image, prompt, rng):
        return stamp(image, self.cfg.size, CORNERS, self.cfg.color), prompt
