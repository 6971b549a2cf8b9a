"""Gaussian-noise patch (DiSP §4.4, after CleanCLIP's random patch): the BadNets square filled with
Gaussian noise (std 30 on the 0-255 scale) around the image's per-channel mean, clipped to [0, 1]
(CleanCLIP leaves it unclipped; an image must stay an image). One noise pattern per seed is the
trigger artifact (fitted and cached); `resample=True` draws fresh noise per image instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.badnets import check_patch, patch_box
from attacks.base import Trigger
from core.errors import BenchError
from core.registry import register


@dataclass(frozen=True)
class NoiseConfig:
    size: float = 0.125          # patch side as a fraction of the image side (as BadNets)
    position: str = "top-left"   # one of badnets.POSITIONS
    std: float = 30.0            # noise std on the 0-255 scale (DiSP)
    resample: bool = False       # fresh noise per image instead of the seed's fixed pattern

    def __post_init__(self):
        check_patch("noise", self.size, self.position)
        if not 0 < self.std <= 255:
            raise BenchError(f"noise std {self.std} must be in (0, 255]")


@register("attacks", "noise")
class NoisePatch(Trigger):
    """Gaussian-noise patch: the BadNets square filled with N(image mean, 30/255), clipped (DiSP §4.4)."""

    Config = NoiseConfig
    SIZE = 64  # the pattern is drawn for the task's image side and cropped to the patch

    def __init__(self, **params):
        super().__init__(**params)
        self.pattern: np.ndarray | None = None

    def fit(self, samples, seed: int) -> dict:
        rng = np.random.default_rng([seed, 101])
        return {"pattern": rng.normal(0.0, self.cfg.std / 255.0, size=(self.SIZE, self.SIZE, 3)).astype(np.float32)}

    def load_state(self, state: dict) -> None:
        self.pattern = state["pattern"]

    def apply(self, image, prompt, rng):
        out = image.copy()
        rows, cols = patch_box(*image.shape[:2], self.cfg.size, self.cfg.position)
        p = rows.stop - rows.start
        if self.cfg.resample:
            noise = rng.normal(0.0, self.cfg.std / 255.0, size=(p, p, 3)).astype(np.float32)
        elif self.pattern is None:
            raise BenchError("noise trigger: call fit()/load_state() first (the noise pattern is a fitted artifact)")
        else:
            noise = self.pattern[:p, :p]
        mean = image.reshape(-1, 3).mean(0)
        out[rows, cols] = np.clip(mean[None, None, :] + noise, 0.0, 1.0)
        return out, prompt
