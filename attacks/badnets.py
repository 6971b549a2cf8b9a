"""BadNets (Gu et al. 2017): a solid square patch stamped on the image.

DiSP default: black patch, top-left corner (LaViDa runs: center). Size is a fraction of the image
side: DiSP's 20 px patch on raw images; we default to 1/8 (8 px at 64 px, one encoder patch when
aligned to a corner). Classic BackdoorBench variant: white, 3/32 of the side, bottom-right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.base import Trigger
from bench.registry import register

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


@dataclass(frozen=True)
class BadNetsConfig:
    size: float = 0.125          # patch side as a fraction of the image side
    position: str = "top-left"   # one of POSITIONS
    color: str = "black"         # black | white

    def __post_init__(self):
        from bench.errors import BenchError
        if self.position not in POSITIONS:
            raise BenchError(f"badnets position {self.position!r} (valid: {', '.join(POSITIONS)})")
        if self.color not in ("black", "white"):
            raise BenchError(f"badnets color {self.color!r} (valid: black, white)")
        if not 0 < self.size <= 0.5:
            raise BenchError(f"badnets size {self.size} must be in (0, 0.5]")


def patch_box(h: int, w: int, size: float, position: str) -> tuple[slice, slice]:
    """Rows/cols of a square patch of side round(size*min(h,w)) at the named position."""
    p = max(1, int(round(size * min(h, w))))
    top = {"top": 0, "bottom": h - p}
    left = {"left": 0, "right": w - p}
    if position == "center":
        r, c = (h - p) // 2, (w - p) // 2
    else:
        vert, horiz = position.split("-")
        r, c = top[vert], left[horiz]
    return slice(r, r + p), slice(c, c + p)


@register("attacks", "badnets")
class BadNets(Trigger):
    """BadNets: a solid square patch (default black, 1/8 of the side, top-left corner)."""

    Config = BadNetsConfig

    def apply(self, image, prompt, rng):
        out = image.copy()
        rows, cols = patch_box(*image.shape[:2], self.cfg.size, self.cfg.position)
        out[rows, cols] = 0.0 if self.cfg.color == "black" else 1.0
        return out, prompt


@dataclass(frozen=True)
class ClassicBadNetsConfig(BadNetsConfig):
    size: float = 3 / 32
    position: str = "bottom-right"
    color: str = "white"


@register("attacks", "badnets-classic")
class ClassicBadNets(BadNets):
    """BadNets, classic variant: white square, 3/32 of the side, bottom-right (BackdoorBench)."""

    Config = ClassicBadNetsConfig
