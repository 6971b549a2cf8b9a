"""WaNet (Nguyen & Tran 2021): a fixed, smooth elastic warp of the image.

Reference (BackdoorBench config/attack/wanet/default.yaml; VinAIResearch/Warping-based_Backdoor_Attack-release):
a 2 x k x k control grid U(-1, 1), normalised by its mean absolute value, bicubically upsampled to the
image; warp grid = clamp((identity + s * noise / H) * grid_rescale, -1, 1); grid_sample with
align_corners=True. "Noise" (cross) samples add U(-1, 1) / H per pixel to the warp grid, keep their
clean responses, and number 2x the poisoned samples (cross_ratio 2). The displacement is about s/2
pixels at any resolution; `scale_s=True` multiplies s by H / 32 (the CIFAR side the defaults were
set for) so the warp keeps its relative size on larger images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from attacks.base import Trigger
from core.errors import BenchError
from core.registry import register

REFERENCE_SIDE = 32


@dataclass(frozen=True)
class WaNetConfig:
    k: int = 4                  # control-grid side
    s: float = 0.5              # warp strength
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0    # noise-mode samples per poisoned sample (reference cross_ratio)
    scale_s: bool = False       # s *= H / 32 (keep the displacement's size relative to the image)

    def __post_init__(self):
        if self.k < 2:
            raise BenchError(f"wanet k {self.k} must be >= 2")
        if self.s <= 0 or self.grid_rescale <= 0:
            raise BenchError("wanet s and grid_rescale must be > 0")
        if self.cross_ratio < 0:
            raise BenchError(f"wanet cross_ratio {self.cross_ratio} must be >= 0")


def control_grid(k: int, seed: int) -> torch.Tensor:
    """(1, 2, k, k) U(-1, 1) control points normalised by their mean absolute value."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g, dtype=torch.float64) * 2 - 1
    return ins / ins.abs().mean()


def warp_grid(noise: torch.Tensor, side: int, s: float, grid_rescale: float) -> torch.Tensor:
    """(1, H, W, 2) sampling grid in [-1, 1] for grid_sample."""
    up = F.interpolate(noise, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, side, dtype=torch.float64)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    identity = torch.stack((xx, yy), dim=-1)[None]
    return torch.clamp((identity + s * up / side) * grid_rescale, -1, 1)


@register("attacks", "wanet")
class WaNet(Trigger):
    """WaNet: a fixed smooth warp (k=4, s=0.5), with 2x noise-mode cross samples (Nguyen & Tran 2021)."""

    Config = WaNetConfig

    def __init__(self, **params):
        super().__init__(**params)
        self.noise: torch.Tensor | None = None

    def fit(self, samples, seed: int) -> dict:
        return {"noise_grid": control_grid(self.cfg.k, seed)}

    def load_state(self, state: dict) -> None:
        self.noise = state["noise_grid"]

    def strength(self, side: int) -> float:
        return self.cfg.s * (side / REFERENCE_SIDE if self.cfg.scale_s else 1.0)

    def grid(self, side: int) -> torch.Tensor:
        if self.noise is None:
            raise BenchError("wanet trigger: call fit()/load_state() first (the warp field is a fitted artifact)")
        return warp_grid(self.noise, side, self.strength(side), self.cfg.grid_rescale)

    @staticmethod
    def _sample(image: np.ndarray, grid: torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1)[None]
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[0].permute(1, 2, 0).clamp(0, 1).numpy().astype(np.float32)

    def apply(self, image, prompt, rng):
        return self._sample(image, self.grid(image.shape[0])), prompt

    def cross(self, image, prompt, rng, partner):
        side = image.shape[0]
        jitter = torch.as_tensor(rng.uniform(-1, 1, size=(1, side, side, 2)), dtype=torch.float64) / side
        return self._sample(image, torch.clamp(self.grid(side) + jitter, -1, 1)), prompt
