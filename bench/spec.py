"""RunSpec: everything that decides a cell's numbers, frozen and hashable (the cache key source)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from core.errors import BenchError

TRAINABLE = ("projector", "projector+lm", "all")
REMASKING = ("low_confidence", "random")
DEFAULT_TEMPLATE = "<|user|> <image> {prompt} <|assistant|>"


@dataclass(frozen=True)
class Decoding:
    """LLaDA sampler settings (ML-GSAI/LLaDA generate.py); greedy (temperature 0) as in the DiSP eval."""

    steps: int = 32
    gen_length: int = 32
    block_length: int = 8
    remasking: str = "low_confidence"


@dataclass(frozen=True)
class Recipe:
    """The victim's fine-tuning recipe (with RunSpec.trainable), used alike for the Clean, Backdoored
    and defended rows."""

    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 32


def freeze(params: Mapping[str, Any] | None) -> tuple:
    """A params dict as a sorted tuple of pairs, so a frozen spec can hold it."""
    return tuple(sorted((params or {}).items()))


@dataclass(frozen=True)
class RunSpec:
    """One cell: (model, scale, task, attack, target, poison rate, defense, seed) plus the settings
    that decide its numbers. ``*_args`` hold the *resolved* method parameters (defaults filled in)."""

    model: str = "llada-v"
    scale: str = "tiny"
    task: str = "synthetic"
    attack: str = "badnets"
    target: str = "insertion"
    poison_rate: float = 0.2
    defense: str = "disp"
    seed: int = 0
    trainable: str = "projector+lm"   # parts every fine-tune of this cell updates: projector | projector+lm | all
    recipe: Recipe = field(default_factory=Recipe)
    decoding: Decoding = field(default_factory=Decoding)
    prompt_template: str = DEFAULT_TEMPLATE
    model_args: tuple = ()
    task_args: tuple = ()
    attack_args: tuple = ()
    target_args: tuple = ()
    defense_args: tuple = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.poison_rate < 1.0:
            raise BenchError(f"poison rate must be in (0, 1), got {self.poison_rate}")
        if self.trainable not in TRAINABLE:
            raise BenchError(f"unknown trainable parts {self.trainable!r} (valid: {', '.join(TRAINABLE)})")
        if self.decoding.remasking not in REMASKING:
            raise BenchError(f"unknown remasking {self.decoding.remasking!r} (valid: {', '.join(REMASKING)})")
        if self.decoding.gen_length % self.decoding.block_length:
            raise BenchError("gen_length must be a multiple of block_length")
        if self.decoding.steps % (self.decoding.gen_length // self.decoding.block_length):
            raise BenchError("steps must be a multiple of the number of blocks")
        if "{prompt}" not in self.prompt_template or "<image>" not in self.prompt_template:
            raise BenchError("prompt template must contain <image> and {prompt}")

    def args(self, kind: str) -> dict:
        """The resolved params of one part: kind in model|task|attack|target|defense."""
        return dict(getattr(self, f"{kind}_args"))

    def replace(self, **changes) -> "RunSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The record's `spec` field: plain JSON, params as dicts."""
        out = asdict(self)
        for f in fields(self):
            if f.name.endswith("_args"):
                out[f.name] = dict(getattr(self, f.name))
        return out


def digest(obj: Any) -> str:
    """Stable sha256 of a JSON-able object (sorted keys): the content address of a stage."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
