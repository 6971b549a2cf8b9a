"""The defense contract: what a defender is handed, and the hooks of the stage where it acts.

Hooks (a defense sets ``kind`` and implements the hook of the stage where it acts; the pipeline
dispatches on ``kind``, and the defended stage's key and the record's lineage follow from it):
- ``purify(model, data, ctx) -> model``: post-training, on the backdoored model and its training set
  (DiSP, pruning, fine-pruning). Descends from the backdoored model.
- ``filter_data(data, model, ctx) -> kept samples``: data-side, given the training set and the
  backdoored model; the victim recipe is re-run from the base model on what is kept (random drop,
  oracle, BYE). The record reports how many poisoned and clean samples were removed (the defense
  never learns it).
- ``objective(model, batch, ctx) -> loss``: training-time, a term added to the victim's loss at
  every step of the implant fine-tune, which starts from the base model on the poisoned set
  (cross-view): its row descends from base + poisoned set, not from the backdoored model.
- ``fit_guard(model, data, ctx) -> state`` then ``guard(model, samples) -> flags``: inference-time;
  the guard is fitted once (e.g. a threshold on clean inputs) and stored with the defended stage;
  flagged inputs abstain. An abstention is neither an attack success nor a correct clean answer, and
  the record reports the abstention rate on clean and on triggered inputs (STRIP, entropy filtering).

The defender's view (docs/protocol.md#the-defenders-view). A real defender holds images, prompts and
responses, nothing else. A defense with ``uses_oracle = False`` therefore receives:
- the training set as ``Sample(image, prompt, response, meta={"id": opaque})``, in a secret order
  (``defender_view``): no scene, references, answers, poison or cross flags, and ids that do not
  encode the pool index;
- ``DefenderSpec``: model, scale, recipe, decoding, trainable parts, prompt template, model args, its
  own args and a defender seed derived from (not equal to) the task seed — no attack, target, poison
  rate, task args or task seed;
- ``ctx.clean``: only when the defense declares ``clean_slice = N > 0``, N held-out clean samples from
  the task's defender split (disjoint from the pool and every test split), in the same view.
Only a defense with ``uses_oracle = True`` gets the samples as poisoned (with their flags); every record
and table marks such a row.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from tasks.base import Sample


@dataclass(frozen=True)
class DefenderSpec:
    """The part of a run's spec a defender may know."""

    model: str
    scale: str
    trainable: str
    recipe: object          # bench.spec.Recipe: lr, epochs, batch_size, train_length
    decoding: object        # bench.spec.Decoding
    prompt_template: str
    model_args: tuple
    defense: str
    defense_args: tuple
    seed: int               # the defender's own seed, derived from the task seed by a one-way hash

    @property
    def train_length(self) -> int:
        """The answer window training fits responses into (the recipe's, else the decoding's gen_length)."""
        n = getattr(self.recipe, "train_length", None)
        return int(n) if n is not None else int(self.decoding.gen_length)


def defender_seed(seed: int) -> int:
    """A seed for the defender's randomness that does not reveal the task seed (one-way, 31 bits)."""
    return int.from_bytes(hashlib.sha256(f"defender-seed:{seed}".encode()).digest()[:4], "big") >> 1


def view_order(n: int, secret: str) -> np.ndarray:
    """The secret order of a defender's view: view[j] is samples[view_order(n, secret)[j]]."""
    digest = hashlib.sha256(secret.encode()).digest()
    return np.random.default_rng(list(digest[:16])).permutation(n)


def defender_view(samples: Sequence[Sample], secret: str) -> list[Sample]:
    """Samples as a defender holds them: image, prompt, response and an opaque id, in an order drawn
    from ``secret`` (a digest the defender never sees). Images are copied, so nothing is shared."""
    digest = hashlib.sha256(secret.encode()).digest()
    order = view_order(len(samples), secret)
    out = []
    for i in order:
        s = samples[int(i)]
        opaque = hashlib.sha256(digest + str(s.meta.get("id", i)).encode()).hexdigest()[:12]
        out.append(Sample(np.array(s.image, dtype=np.float32), s.prompt, s.response, {"id": opaque}))
    return out


@dataclass
class DefenseContext:
    """What a defense may use besides the model and the training set (both in the view above)."""

    spec: DefenderSpec              # recipe, decoding, the defender seed, the defense's args
    finetune: Callable              # finetune(model, samples, epochs=..., trainable=..., desc=...) -> losses
    base_model: Callable            # () -> a fresh copy of the clean base model (for retraining defenses)
    log: Callable[[str], None] = print
    clean: list[Sample] = field(default_factory=list)   # held-out clean slice, when clean_slice > 0


class Defense:
    Config: type
    uses_oracle: bool = False       # True: receives poison flags (the oracle); marked in records and tables
    clean_slice: int = 0            # held-out clean samples the defense needs (0: none)
    kind: str = "purify"            # purify | filter | objective | guard | none
    requires: tuple[str, ...] = ()  # victim capabilities the defense needs (models.base.CAPABILITIES)

    def __init__(self, **params):
        self.cfg = self.Config(**params)
        self.report: dict = {}      # what the defense measured about itself, stored in the record

    def purify(self, model, data: Sequence[Sample], ctx: DefenseContext):
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} defense")

    def filter_data(self, data: Sequence[Sample], model, ctx: DefenseContext) -> list[Sample]:
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} defense")

    def objective(self, model, batch, ctx: DefenseContext):
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} defense")

    def fit_guard(self, model, data: Sequence[Sample], ctx: DefenseContext) -> dict:
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} defense")

    def guard(self, model, samples: Sequence[Sample], state: dict) -> list[bool]:
        """True = flagged: the input abstains."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.kind} defense")
