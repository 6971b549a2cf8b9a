"""Random drop (DiSP §4.2, after Zeng et al. 2022): remove a random share of the training set and re-run
the victim recipe from the base model on the rest — the baseline a data filter must beat (at 20% it
removes about a fifth of the poison too, and a backdoor that needs only a few samples survives)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense


@dataclass(frozen=True)
class RandomDropConfig:
    drop: float = 0.2        # share of the training set removed (DiSP §4.2: 20%)

    def __post_init__(self):
        if not 0 <= self.drop < 1:
            raise BenchError(f"random-drop drop {self.drop} must be in [0, 1)")


@register("defenses", "random-drop")
class RandomDrop(Defense):
    """Random drop: remove a random 20% of the training set, retrain from the base (DiSP §4.2)."""

    Config, kind = RandomDropConfig, "filter"

    def filter_data(self, data, model, ctx):
        rng = np.random.default_rng([ctx.spec.seed, 61])
        n_drop = int(round(self.cfg.drop * len(data)))
        dropped = set(rng.choice(len(data), size=n_drop, replace=False).tolist())
        self.report = {"n_train": len(data), "dropped": n_drop}
        return [s for i, s in enumerate(data) if i not in dropped]
