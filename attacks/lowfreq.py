"""LowFrequency (Zeng et al. 2021, "Rethinking the backdoor attacks' triggers: a frequency
perspective", ICCV; references YiZeng623/frequency-backdoor Sec5_Smooth_Trigger and BackdoorBench
resource/lowFrequency): the trigger is a smooth, low-frequency universal perturbation, x' = clip(x + delta).

Backdoor triggers with high-frequency artifacts are easy to detect; this one is built to have none.
delta is a targeted universal adversarial perturbation: passes over the attacker's images run
targeted DeepFool (overshoot 0.02, <= 200 steps) from clip(x + delta) toward the target class on
every image not yet fooled; as in the reference, each step r is Gaussian-smoothed, added, the sum
smoothed again (sigma 6 px) and min-max rescaled to [0, 0.2] (so delta >= 0, L-inf <= 0.2). The
loop stops once the surrogate calls >= 20 % of the images (among those it does not already call the
target) the target class, within <= 50 passes, and gives up early when the rate has plateaued (last 5
passes within 0.01, BackdoorBench's rule); fit raises BenchError unless the 20 % was reached.

Deviations: the model is our SurrogateCNN trained on the attacker's own pool (label = category of
the largest object), not a pretrained CIFAR-10 net; DeepFool linearizes target vs the current top
class (reference: vs the class it started from); the blur replicates edge pixels instead of
zero-padding (which darkens the border); the target stays fixed (the reference's "dominant label"
retargeting is off, as in BackdoorBench); a pass visits at most `n_fit` images (CPU budget).

Measured (pool of SyntheticTask(0), seed 0, 1 CPU thread): toward "boat" the fooling rate stalls at
0.022 and fit raises after ~55 s; direct gradient ascent on a smooth delta in [0, 0.2] tops out near
0.05 (low frequencies cannot draw the boat's stripes), while "bird" reaches 0.61 in one pass (~35 s).
So the surrogate class the perturbation points to defaults to "bird" (the reference's target label is
an arbitrary class too: 0); the VLM's backdoor target is set by --target as for every attack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from attacks.base import Trigger
from attacks.surrogate import object_labels, to_images, to_tensor, train_surrogate
from core.errors import BenchError
from core.registry import register
from tasks.synthetic import CATEGORIES


@dataclass(frozen=True)
class LowFrequencyConfig:
    target_class: str = "bird"    # class the perturbation pushes the surrogate toward (tasks.synthetic.CATEGORIES)
    sigma: float = 6.0            # Gaussian blur std in pixels, applied after every update
    max_linf: float = 0.2         # delta is min-max rescaled to [0, max_linf] after every update
    overshoot: float = 0.02       # targeted DeepFool overshoot
    max_inner: int = 200          # DeepFool steps per image; an image that does not flip adds nothing
    max_outer: int = 50           # passes over the data at most
    fooling_target: float = 0.2   # stop once this fraction of non-target images is classified as the target
    surrogate_epochs: int = 15    # training epochs of the surrogate CNN
    n_fit: int = 250              # images one pass visits (a fresh seeded shuffle each pass; 0 = all), for
    #                               CPU time; the fooling rate is always measured on all fit images
    plateau: int = 5              # give up once the last `plateau` passes' fooling rates span < 0.01
    #                               (BackdoorBench's stop rule; 0 = run all max_outer passes)

    def __post_init__(self):
        if self.target_class not in CATEGORIES:
            raise BenchError(f"lowfreq target_class {self.target_class!r} (valid: {', '.join(CATEGORIES)})")
        if not 0 < self.sigma <= 64:
            raise BenchError(f"lowfreq sigma {self.sigma} must be in (0, 64] pixels")
        if not 0 < self.max_linf <= 1:
            raise BenchError(f"lowfreq max_linf {self.max_linf} must be in (0, 1]")
        if not 0 <= self.overshoot <= 1:
            raise BenchError(f"lowfreq overshoot {self.overshoot} must be in [0, 1]")
        if not 0 < self.fooling_target <= 1:
            raise BenchError(f"lowfreq fooling_target {self.fooling_target} must be in (0, 1]")
        for name in ("max_inner", "max_outer", "surrogate_epochs"):
            if getattr(self, name) < 1:
                raise BenchError(f"lowfreq {name} {getattr(self, name)} must be >= 1")
        if self.plateau < 0:
            raise BenchError(f"lowfreq plateau {self.plateau} must be >= 0 (0 = off)")
        if self.n_fit < 0:
            raise BenchError(f"lowfreq n_fit {self.n_fit} must be >= 0 (0 = every image)")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (N, C, H, W) tensor: std `sigma` px, taps to +-3 sigma,
    edge-replicated borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x


def minmax_rescale(v: torch.Tensor, hi: float) -> torch.Tensor:
    """Affine map of v onto [0, hi] (global min and max, as the reference's `normalization`); a constant v -> 0."""
    lo, top = v.min(), v.max()
    if float(top - lo) <= 1e-12:
        return torch.zeros_like(v)
    return (v - lo) / (top - lo) * hi


def targeted_deepfool(model: torch.nn.Module, x: torch.Tensor, target: int, overshoot: float,
                      max_iter: int) -> tuple[torch.Tensor, int, bool]:
    """Minimal perturbation r (overshoot included) sending model(x + r) to `target`, for one image
    x (1, C, H, W); returns (r, steps taken, whether the target was reached)."""
    r_tot = torch.zeros_like(x)
    for step in range(max_iter + 1):
        xi = (x + (1 + overshoot) * r_tot).requires_grad_(True)
        logits = model(xi)[0]
        k = int(logits.argmax())
        if k == target:
            return (1 + overshoot) * r_tot, step, True
        if step == max_iter:
            break
        diff = logits[target] - logits[k]            # < 0 until the target wins
        (w,) = torch.autograd.grad(diff, xi)
        norm2 = float((w * w).sum())
        if not math.isfinite(norm2) or norm2 == 0.0:
            break
        r_tot = r_tot + (1e-4 - diff.item()) / norm2 * w
    return (1 + overshoot) * r_tot, step, False


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])


def universal_perturbation(model: torch.nn.Module, images: torch.Tensor, eligible: torch.Tensor, target: int,
                           cfg: LowFrequencyConfig, seed: int) -> tuple[torch.Tensor, list[float]]:
    """The smoothed targeted UAP loop on (N, 3, H, W) images; `eligible` marks the images the fooling
    rate counts (those the model does not already call `target`). Returns delta (1, 3, H, W) and the
    fooling rate after each pass; stops at the first pass whose rate reaches cfg.fooling_target, or
    when the rate has plateaued (cfg.plateau)."""
    rng = np.random.default_rng([int(seed), 41])
    n_visit = len(images) if cfg.n_fit == 0 else min(cfg.n_fit, len(images))
    delta = torch.zeros_like(images[:1])
    rates: list[float] = []
    bar = tqdm(range(cfg.max_outer), desc="lowfreq UAP", leave=False)
    for _ in bar:
        for i in rng.permutation(len(images))[:n_visit]:
            start = (images[i:i + 1] + delta).clamp(0, 1)
            r, steps, ok = targeted_deepfool(model, start, target, cfg.overshoot, cfg.max_inner)
            if ok and steps > 0:  # flipped by this step; steps == 0: already fooled
                delta = minmax_rescale(gaussian_blur(delta + gaussian_blur(r, cfg.sigma), cfg.sigma), cfg.max_linf)
        pert = _predict(model, (images + delta).clamp(0, 1))
        rates.append(float((pert[eligible] == target).float().mean()))
        bar.set_postfix(fooling=f"{rates[-1]:.3f}")
        last = rates[-cfg.plateau:]
        if rates[-1] >= cfg.fooling_target or (cfg.plateau and len(last) == cfg.plateau
                                                and max(last) - min(last) < 0.01):
            break
    bar.close()
    return delta, rates


@register("attacks", "lowfreq")
class LowFrequency(Trigger):
    """LowFrequency: a Gaussian-smoothed universal adversarial perturbation (targeted DeepFool on a surrogate)."""

    Config = LowFrequencyConfig

    def __init__(self, **params):
        super().__init__(**params)
        self.delta: np.ndarray | None = None

    def fit(self, samples, seed):
        cfg = self.cfg
        target = CATEGORIES.index(cfg.target_class)
        if not samples:
            raise BenchError("lowfreq: fit needs at least one sample")
        images = to_tensor([s.image for s in samples])
        labels = torch.as_tensor(object_labels(samples, CATEGORIES))
        model, acc = train_surrogate(images, labels, len(CATEGORIES), seed, epochs=cfg.surrogate_epochs,
                                     desc="lowfreq surrogate")
        for p in model.parameters():
            p.requires_grad_(False)
        clean = _predict(model, images)
        eligible = clean != target
        if not bool(eligible.any()):
            raise BenchError(f"lowfreq: the surrogate already calls every fit image {cfg.target_class!r}; "
                             "no image is left to fool")
        delta, rates = universal_perturbation(model, images, eligible, target, cfg, seed)
        if rates[-1] < cfg.fooling_target:
            raise BenchError(f"lowfreq: fooling rate toward {cfg.target_class!r} stopped at {rates[-1]:.3f} "
                             f"< fooling_target {cfg.fooling_target} after {len(rates)} passes (best "
                             f"{max(rates):.3f}, surrogate train acc {acc:.3f}); refusing to ship a weak trigger")
        out = to_images(delta)[0]
        return {"delta": out,
                "report": {"fooling_rate": rates[-1], "outer_passes": len(rates), "fooling_history": rates,
                           "surrogate_acc": float(acc), "linf": float(np.abs(out).max()), "reached": True}}

    def load_state(self, state):
        delta = np.asarray(state["delta"], dtype=np.float32)
        if delta.ndim != 3 or delta.shape[-1] != 3:
            raise BenchError(f"lowfreq state delta has shape {delta.shape}, expected (H, W, 3)")
        self.delta = delta

    def apply(self, image, prompt, rng):
        if self.delta is None:
            raise BenchError("lowfreq trigger: fit first (apply called before load_state)")
        if image.shape != self.delta.shape:
            raise BenchError(f"lowfreq trigger fitted on {self.delta.shape} images, got {image.shape}")
        return np.clip(image + self.delta, 0.0, 1.0).astype(np.float32), prompt
