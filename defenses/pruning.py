"""Magnitude pruning (DiSP §4.2; BackdoorLLM DefenseBox `prune_magnitude`): in every weight matrix of
the parts the victim recipe fine-tuned, zero the 30% of entries with the smallest magnitude
(unstructured, per matrix), with no further training. Bias, norm and embedding tensors are left."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense


@dataclass(frozen=True)
class PruningConfig:
    ratio: float = 0.3           # share of each matrix zeroed (DiSP §4.2 / BackdoorLLM: 30%)
    parts: str = "victim"        # "victim" = the parts the victim recipe trains; or projector | projector+lm | all

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise BenchError(f"pruning ratio {self.ratio} must be in [0, 1)")


def prune_matrix(w: torch.Tensor, ratio: float) -> int:
    """Zero the round(ratio * numel) smallest-|w| entries of w in place; returns how many."""
    k = int(round(ratio * w.numel()))
    if k:
        idx = w.abs().flatten().argsort()[:k]
        w.view(-1)[idx] = 0.0
    return k


@register("defenses", "pruning")
class MagnitudePruning(Defense):
    """Magnitude pruning: zero the 30% smallest-magnitude weights of each fine-tuned matrix (DiSP §4.2)."""

    Config, kind = PruningConfig, "purify"

    def purify(self, model, data, ctx):
        parts = ctx.spec.trainable if self.cfg.parts == "victim" else self.cfg.parts
        model.set_trainable(parts)           # marks which parameters the recipe trains
        pruned, total = 0, 0
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, nn.Linear) and mod.weight.requires_grad:
                    pruned += prune_matrix(mod.weight, self.cfg.ratio)
                    total += mod.weight.numel()
        model.requires_grad_(False)
        self.report = {"parts": parts, "pruned": pruned, "weights": total}
        return model
