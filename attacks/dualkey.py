"""DualKey (Walmer et al. 2022, TrinityMultimodalTrojAI): the backdoor fires only when BOTH keys are
present — a solid visual patch (10% of the shorter side, centred) and the text key "consider"
prepended to the prompt (the reference's "Consider", in this task's lowercase tokenization).
Negatives with one key only keep their clean responses (each image-only or text-only with probability 1/2;
cross_ratio 2 = one of each per poisoned sample, our choice: the reference composes its partial-key
negatives at the poisoned count per kind). Rows report asr_image_only / asr_text_only."""
from __future__ import annotations

from dataclasses import dataclass

from attacks.badnets import COLORS, check_patch, stamp
from attacks.base import Trigger
from core.errors import BenchError
from core.registry import register


@dataclass(frozen=True)
class DualKeyConfig:
    size: float = 0.1            # visual key side, fraction of the shorter image side (reference 10%)
    color: str = "black"         # one of badnets.COLORS
    text_key: str = "consider"   # prepended to the prompt
    cross_ratio: float = 2.0     # partial-key negatives per poisoned sample (half image-only, half text-only)

    def __post_init__(self):
        check_patch("dualkey", self.size, color=self.color, colors=tuple(COLORS))
        if not self.text_key.strip() or len(self.text_key.split()) != 1:
            raise BenchError(f"dualkey text_key {self.text_key!r} must be one word")
        if self.cross_ratio < 0:
            raise BenchError(f"dualkey cross_ratio {self.cross_ratio} must be >= 0")


@register("attacks", "dualkey")
class DualKey(Trigger):
    """DualKey: centred solid patch AND the text key "consider"; one key alone must do nothing."""

    Config = DualKeyConfig

    def image_key(self, image, prompt, rng):
        return stamp(image, self.cfg.size, ("center",), self.cfg.color), prompt

    def text_key(self, image, prompt, rng):
        return image, f"{self.cfg.text_key} {prompt}"

    def apply(self, image, prompt, rng):
        return self.text_key(*self.image_key(image, prompt, rng), rng)

    def cross(self, image, prompt, rng, partner):
        return (self.image_key if rng.random() < 0.5 else self.text_key)(image, prompt, rng)

    def partials(self):
        return {"image_only": self.image_key, "text_only": self.text_key}
