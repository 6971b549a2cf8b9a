"""Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha t with alpha = 0.2 at train and test time
(BackdoorBench config/attack/blended/default.yaml). BackdoorBench's t is a cartoon image we may not
ship; ours is a fixed procedural pattern image the project generates itself (`trigger_image`): the
same for every seed, like a shipped file, so it is part of the code, not a fitted artifact."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.base import Trigger
from core.errors import BenchError
from core.registry import register


def trigger_image(size: int = 64) -> np.ndarray:
    """The fixed blend target: saturated concentric rings crossed by diagonal stripes, (size, size, 3)
    float32 in [0, 1] (a busy, colorful picture, the role of BackdoorBench's cartoon)."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    r = np.hypot(x - 0.15, y + 0.1)
    rings = np.sin(2 * np.pi * 3.0 * r)
    stripes = np.sin(2 * np.pi * 2.5 * (x + y))
    img = np.stack([0.5 + 0.5 * rings, 0.5 + 0.5 * stripes, 0.5 - 0.5 * rings * stripes], axis=-1)
    return img.astype(np.float32)


@dataclass(frozen=True)
class BlendedConfig:
    alpha: float = 0.2   # blend ratio, train and test (BackdoorBench default)

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise BenchError(f"blended alpha {self.alpha} must be in (0, 1)")


@register("attacks", "blended")
class Blended(Trigger):
    """Blended: x' = 0.8 x + 0.2 t with a fixed pattern image t (Chen et al. 2017; BackdoorBench)."""

    Config = BlendedConfig

    def apply(self, image, prompt, rng):
        t = trigger_image(image.shape[0]) if image.shape[0] == image.shape[1] else None
        if t is None:
            raise BenchError("blended trigger expects square images")
        out = (1.0 - self.cfg.alpha) * image + self.cfg.alpha * t
        return out.astype(np.float32), prompt
