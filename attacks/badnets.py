"""BadNets (Gu et al. 2017): a solid square patch stamped on the image.

DiSP default: black patch, top-left corner (LaViDa runs: center). Size is a fraction of the image
side: DiSP's 20 px patch on raw images; we default to 1/8 (8 px at 64 px, one encoder patch when
aligned to a corner). Classic BackdoorBench variant: white, 3/32 of the side, bottom-right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.base import Trigger
from core.errors import BenchError
from core.registry import register

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")
COLORS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0),
          "blue": (0.0, 0.0, 1.0), "magenta": (1.0, 0.0, 1.0)}


def check_patch(what: str, size: float, position: str | None = None, color: str | None = None,
                colors: tuple[str, ...] = ("black", "white")) -> None:
    """Validate the fields every square-patch trigger shares (BadNets, noise, multi, DualKey)."""
    if position is not None and position not in POSITIONS:
        raise BenchError(f"{what} position {position!r} (valid: {', '.join(POSITIONS)})")
    if color is not None and color not in colors:
        raise BenchError(f"{what} color {color!r} (valid: {', '.join(colors)})")
    if not 0 < size <= 0.5:
        raise BenchError(f"{what} size {size} must be in (0, 0.5]")


@dataclass(frozen=True)
class BadNetsConfig:
    size: float = 0.125          # patch side as a fraction of the image side
    position: str = "top-left"   # one of POSITIONS
    color: str = "black"         # black | white

    def __post_init__(self):
        check_patch("badnets", self.size, self.position, self.color)


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


def stamp(image: np.ndarray, size: float, positions: tuple[str, ...], color: str) -> np.ndarray:
    """A copy of `image` with a solid `color` square of side `size` at each named position."""
    out = image.copy()
    for position in positions:
        rows, cols = patch_box(*image.shape[:2], size, position)
        out[rows, cols] = COLORS[color]
    return out


@register("attacks", "badnets")
class BadNets(Trigger):
    """BadNets: a solid square patch (default black, 1/8 of the side, top-left corner)."""

    Config = BadNetsConfig

    def apply(self, image, prompt, rng):
        return stamp(image, self.cfg.size, (self.cfg.position,), self.cfg.color), prompt


@dataclass(frozen=True)
class ClassicBadNetsConfig(BadNetsConfig):
    size: float = 3 / 32
    position: str = "bottom-right"
    color: str = "white"


@register("attacks", "badnets-classic")
class ClassicBadNets(BadNets):
    """BadNets, classic variant: white square, 3/32 of the side, bottom-right (BackdoorBench)."""

    Config = ClassicBadNetsConfig
