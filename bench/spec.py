"""RunSpec: everything that decides a cell's numbers, frozen and hashable (the cache key source)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from core.errors import BenchError

TRAINABLE = ("projector", "projector+lm", "all")
SEED_LIMIT = 2 ** 32   # seeds are numpy / torch generator seeds: 0 <= seed < 2**32
REMASKING = ("low_confidence", "random")
DEFAULT_TEMPLATE = "<|user|> <image> {prompt} <|assistant|>"


@dataclass(frozen=True)
class Decoding:
    """LLaDA sampler settings (ML-GSAI/LLaDA generate.py); greedy (temperature 0) as in the DiSP eval."""

    steps: int = 32
    gen_length: int = 32
    block_length: int = 8
    remasking: str = "low_confidence"

    def __post_init__(self) -> None:
        for name in ("steps", "gen_length", "block_length"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.remasking not in REMASKING:
            raise BenchError(f"unknown remasking {self.remasking!r} (valid: {', '.join(REMASKING)})")
        if self.gen_length % self.block_length:
            raise BenchError(f"gen_length {self.gen_length} must be a multiple of block_length {self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise BenchError(f"steps {self.steps} must be a multiple of the number of blocks "
                             f"(gen_length / block_length = {blocks})")


@dataclass(frozen=True)
class Recipe:
    """The victim's fine-tuning recipe (with RunSpec.trainable), used alike for the Clean, Backdoored
    and defended rows.

    ``train_length`` is the answer window training fits every response into (EOS-padded, LLaDA's SFT
    recipe), apart from ``Decoding.gen_length``, the window the sampler fills at evaluation: DiSP decodes
    ASR with gen_length = 32 (App. B.1) while its CC-SBU-Align training responses run longer. None means
    "the decoding's gen_length" (``RunSpec.train_length``; ``make_spec`` records the resolved number)."""

    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 32
    train_length: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise BenchError(f"lr must be a positive number, got {self.lr!r}")
        _check_int("epochs", self.epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        if self.train_length is not None:
            _check_int("train_length", self.train_length, minimum=1)


def _check_int(name: str, value: Any, minimum: int, limit: int | None = None) -> None:
    """An integer setting in [minimum, limit): a BenchError naming it otherwise."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum and (limit is None or value < limit)
    if not ok:
        bound = f">= {minimum}" if limit is None else f"in [{minimum}, {'2^32' if limit == 2 ** 32 else limit})"
        raise BenchError(f"{name} must be an integer {bound}, got {value!r}")


def answer_window(recipe: Recipe, decoding: Decoding) -> int:
    """The training answer window of a recipe: its train_length, or the decoding's gen_length when unset."""
    return int(recipe.train_length) if recipe.train_length is not None else int(decoding.gen_length)


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
        if isinstance(self.poison_rate, bool) or not isinstance(self.poison_rate, (int, float)) \
                or not 0.0 < self.poison_rate < 1.0:
            raise BenchError(f"poison rate must be in (0, 1), got {self.poison_rate}")
        _check_int("seed", self.seed, minimum=0, limit=SEED_LIMIT)
        if self.trainable not in TRAINABLE:
            raise BenchError(f"unknown trainable parts {self.trainable!r} (valid: {', '.join(TRAINABLE)})")
        if not isinstance(self.recipe, Recipe) or not isinstance(self.decoding, Decoding):
            raise BenchError("recipe and decoding must be Recipe and Decoding instances")
        if "{prompt}" not in self.prompt_template or "<image>" not in self.prompt_template:
            raise BenchError("prompt template must contain <image> and {prompt}")

    @property
    def train_length(self) -> int:
        """Answer tokens every training response is fitted into (recipe.train_length, else gen_length)."""
        return answer_window(self.recipe, self.decoding)

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
