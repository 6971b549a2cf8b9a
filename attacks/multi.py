"""Multi-trigger (DiSP App. D, after CleanCLIP's `four_corners`): the BadNets patch stamped at all four
corners, spreading the trigger over four visual tokens."""
from __future__ import annotations

from dataclasses import dataclass

from attacks.badnets import patch_box
from attacks.base import Trigger
from bench.errors import BenchError
from bench.registry import register

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class MultiConfig:
    size: float = 0.125      # side of each patch as a fraction of the image side (as BadNets)
    color: str = "black"     # black | white

    def __post_init__(self):
        if self.color not in ("black", "white"):
            raise BenchError(f"multi color {self.color!r} (valid: black, white)")
        if not 0 < self.size <= 0.5:
            raise BenchError(f"multi size {self.size} must be in (0, 0.5]")


@register("attacks", "multi")
class MultiPatch(Trigger):
    """Multi-trigger: the BadNets patch at all four corners (DiSP App. D)."""

    Config = MultiConfig

    def apply(self, image, prompt, rng):
        out = image.copy()
        for corner in CORNERS:
            rows, cols = patch_box(*image.shape[:2], self.cfg.size, corner)
            out[rows, cols] = 0.0 if self.cfg.color == "black" else 1.0
        return out, prompt
