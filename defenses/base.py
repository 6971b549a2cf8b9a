"""The defense contract: a defense implements only the hooks of the stage where it acts.

- ``purify(model, data, ctx) -> model``: post-training, on the backdoored model and its training set
  (DiSP, pruning, fine-pruning).
- ``filter_data(data, model, ctx) -> data``: data-side; the victim recipe is re-run from the base
  model on what is kept (random drop, oracle, BYE).
- ``objective(model, batch, ctx) -> loss``: a training-time regularizer added to the victim's loss
  while implanting (cross-view).
- ``guard(model, batch, ctx) -> bool tensor``: inference-time detection; flagged inputs abstain
  (STRIP, entropy filtering).
No defense other than the oracle (``uses_oracle = True``) may read ``meta["poisoned"]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from tasks.base import Sample


@dataclass
class DefenseContext:
    """What a defense may use besides the model and the (unlabelled) training set."""

    spec: object                    # the RunSpec (recipe, decoding, seed, defense args)
    finetune: Callable              # finetune(model, samples, epochs=..., trainable=..., desc=...) -> losses
    base_model: Callable            # () -> a fresh copy of the clean base model (for retraining defenses)
    log: Callable[[str], None] = print


class Defense:
    Config: type
    uses_oracle: bool = False
    kind: str = "purify"            # purify | filter | objective | guard | none

    def __init__(self, **params):
        self.cfg = self.Config(**params)
        self.report: dict = {}      # what the defense measured about itself, stored in the record

    def purify(self, model, data: Sequence[Sample], ctx: DefenseContext):
        raise NotImplementedError
