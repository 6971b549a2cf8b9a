"""STRIP (Gao et al. 2019; garrisongys/STRIP, BackdoorBench detection_infer/strip.py) as an
inference-time guard: superimpose the input image with N held-out clean images and measure the entropy
of the model's output distribution on each blend; a trigger that dominates the output keeps the
entropy low whatever it is blended with. Inputs whose mean entropy falls below the threshold that
flags 1% of clean held-out inputs (the false-rejection rate) abstain.

For a VLM the "output distribution" is the first answer token's, with the whole answer masked (the
same forward pass CP uses). Deviation: the reference adds the two images at full weight
(`cv2.addWeighted(x, 1, overlay, 1, 0)`), which saturates our light synthetic scenes to white; we blend
them at equal weight. The clean slice (held out, disjoint from the pool and every test split) supplies
both the overlays and the threshold."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense
from tasks.base import Sample


@dataclass(frozen=True)
class STRIPConfig:
    n_overlay: int = 100     # blends per input (STRIP: N = 100), drawn from as many held-out clean images
    frr: float = 0.01        # share of clean held-out inputs flagged: the threshold's quantile (STRIP: 1%)
    alpha: float = 0.5       # weight of the overlay in the blend (deviation, see the module docstring)
    batch_size: int = 400

    def __post_init__(self):
        if self.n_overlay < 2:
            raise BenchError(f"strip n_overlay {self.n_overlay} must be >= 2")
        if not 0 < self.frr < 1 or not 0 < self.alpha < 1:
            raise BenchError(f"strip frr {self.frr} and alpha {self.alpha} must be in (0, 1)")


@torch.no_grad()
def strip_entropy(model, samples: Sequence[Sample], overlays: np.ndarray, alpha: float, gen_length: int,
                  batch_size: int = 400) -> np.ndarray:
    """Mean entropy (nats) of the first answer token's distribution over each input's blends with every overlay."""
    flat = [(i, s.with_(image=((1 - alpha) * s.image + alpha * o).astype(np.float32)))
            for i, s in enumerate(samples) for o in overlays]
    ent = np.zeros(len(samples))
    for k in range(0, len(flat), batch_size):
        chunk = flat[k:k + batch_size]
        logits = model.first_answer_logits(model.collate([s for _, s in chunk], with_response=False), gen_length=gen_length)
        p = torch.softmax(logits.float(), -1)
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        for (i, _), v in zip(chunk, h.tolist()):
            ent[i] += v / len(overlays)
    return ent


@register("defenses", "strip")
class STRIP(Defense):
    """STRIP: flag inputs whose output entropy stays low under blending with clean images; flagged inputs abstain."""

    Config, kind = STRIPConfig, "guard"

    @property
    def clean_slice(self) -> int:
        return self.cfg.n_overlay

    def fit_guard(self, model, data, ctx) -> dict:
        overlays = np.stack([s.image for s in ctx.clean])
        gen = ctx.spec.decoding.gen_length
        # each clean input is blended with the other clean images (never with itself)
        held = np.array([strip_entropy(model, [s], np.delete(overlays, i, axis=0), self.cfg.alpha, gen,
                                       self.cfg.batch_size)[0] for i, s in enumerate(ctx.clean)])
        threshold = float(np.quantile(held, self.cfg.frr))
        self.report = {"threshold": threshold, "n_overlay": len(overlays), "clean_entropy_mean": float(held.mean())}
        return {"threshold": threshold, "overlays": overlays, "gen_length": gen}

    def guard(self, model, samples, state) -> list[bool]:
        h = strip_entropy(model, samples, state["overlays"], self.cfg.alpha, state["gen_length"], self.cfg.batch_size)
        return (h < state["threshold"]).tolist()
