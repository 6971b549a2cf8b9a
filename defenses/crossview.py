"""Cross-view regularization (the cross-view paper, §3.2-3.5): a training-time defense. At every step of
the victim's fine-tune each sample is also seen as a second view whose image has one random local patch
perturbed, and three terms join the task loss (Eq. 17):

    L = L_task + lambda1 L_patch + lambda2 L_cv-dis + lambda3 L_ent

- L_patch (Eq. 12) = mean over the batch of ||phi(x) - phi(x~)||^2, phi a middle-layer multimodal feature;
- L_cv-dis (Eq. 14) = mean over supervised positions of cos(p, p~), the two views' token distributions,
  *minimised*: a backdoor answers both views identically, a clean sample need not;
- L_ent (Eq. 16) = mean over supervised positions of max(0, H0 - H(p)), against over-confidence.

The second view (§3.2): a square patch of 1-5% of the image area at a uniform position is masked (set to
0), replaced by uniform noise, or shuffled (its pixels permuted), one of the three at random.

Our choices where the paper is silent (it publishes no code; this is the first public implementation):
- supervised positions (the paper's Omega, Eq. 13) are the victim's own: for a masked-diffusion victim
  the masked answer positions of an LLaDA SFT draw (t ~ U(0, 1), mask with p = (1 - 1e-3) t + 1e-3),
  the same noisy answer for both views; for an autoregressive one the answer tokens (teacher forcing);
- phi is the victim's own middle-layer feature (`model.phi_module()`, reduced per sample by
  `model.phi_pool`): the middle LM block averaged over the visual positions for LLaDA-V, LaViDa and
  LLaVA, the Q-Former output averaged over the queries for BLIP-2, so the squared norm runs over the
  feature width (the paper's phi is "the middle layer's multimodal feature");
- the lambda weights and H0 have no published values: lambda1 = 0.1 and lambda3 = 0.1 (Fig. 3 shows both
  as stabilisers whose effect saturates), lambda2 = 1.0 (Fig. 3: the term that drives ASR down), H0 =
  0.5 nats; all are config fields recorded in every spec.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense
from models.base import Batch

OPS = ("mask", "noise", "shuffle")


@dataclass(frozen=True)
class CrossViewConfig:
    lambda1: float = 0.1          # L_patch weight (our choice, module docstring)
    lambda2: float = 1.0          # L_cv-dis weight
    lambda3: float = 0.1          # L_ent weight
    h0: float = 0.5               # entropy floor H0, nats
    area_min: float = 0.01        # patch area as a share of the image (§3.2: 1-5%)
    area_max: float = 0.05

    def __post_init__(self):
        if min(self.lambda1, self.lambda2, self.lambda3, self.h0) < 0:
            raise BenchError("crossview lambdas and h0 must be >= 0")
        if not 0 < self.area_min <= self.area_max < 1:
            raise BenchError(f"crossview area range ({self.area_min}, {self.area_max}) must satisfy 0 < min <= max < 1")


def perturb_patch(images: torch.Tensor, g: torch.Generator, area_min: float = 0.01,
                  area_max: float = 0.05) -> tuple[torch.Tensor, list[tuple[int, int, int, str]]]:
    """The second view (§3.2): per image, one square patch of a uniform 1-5% of the area at a uniform
    position, masked / noise-replaced / shuffled. Returns the views and (row, col, side, op) per image."""
    out = images.clone()
    B, H, W, _ = images.shape
    boxes = []
    for b in range(B):
        area = area_min + (area_max - area_min) * float(torch.rand(1, generator=g))
        side = max(1, round(math.sqrt(area * H * W)))
        r = int(torch.randint(0, H - side + 1, (1,), generator=g))
        c = int(torch.randint(0, W - side + 1, (1,), generator=g))
        op = OPS[int(torch.randint(0, len(OPS), (1,), generator=g))]
        patch = out[b, r:r + side, c:c + side]
        if op == "mask":
            patch.zero_()
        elif op == "noise":
            patch.copy_(torch.rand(patch.shape, generator=g))
        else:
            flat = patch.reshape(-1, patch.shape[-1])
            patch.copy_(flat[torch.randperm(len(flat), generator=g)].reshape(patch.shape))
        boxes.append((r, c, side, op))
    return out, boxes


def l_patch(phi: torch.Tensor, phi2: torch.Tensor) -> torch.Tensor:
    """Eq. 12: (1/B) sum_b ||phi(x_b) - phi(x~_b)||^2, phi (B, d)."""
    return ((phi - phi2) ** 2).sum(-1).mean()


def l_cv_dis(p: torch.Tensor, p2: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Eq. 14: (1/|Omega|) sum_{(b,t) in Omega} cos(p_bt, p~_bt); p, p2 (B, T, V), omega (B, T) bool."""
    return F.cosine_similarity(p[omega], p2[omega], dim=-1).mean()


def l_ent(p: torch.Tensor, omega: torch.Tensor, h0: float) -> torch.Tensor:
    """Eq. 15-16: (1/|Omega|) sum_{(b,t) in Omega} max(0, H0 - H_bt), H the entropy (nats) of p_bt."""
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return F.relu(h0 - h[omega]).mean()


def crossview_terms(model, batch: Batch, images2: torch.Tensor, g: torch.Generator, h0: float) -> dict:
    """L_patch, L_cv-dis and L_ent of one batch (Eq. 12, 14, 16), for either family: the supervised
    positions Omega are the victim's own (`supervised_positions`: masked answer positions of one
    LLaDA draw for a diffusion victim, the answer tokens for an autoregressive one), shared by both views."""
    answer, omega = model.supervised_positions(batch, g)
    feats: list[torch.Tensor] = []
    hook = model.phi_module().register_forward_hook(
        lambda mod, inp, out: feats.append(out if torch.is_tensor(out) else out[0]))
    try:
        z = model.view_logits(batch, answer)
        z2 = model.view_logits(dataclasses.replace(batch, images=images2), answer)
    finally:
        hook.remove()
    phi, phi2 = (model.phi_pool(f, batch) for f in feats)
    p1, p2 = F.softmax(z.float(), -1), F.softmax(z2.float(), -1)
    if not omega.any():
        zero = z.sum() * 0
        return {"patch": l_patch(phi, phi2), "cv_dis": zero, "ent": zero}
    return {"patch": l_patch(phi, phi2), "cv_dis": l_cv_dis(p1, p2, omega), "ent": l_ent(p1, omega, h0)}


@register("defenses", "crossview")
class CrossView(Defense):
    """Cross-view regularization: a patch-perturbed second view, feature consistency, cross-view output discrepancy, entropy floor."""

    Config, kind = CrossViewConfig, "objective"

    def objective(self, model, batch, ctx):
        if not hasattr(self, "_g"):
            self._g = torch.Generator().manual_seed(ctx.spec.seed)
            self._sums, self._steps = {"patch": 0.0, "cv_dis": 0.0, "ent": 0.0}, 0
        cfg = self.cfg
        images2, _ = perturb_patch(batch.images, self._g, cfg.area_min, cfg.area_max)
        terms = crossview_terms(model, batch, images2, self._g, cfg.h0)
        self._steps += 1
        for k, v in terms.items():
            self._sums[k] += float(v.detach())
        self.report = {f"mean_{k}": v / self._steps for k, v in self._sums.items()} | {"steps": self._steps}
        return cfg.lambda1 * terms["patch"] + cfg.lambda2 * terms["cv_dis"] + cfg.lambda3 * terms["ent"]
