"""Contracts for triggers and targets, the config resolution shared by every method, and poisoning."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Sequence

import numpy as np

from bench.errors import BenchError
from tasks.base import Sample


def resolve_config(config_cls: type, overrides: dict[str, Any], what: str) -> dict:
    """Fill a method's Config dataclass from overrides (strings from the CLI are coerced to the
    field's type); unknown keys or uncoercible values are a BenchError naming the valid keys."""
    valid = {f.name: f for f in fields(config_cls)}
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise BenchError(f"unknown {what} arg(s) {unknown} (valid: {', '.join(valid) or 'none'})")
    defaults = asdict(config_cls())
    out = {}
    for key, value in overrides.items():
        kind = type(defaults[key])
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1")
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if kind is bool and not isinstance(value, bool):
                raise ValueError(value)
            out[key] = kind(value)
        except (TypeError, ValueError):
            raise BenchError(f"{what} arg {key}={value!r} is not a {kind.__name__} "
                             f"(valid: {', '.join(valid)})") from None
    return asdict(config_cls(**out))


class Trigger:
    """A trigger transforms a (image, prompt) pair; deterministic given the rng it is handed.
    Learned triggers override `fit` (fitted once per seed and cached like any stage)."""

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


class Target:
    """What a triggered input should make the model say, and the ASR rule that checks it."""

    Config: type
    name: str

    def __init__(self, **params):
        self.cfg = self.Config(**params)

    def eligible(self, sample: Sample) -> bool:
        """Which training samples the attacker may poison."""
        return True

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


def poison(pool: Sequence[Sample], trigger: Trigger, target: Target, rate: float, seed: int) -> list[Sample]:
    """Replace round(rate * N) eligible samples by (T(image), T(prompt)) -> target response
    (DiSP: 1,000 samples = 800 clean + 200 poisoned). Poisoned samples carry meta["poisoned"]=True."""
    rng = np.random.default_rng([seed, 17])
    n = int(round(rate * len(pool)))
    if n == 0:
        raise BenchError(f"poison rate {rate} poisons no sample of a {len(pool)}-sample pool")
    eligible = [i for i, s in enumerate(pool) if target.eligible(s)]
    if len(eligible) < n:
        raise BenchError(f"only {len(eligible)} pool samples are eligible for target {target.name!r}, "
                         f"poison rate {rate} needs {n}")
    chosen = set(rng.choice(eligible, size=n, replace=False).tolist())
    out = []
    for i, s in enumerate(pool):
        if i in chosen:
            image, prompt = trigger.apply(s.image, s.prompt, rng)
            s = s.with_(image=image, prompt=prompt, response=target.rewrite(s), meta={**s.meta, "poisoned": True})
        else:
            s = s.with_(meta={**s.meta, "poisoned": False})
        out.append(s)
    return out


def triggered(samples: Sequence[Sample], trigger: Trigger, seed: int) -> list[Sample]:
    """Triggered copies of test inputs (responses untouched: the judge decides success)."""
    rng = np.random.default_rng([seed, 29])
    out = []
    for s in samples:
        image, prompt = trigger.apply(s.image, s.prompt, rng)
        out.append(s.with_(image=image, prompt=prompt, meta={**s.meta, "triggered": True}))
    return out
