"""Fine-pruning (Liu et al. 2018; BackdoorBench defense/fp.py): neurons a clean input leaves dormant are
where a backdoor can hide. Rank the last LM block's MLP neurons (the SwiGLU hidden units) by their mean
activation on a held-out clean slice, prune the least active in steps of 1% of the layer for as long
as the clean metric stays within 10% of its unpruned value, then fine-tune on the clean slice.

The clean metric is the held-out slice's answer-token accuracy with the whole answer masked (the
first-pass prediction of every answer position against the clean response). A pruned neuron's
gate/up rows and down column are zeroed, and zeroed again after the fine-tune, so it stays pruned."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense
from tasks.base import Sample


@dataclass(frozen=True)
class FinePruningConfig:
    clean_size: int = 50         # held-out clean samples (BackdoorBench: 5% of the data; 50 of our 1,000)
    step: float = 0.01           # share of the layer's neurons pruned per step
    max_drop: float = 0.10       # stop before the clean metric falls by this share of its start value
    epochs: int = 4              # fine-tune epochs on the clean slice afterwards

    def __post_init__(self):
        if self.clean_size < 1 or self.epochs < 0 or not 0 < self.step < 1 or not 0 < self.max_drop < 1:
            raise BenchError("fine-pruning: clean_size >= 1, epochs >= 0, step and max_drop in (0, 1)")


@torch.no_grad()
def clean_token_accuracy(model, samples: Sequence[Sample], gen_length: int) -> float:
    batch = model.collate(list(samples), gen_length=gen_length)
    pe = model.prompt_embeds(batch)
    answer = torch.full_like(batch.response, model.mask_id)
    pred = model.answer_logits(pe, batch.key_mask, answer).argmax(-1)
    return float((pred == batch.response).float().mean())


@torch.no_grad()
def mean_activation(model, samples: Sequence[Sample], gen_length: int) -> torch.Tensor:
    """Mean |SwiGLU hidden activation| per neuron of the last LM block, over the clean slice's tokens."""
    mlp = model.lm.layers[-1].mlp
    acts: list[torch.Tensor] = []
    hook = mlp.down_proj.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].abs().mean((0, 1))))
    try:
        clean_token_accuracy(model, samples, gen_length)
    finally:
        hook.remove()
    return acts[0]


def prune_neurons(model, neurons: torch.Tensor) -> None:
    mlp = model.lm.layers[-1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[neurons] = 0.0
        mlp.up_proj.weight[neurons] = 0.0
        mlp.down_proj.weight[:, neurons] = 0.0


@register("defenses", "fine-pruning")
class FinePruning(Defense):
    """Fine-pruning: prune the last MLP layer's dormant neurons while clean accuracy holds, then fine-tune (BackdoorBench fp.py)."""

    Config, kind = FinePruningConfig, "purify"
    requires = ("masked-diffusion",)   # the clean metric's whole-answer-masked pass

    @property
    def clean_slice(self) -> int:
        return self.cfg.clean_size

    def purify(self, model, data, ctx):
        gen = ctx.spec.train_length          # teacher-forced on clean responses: the training answer window
        clean = ctx.clean
        order = mean_activation(model, clean, gen).argsort()          # least active first
        n = len(order)
        start = clean_token_accuracy(model, clean, gen)
        k, step = 0, max(1, round(self.cfg.step * n))
        while k + step <= n:
            trial = {key: v.clone() for key, v in model.state_dict().items()}
            prune_neurons(model, order[:k + step])
            if clean_token_accuracy(model, clean, gen) < (1 - self.cfg.max_drop) * start:
                model.load_state_dict(trial)
                break
            k += step
        pruned = order[:k]
        if self.cfg.epochs and k:
            ctx.finetune(model, clean, epochs=self.cfg.epochs, desc="fine-pruning fine-tune")
            prune_neurons(model, pruned)
        self.report = {"pruned_neurons": int(k), "layer_neurons": int(n), "clean_acc_start": start,
                       "clean_acc_end": clean_token_accuracy(model, clean, gen)}
        return model
