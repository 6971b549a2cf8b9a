"""Method parameters: CLI strings and dict overrides checked and coerced against a method's defaults."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

from core.errors import BenchError

def coerce_params(overrides: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict:
    """Overrides checked against the defaults' keys and coerced to each default's type (CLI strings
    welcome); an unknown key or an uncoercible value is a BenchError naming the valid keys."""
    valid = ", ".join(defaults) or "none"
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise BenchError(f"unknown {what} arg(s) {unknown} (valid: {valid})")
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
            raise BenchError(f"{what} arg {key}={value!r} is not a {kind.__name__} (valid: {valid})") from None
    return out

def resolve_config(config_cls: type, overrides: dict[str, Any], what: str) -> dict:
    """Fill a method's Config dataclass from overrides (coerced by `coerce_params`)."""
    return asdict(config_cls(**coerce_params(overrides, asdict(config_cls()), what)))
