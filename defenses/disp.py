"""DiSP — Diffusion Self-Purification (DiSP paper §3.3, Alg. 1).

1. Saliency: for each training input, the Fisher–Jacobian quadratic form of the first-block answer
   logits w.r.t. replacing visual token i by the mask embedding (Eq. 5), estimated with Hutchinson
   probes restricted to the top-K logits per position (Eq. 6–8). All probes run in one batched
   backward pass.
2. Masked inference: the top floor(ratio * T_img) visual tokens are held at e_MASK for the whole
   denoising (Eq. 9–10) and every training response is re-generated with the same prompt.
3. Recovery: the compromised model is fine-tuned on (original image, prompt, purified response)
   for a tenth to a fifth of the implant epochs.
Ablations (§4.5): `disp-nomask` (re-generate without masking) and `disp-random` (same ratio, random tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from core.errors import BenchError
from core.registry import register
from defenses.base import Defense, DefenseContext
from models.base import MASKED_DIFFUSION, Batch
from tasks.base import Sample

MASK_MODES = ("saliency", "none", "random")


@dataclass(frozen=True)
class DiSPConfig:
    mask_ratio: float = 0.3          # LLaDA-V 0.3, LaViDa 0.5 (paper §4.1)
    n_probes: int = 6                # Hutchinson probes
    top_k: int = 5                   # logits kept per answer position
    mask: str = "saliency"           # saliency | none (ablation) | random (ablation)
    recovery_frac: float = 0.2       # recovery epochs = max(1, round(frac * implant epochs)); paper 1/10-1/5
    trainable: str = "victim"        # parts the recovery trains; "victim" = the victim recipe's
    batch_size: int = 64             # inputs per saliency / generation batch

    def __post_init__(self):
        if self.mask not in MASK_MODES:
            raise BenchError(f"disp mask {self.mask!r} (valid: {', '.join(MASK_MODES)})")
        if not 0 <= self.mask_ratio < 1:
            raise BenchError(f"disp mask_ratio {self.mask_ratio} must be in [0, 1)")
        for name in ("n_probes", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise BenchError(f"disp {name} must be >= 1, got {getattr(self, name)}")
        if not self.recovery_frac >= 0:
            raise BenchError(f"disp recovery_frac must be >= 0, got {self.recovery_frac}")


def _first_block_topk(model, batch: Batch, visual: torch.Tensor, block_length: int, gen_length: int, top_k: int):
    """Top-K first-block answer logits with the whole answer masked: values (differentiable) and indices."""
    pe = model.prompt_embeds(batch, visual=visual)
    answer = torch.full((len(batch), gen_length), model.mask_id, dtype=torch.long)
    z = model.answer_logits(pe, batch.key_mask, answer)[:, :block_length]
    idx = z.detach().topk(top_k, dim=-1).indices
    return z.gather(-1, idx), idx


def saliency(model, batch: Batch, block_length: int, gen_length: int, n_probes: int = 6, top_k: int = 5,
             generator: torch.Generator | None = None, batched: bool = True) -> torch.Tensor:
    """Hutchinson estimate of score_i = ½ δ_iᵀ Jᵀ F J δ_i, δ_i = e_MASK − e_i (Eq. 5–8). Returns (B, T_img).

    Probe q = √p ⊙ (y − (y·√p)√p), y ~ N(0, I) has E[qqᵀ] = diag(p) − ppᵀ = F (softmax Fisher), so
    E[(∂⟨q,z⟩/∂e_i · δ_i)²] = δ_iᵀ Jᵀ F J δ_i. batched=True stacks all probes along the batch and
    backpropagates once; batched=False loops one backward pass per probe (the benchmark's baseline)."""
    visual = model.visual_embeds(batch.images).detach()
    delta = model.mask_embedding().detach() - visual                       # (B, T, d)
    B = len(batch)

    def probe_grads(rep: int, vis_rep: torch.Tensor, b: Batch) -> torch.Tensor:
        vis_rep = vis_rep.clone().requires_grad_(True)
        z, _ = _first_block_topk(model, b, vis_rep, block_length, gen_length, top_k)
        sp = torch.softmax(z.detach(), -1).sqrt()
        y = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)   # drawn on the CPU stream at any scale
        q = sp * (y - (y * sp).sum(-1, keepdim=True) * sp)
        (g,) = torch.autograd.grad((q * z).sum(), vis_rep)
        return (g * delta.repeat(rep, 1, 1)).sum(-1)                       # (rep*B, T)

    if batched:
        idx = torch.arange(B).repeat(n_probes)
        proj = probe_grads(n_probes, visual[idx], batch[idx]).view(n_probes, B, -1)
    else:
        proj = torch.stack([probe_grads(1, visual, batch) for _ in range(n_probes)])
    return (0.5 * proj.float().pow(2).mean(0)).cpu()


def exact_saliency(model, batch: Batch, block_length: int, gen_length: int, top_k: int = 5) -> torch.Tensor:
    """The exact quadratic form ½ (Jδ_i)ᵀ F (Jδ_i) via forward-mode JVPs, one per visual token (for tests)."""
    visual = model.visual_embeds(batch.images).detach()
    delta = model.mask_embedding().detach() - visual
    with torch.no_grad():
        z0, idx = _first_block_topk(model, batch, visual, block_length, gen_length, top_k)
    p = torch.softmax(z0, -1)

    def f(v):
        pe = model.prompt_embeds(batch, visual=v)
        answer = torch.full((len(batch), gen_length), model.mask_id, dtype=torch.long)
        return model.answer_logits(pe, batch.key_mask, answer)[:, :block_length].gather(-1, idx)

    scores = torch.zeros(visual.shape[:2])
    for i in range(visual.shape[1]):
        d = torch.zeros_like(visual)
        d[:, i] = delta[:, i]
        # double-backward JVP: the fused CPU attention kernel has no derivative of its backward
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            _, jd = torch.autograd.functional.jvp(f, visual, d)
        quad = (p * jd.pow(2)).sum(-1) - (p * jd).sum(-1).pow(2)           # Jδᵀ (diag p − ppᵀ) Jδ per position
        scores[:, i] = 0.5 * quad.sum(-1)
    return scores


def select_mask(scores: torch.Tensor, ratio: float, mode: str, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Boolean (B, T) mask of the floor(ratio*T) tokens to hold masked (Eq. 9); None for mode 'none'."""
    if mode == "none":
        return None
    B, T = scores.shape
    k = int(math.floor(ratio * T))
    if mode == "random":
        scores = torch.rand(B, T, generator=generator)
    mask = torch.zeros(B, T, dtype=torch.bool)
    if k:
        mask.scatter_(1, scores.topk(k, dim=-1).indices, True)
    return mask


def fit_answer(model, text: str, gen_length: int) -> tuple[str, bool]:
    """A relabelled response that fits the answer window: a generation that filled every position
    without an end token has gen_length words, one more than training can hold with its <eos>; keep the
    first gen_length - 1 words. Returns (text, truncated)."""
    ids = model.tok.encode(text)
    if len(ids) < gen_length:
        return text, False
    return model.tok.decode(ids[:gen_length - 1]), True


class DiSP(Defense):
    Config, kind = DiSPConfig, "purify"
    requires = (MASKED_DIFFUSION,)   # saliency w.r.t. e_MASK and generation with visual positions held masked

    def purify(self, model, data: Sequence[Sample], ctx: DefenseContext):
        spec, dec, cfg = ctx.spec, ctx.spec.decoding, self.cfg
        g = torch.Generator().manual_seed(spec.seed)
        purified, masked_tokens, changed, truncated = [], [], 0, 0
        bs = cfg.batch_size
        for i in tqdm(range(0, len(data), bs), desc=f"DiSP purify ({cfg.mask})", leave=False):
            chunk = list(data[i:i + bs])
            batch = model.collate(chunk, with_response=False)
            scores = (saliency(model, batch, dec.block_length, dec.gen_length, cfg.n_probes, cfg.top_k, g)
                      if cfg.mask == "saliency" else torch.zeros(len(chunk), model.n_visual))
            vmask = select_mask(scores, cfg.mask_ratio, cfg.mask, g)
            out = model.decode(model.generate(batch, dec, visual_mask=vmask, generator=g))
            for s, text in zip(chunk, out):
                text, cut = fit_answer(model, text, spec.train_length)   # the training window, not decoding's
                truncated += cut
                changed += text != s.response
                purified.append(s.with_(response=text))
            if vmask is not None:
                masked_tokens.append(vmask)
        epochs = max(1, round(cfg.recovery_frac * spec.recipe.epochs))
        trainable = spec.trainable if cfg.trainable == "victim" else cfg.trainable
        self.report = {"relabelled_changed": changed, "relabelled_truncated": truncated, "n_train": len(data),
                       "recovery_epochs": epochs,
                       "recovery_trainable": trainable}
        if masked_tokens:  # where the mask went: token-frequency map, for the record and plots
            self.report["mask_frequency"] = torch.cat(masked_tokens).float().mean(0).tolist()
        self.purified = purified
        ctx.finetune(model, purified, epochs=epochs, trainable=trainable, desc="DiSP recovery")
        return model


@register("defenses", "disp")
class DiSPDefense(DiSP):
    """DiSP: saliency-masked self-relabelling of the training set, then a short recovery fine-tune."""


@dataclass(frozen=True)
class NoMaskConfig(DiSPConfig):
    mask: str = "none"


@dataclass(frozen=True)
class RandomMaskConfig(DiSPConfig):
    mask: str = "random"


@register("defenses", "disp-nomask")
class DiSPNoMask(DiSP):
    """Ablation: re-generate the training responses with no visual token masked."""

    Config = NoMaskConfig


@register("defenses", "disp-random")
class DiSPRandom(DiSP):
    """Ablation: mask the same number of visual tokens, chosen uniformly at random."""

    Config = RandomMaskConfig
