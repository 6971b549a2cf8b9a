"""Data filtering with an oracle (DiSP §4.2): remove exactly the poisoned samples and re-run the victim
recipe from the base model — the upper bound of any data filter. It is the one defense that sees the
poison flags (``uses_oracle``); every record and table marks its row "(oracle)". Cross samples (attack
bookkeeping that keeps clean responses: WaNet noise mode, InputAware cross, DualKey one-key negatives)
stay, as they carry no target response."""
from __future__ import annotations

from dataclasses import dataclass

from core.registry import register
from defenses.base import Defense


@dataclass(frozen=True)
class OracleFilterConfig:
    pass


@register("defenses", "oracle-filter")
class OracleFilter(Defense):
    """Oracle data filtering: remove exactly the poisoned samples, retrain from the base (upper bound; sees poison flags)."""

    Config, kind, uses_oracle = OracleFilterConfig, "filter", True

    def filter_data(self, data, model, ctx):
        kept = [s for s in data if not s.meta["poisoned"]]
        self.report = {"n_train": len(data), "removed": len(data) - len(kept)}
        return kept
