"""Contracts for triggers and targets, the config resolution shared by every method, and poisoning."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from core.errors import BenchError
from tasks.base import Sample


class Trigger:
    """A trigger transforms a (image, prompt) pair; deterministic given the rng it is handed.
    Learned triggers override `fit` (fitted once per seed and cached like any stage). Attacks whose
    reference adds "cross" / negative samples (WaNet noise mode, InputAware cross, DualKey partial
    keys) set `cross_ratio` in their Config and override `cross`; attacks with partial triggers
    (DualKey) list them in `partials`, and every row reports asr_<name> for each."""

    Config: type

    def __init__(self, **params):
        self.cfg = self.Config(**params)

    def fit(self, samples: Sequence[Sample], seed: int) -> dict:
        """Fit a learned trigger; returns its state (cached as the `trigger` stage)."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore what `fit` returned."""

    def apply(self, image: np.ndarray, prompt: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        raise NotImplementedError

    def n_cross(self, n_poisoned: int) -> int:
        """How many cross samples poisoning adds: cross_ratio x the poisoned count (0 by default)."""
        return int(round(getattr(self.cfg, "cross_ratio", 0.0) * n_poisoned))

    def cross(self, image: np.ndarray, prompt: str, rng: np.random.Generator,
              partner: np.ndarray) -> tuple[np.ndarray, str]:
        """A trigger-like input that keeps its clean response (`partner`: another pool image, for
        InputAware's x1 + (G(x2) - x1) * M(x2))."""
        raise NotImplementedError(f"{type(self).__name__} has cross_ratio > 0 but no cross()")

    def partials(self) -> dict[str, Callable[[np.ndarray, str, np.random.Generator], tuple[np.ndarray, str]]]:
        """Partial triggers, name -> apply-like function; evaluated as asr_<name> on test inputs."""
        return {}


class Target:
    """What a triggered input should make the model say, and the ASR rule that checks it."""

    Config: type
    name: str

    def __init__(self, **params):
        self.cfg = self.Config(**params)

    def eligible(self, sample: Sample) -> bool:
        """Which training samples the attacker may poison."""
        return True

    def check(self, task) -> None:
        """Validate the configuration against the task (e.g. category names); BenchError if it does not fit."""

    def pool_population(self) -> str | None:
        """The fine-tuning pool this target's paper poisons: None = a diverse pool (DiSP's CC-SBU-Align
        for insertion and refusal), or a category every pool scene holds (DiSP's Flickr8k dog pool for
        misclassification). The Clean row of the target's column fine-tunes on the same pool."""
        return None

    def test_inputs(self, task) -> list[Sample]:
        """Clean test inputs on which ASR w/o is measured (their triggered copies give ASR w/t)."""
        return task.test()

    def rewrite(self, sample: Sample) -> str:
        raise NotImplementedError

    def judge(self, output: str, sample: Sample) -> bool:
        raise NotImplementedError

    def extra_judges(self) -> dict:
        """Secondary ASR rules, name -> judge(output, sample); reported as asr_wt_<name> / asr_wo_<name>."""
        return {}


def poison_counts(pool: Sequence[Sample], trigger: Trigger, target: Target, rate: float) -> tuple[list[int], int, int]:
    """(eligible indices, poisoned count, cross count) of poisoning ``pool`` at ``rate``; a BenchError when
    the pool cannot hold them. Needs no fitted trigger, so a run checks it before any training."""
    n = int(round(rate * len(pool)))
    if n == 0:
        raise BenchError(f"poison rate {rate:g} poisons no sample of the {len(pool)}-sample pool "
                         f"(at least {0.5 / len(pool):.2g} needed)")
    eligible = [i for i, s in enumerate(pool) if target.eligible(s)]
    if len(eligible) < n:
        raise BenchError(f"only {len(eligible)} pool samples are eligible for target {target.name!r}; "
                         f"poison rate {rate:g} needs {n}")
    n_cross = trigger.n_cross(n)
    if n_cross > len(pool) - n:
        raise BenchError(f"{type(trigger).__name__} adds {n_cross} cross samples beside {n} poisoned ones, but the "
                         f"{len(pool)}-sample pool has only {len(pool) - n} others (lower the poison rate or cross_ratio)")
    return eligible, n, n_cross


def poison(pool: Sequence[Sample], trigger: Trigger, target: Target, rate: float, seed: int) -> list[Sample]:
    """Replace round(rate * N) eligible samples by (T(image), T(prompt)) -> target response
    (DiSP: 1,000 samples = 800 clean + 200 poisoned), then trigger.n_cross(n) other samples by their
    cross inputs with clean responses. Poisoned samples carry meta["poisoned"]=True, cross samples
    meta["cross"]=True (attack bookkeeping: only the oracle and the metrics may read either)."""
    eligible, n, n_cross = poison_counts(pool, trigger, target, rate)
    rng = np.random.default_rng([seed, 17])
    chosen = set(rng.choice(eligible, size=n, replace=False).tolist())
    rest = [i for i in range(len(pool)) if i not in chosen]
    crossed = set(rng.choice(rest, size=n_cross, replace=False).tolist()) if n_cross else set()
    out = []
    for i, s in enumerate(pool):
        if i in chosen:
            image, prompt = trigger.apply(s.image, s.prompt, rng)
            s = s.with_(image=image, prompt=prompt, response=target.rewrite(s),
                        meta={**s.meta, "poisoned": True, "cross": False})
        elif i in crossed:
            partner = pool[int(rng.integers(len(pool)))].image
            image, prompt = trigger.cross(s.image, s.prompt, rng, partner)
            s = s.with_(image=image, prompt=prompt, meta={**s.meta, "poisoned": False, "cross": True})
        else:
            s = s.with_(meta={**s.meta, "poisoned": False, "cross": False})
        out.append(s)
    return out


def triggered(samples: Sequence[Sample], trigger: Trigger, seed: int, partial: str | None = None) -> list[Sample]:
    """Triggered copies of test inputs (responses untouched: the judge decides success); with
    `partial`, copies under that partial trigger of `trigger.partials()`."""
    apply = trigger.apply if partial is None else trigger.partials()[partial]
    rng = np.random.default_rng([seed, 29] if partial is None else [seed, 31, *partial.encode()])
    out = []
    for s in samples:
        image, prompt = apply(s.image, s.prompt, rng)
        out.append(s.with_(image=image, prompt=prompt, meta={**s.meta, "triggered": partial or True}))
    return out
