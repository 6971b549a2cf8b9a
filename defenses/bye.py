"""BYE (XuankunRong/BYE, `bye.py`): poisoned samples make the model's attention collapse onto the
trigger. For every training sample and every LM layer, take the entropy of the attention the last
prompt token pays to the image tokens; per layer, fit a two-component Gaussian mixture to those
entropies and call the layer sensitive when |mu1 - mu2| > 2 (sigma1 + sigma2); a sample's score is its
mean entropy over the sensitive layers; a second two-component mixture over the scores marks the
low-entropy cluster, which is dropped, and the victim recipe re-runs from the base on the rest.

BYE was designed for autoregressive generation (DiSP §2.3, §4.2 point this out). In a bidirectional
masked-diffusion model we read the same token — the last prompt token, just before the fully masked
answer — which sees the image exactly as it does in an autoregressive model. With no sensitive layer
nothing is dropped (recorded)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense
from models.base import IMAGE_ATTENTION


@dataclass(frozen=True)
class BYEConfig:
    separation: float = 2.0      # a layer is sensitive when |mu1 - mu2| > separation * (sigma1 + sigma2)
    batch_size: int = 100

    def __post_init__(self):
        if self.separation < 0:
            raise BenchError(f"bye separation {self.separation} must be >= 0")


def gmm2(x: np.ndarray, seed: int) -> tuple[GaussianMixture, np.ndarray, np.ndarray]:
    g = GaussianMixture(2, random_state=seed).fit(x[:, None])
    return g, g.means_[:, 0], np.sqrt(g.covariances_.reshape(2))


@register("defenses", "bye")
class BYE(Defense):
    """BYE: drop the samples whose attention to the image has low entropy in the sensitive layers; retrain (XuankunRong/BYE)."""

    Config, kind = BYEConfig, "filter"
    requires = (IMAGE_ATTENTION,)

    def filter_data(self, data, model, ctx):
        gen, seed = ctx.spec.decoding.gen_length, ctx.spec.seed
        ents = []
        for i in range(0, len(data), self.cfg.batch_size):
            a = model.image_attention(model.collate(list(data[i:i + self.cfg.batch_size]), with_response=False), gen)
            ents.append((-(a * torch.log(a.clamp_min(1e-12))).sum(-1)).numpy())
        E = np.concatenate(ents)                         # (N, n_layers)
        sensitive = []
        for layer in range(E.shape[1]):
            _, mu, sd = gmm2(E[:, layer], seed)
            if abs(mu[0] - mu[1]) > self.cfg.separation * (sd[0] + sd[1]):
                sensitive.append(layer)
        self.report = {"sensitive_layers": sensitive, "n_train": len(data)}
        if not sensitive:
            self.report["dropped"] = 0
            return list(data)
        score = E[:, sensitive].mean(1)
        g, mu, _ = gmm2(score, seed)
        drop = g.predict(score[:, None]) == int(np.argmin(mu))
        self.report["dropped"] = int(drop.sum())
        return [s for s, d in zip(data, drop) if not d]
