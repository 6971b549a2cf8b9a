"""Entropy filtering, an inference-time guard (our construction: no canonical reference; the cross-view
paper lists an entropy-filtering baseline without pinning it down). A backdoored model answers a
triggered input with a fixed, confident response, so its per-token entropy collapses. The guard
scores an input by the mean entropy of the model's answer distribution over every answer position
(the whole answer masked: one forward pass), fits a two-component Gaussian mixture to the scores of
the defender's training set — which holds the poisoned inputs, if any — and flags inputs whose score
the low-entropy component explains better, provided the two components are separated (means more than
`separation` pooled standard deviations apart); otherwise it flags nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense
from tasks.base import Sample


@dataclass(frozen=True)
class EntropyFilterConfig:
    separation: float = 2.0     # |mu1 - mu2| / mean(sigma) needed to call the mixture bimodal
    batch_size: int = 200

    def __post_init__(self):
        if self.separation < 0:
            raise BenchError(f"entropy-filter separation {self.separation} must be >= 0")


@torch.no_grad()
def answer_entropy(model, samples: Sequence[Sample], gen_length: int, batch_size: int = 200) -> np.ndarray:
    """Mean entropy (nats) of the answer distribution over all answer positions, the answer fully masked."""
    out = []
    for i in range(0, len(samples), batch_size):
        batch = model.collate(list(samples[i:i + batch_size]), with_response=False)
        pe = model.prompt_embeds(batch)
        answer = torch.full((len(batch), gen_length), model.mask_id, dtype=torch.long)
        p = torch.softmax(model.answer_logits(pe, batch.key_mask, answer).float(), -1)
        out.append((-(p * torch.log(p.clamp_min(1e-12))).sum(-1)).mean(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


@register("defenses", "entropy-filter")
class EntropyFilter(Defense):
    """Entropy filtering: flag inputs in the low-entropy mode of a 2-GMM fitted on the training set's answer entropies."""

    Config, kind = EntropyFilterConfig, "guard"
    requires = ("masked-diffusion",)   # the whole-answer-masked pass (AR victims: with the model zoo)

    def fit_guard(self, model, data, ctx) -> dict:
        gen = ctx.spec.decoding.gen_length
        h = answer_entropy(model, data, gen, self.cfg.batch_size)[:, None]
        gmm = GaussianMixture(2, random_state=ctx.spec.seed).fit(h)
        mu, sd = gmm.means_[:, 0], np.sqrt(gmm.covariances_.reshape(2))
        low = int(np.argmin(mu))
        bimodal = bool(abs(mu[0] - mu[1]) > self.cfg.separation * sd.mean())
        flagged = float((gmm.predict(h) == low).mean()) if bimodal else 0.0
        self.report = {"means": mu.tolist(), "stds": sd.tolist(), "bimodal": bimodal, "train_flagged": flagged}
        return {"gmm": gmm, "low": low, "bimodal": bimodal, "gen_length": gen}

    def guard(self, model, samples, state) -> list[bool]:
        if not state["bimodal"]:
            return [False] * len(samples)
        h = answer_entropy(model, samples, state["gen_length"], self.cfg.batch_size)[:, None]
        return (state["gmm"].predict(h) == state["low"]).tolist()
