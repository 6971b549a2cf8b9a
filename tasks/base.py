"""The sample record every stage passes around."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One image-instruction pair.

    image: float32 array (H, W, 3) in [0, 1].  prompt / response: plain text.
    meta: task facts (id, kind, objects, references...).  ``meta["poisoned"]`` is set only by the
    poisoning step; only the oracle defense and the metrics may read it.
    """

    image: np.ndarray
    prompt: str
    response: str
    meta: dict = field(default_factory=dict)

    def with_(self, **changes) -> "Sample":
        return replace(self, **changes)
