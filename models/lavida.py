"""LaViDa (jacklishufan/LaViDa, LaViDa-LLaDA): the same LLaDA LM and vision side as LLaDA-V, with its own
differences, each an override here of `models.llada_v.LLaDAV`:

- **2-D pooled visual tokens.** Every view's token grid is pooled bilinearly after the projector
  (published: 27 x 27 -> 14 x 14 = 196 tokens per 384-px view); tiny: 4 x 4 -> 2 x 2 per 32-px view,
  the same ~0.5 ratio, so 5 views give 20 visual tokens.
- **Complementary masking in training.** One t per sample draws a mask M of the answer; the batch is
  doubled with M and its complement, so every answer token is a target exactly once, and the loss is
  the plain mean cross-entropy over masked tokens (no 1/t weight), as LaViDa's training code.
- **Prefix-DLM decoding** (`prefix_dlm`): the prompt attends only the prompt, the answer attends
  everything; the prompt's keys and values are computed once per batch and reused at every denoising
  step. It equals decoding under the Prefix-DLM attention mask, not full bidirectional decoding (the
  README of LaViDa reports a small quality cost for the speed). Off by default: the DiSP paper's
  LaViDa runs disable prefix caching.
- **The `shift` schedule**: the share of answer tokens still masked after denoising time t is
  sigma(t) = s t / (1 + (s - 1) t), so s < 1 commits more tokens early (LaViDa uses 0.33 for COCO);
  s = 1 is LLaDA's even split. `step_ratio` (steps = step_ratio x answer tokens) is the spec's
  `steps`: the family's decoding defaults are DiSP's LaViDa setting, 32 tokens in one block of 32 at
  step_ratio 0.5 (16 steps).
- Chat template: LaViDa-LLaDA uses LLaDA's chat template, as LLaDA-V does; the tiny template is the
  same.

The DiSP paper's LaViDa cell settings (centre trigger, mask ratio 0.5, 40% poison for
misclassification) are the entry's ``cell_defaults``, applied and recorded in the spec, never
hard-coded in an attack or in DiSP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.errors import BenchError
from core.registry import register
from models.base import IMAGE_ATTENTION, MASKED_DIFFUSION, Batch, scale_resolver
from models.llada import generate as llada_generate
from models.llada_v import PARTS, LLaDAV, LLaDAVEntry, TinyConfig


@dataclass(frozen=True)
class LaViDaConfig(TinyConfig):
    """The tiny LLaDA-V sizes and base recipe plus LaViDa's own settings (all in spec.model_args)."""

    pool_side: int = 2          # pooled grid side per view (tiny views are 4 x 4 tokens; published 27 -> 14)
    shift: float = 1.0          # the shift schedule's s (1: LLaDA's even split; LaViDa COCO: 0.33)
    prefix_dlm: bool = False    # Prefix-DLM attention + prompt K/V cache at decoding (off in DiSP's LaViDa runs)

    def __post_init__(self):
        super().__post_init__()
        side = (self.view_size or self.image_size) // self.patch
        if not 1 <= self.pool_side <= side:
            raise BenchError(f"model arg pool_side must be in [1, {side}] (the tokens per view side), got {self.pool_side}")
        if not self.shift > 0:
            raise BenchError(f"model arg shift must be > 0, got {self.shift}")


def pool_views(tokens: torch.Tensor, n_views: int, pool_side: int) -> torch.Tensor:
    """(B, V*s*s, d) per-view square token grids -> (B, V*p*p, d), each grid pooled bilinearly to p x p
    (LaViDa's 2-D pooling; align_corners=False as torch's default)."""
    B, T, d = tokens.shape
    s = int(round((T // n_views) ** 0.5))
    grid = tokens.reshape(B * n_views, s, s, d).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid, size=(pool_side, pool_side), mode="bilinear", align_corners=False)
    return pooled.permute(0, 2, 3, 1).reshape(B, n_views * pool_side * pool_side, d)


def shifted_transfer_counts(n_masked: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    """Tokens committed at each of `steps` steps: time runs 1 -> 0 evenly and the masked share after
    time t is sigma(t) = s t / (1 + (s - 1) t) (LaViDa's shift schedule); counts sum to n_masked."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=n_masked.device)
    sigma = shift * t / (1 + (shift - 1) * t)
    remaining = torch.round(n_masked[:, None].double() * sigma[None, :]).long()     # (B, steps + 1)
    return (remaining[:, :-1] - remaining[:, 1:]).clamp_min(0)


def complementary_loss(logits_fn, response: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                       eps: float = 1e-3) -> torch.Tensor:
    """LaViDa's complementary masking: t ~ U(0, 1) per sample, mask M with p = (1 - eps) t + eps, the
    batch doubled with M and its complement (every answer token masked exactly once across the pair),
    plain mean cross-entropy over the masked tokens. logits_fn maps (2B, G) noisy ids to (2B, G, V)."""
    B, G = response.shape
    t = torch.rand(B, generator=generator)
    p = (1 - eps) * t + eps
    m = torch.rand(B, G, generator=generator) < p[:, None]
    masked = torch.cat([m, ~m]).to(response.device)
    target = torch.cat([response, response])
    noisy = torch.where(masked, torch.full_like(target, mask_id), target)
    logits = logits_fn(noisy)
    return F.cross_entropy(logits[masked], target[masked])


class LaViDa(LLaDAV):
    """A LaViDa-style VLM: LLaDA-V's vision side and LM with pooled views, complementary masking and
    Prefix-DLM decoding (see the module docstring)."""

    def __init__(self, cfg: LaViDaConfig, tokenizer, template: str):
        super().__init__(cfg, tokenizer, template)
        self.n_visual = cfg.n_views * cfg.pool_side ** 2
        self.visual_span = slice(self.visual_span.start, self.visual_span.start + self.n_visual)

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return pool_views(super().visual_embeds(images), self.cfg.n_views, self.cfg.pool_side)

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        pe = self.prompt_embeds(batch, visual_mask=batch.visual_mask)
        pe2, km2 = torch.cat([pe, pe]), torch.cat([batch.key_mask, batch.key_mask])
        return complementary_loss(lambda a: self.answer_logits(pe2, km2, a), batch.response, self.mask_id, generator)

    def prefix_cache(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor) -> list:
        """Every layer's (k, v) of the prompt, the prompt attending only itself (computed once per batch)."""
        keep: list = []
        self.lm(prompt_embeds, key_mask, keep=keep)
        return keep

    def cached_answer_logits(self, cache: list, key_mask: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """Answer logits from the prompt cache: the answer attends prompt + answer, at positions after the
        prompt's real tokens."""
        G = answer_ids.shape[1]
        pos = key_mask.long().sum(-1, keepdim=True) + torch.arange(G, device=key_mask.device)[None, :]
        keys = torch.cat([key_mask, torch.ones_like(answer_ids, dtype=torch.bool)], dim=1)
        return self.lm(self.lm.embed_tokens(answer_ids), keys, attn_mask=keys[:, None, None, :], pos=pos, past=cache)

    def prefix_dlm_logits(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        """The same answer logits without a cache: one pass under the Prefix-DLM attention mask (prompt
        rows see only real prompt keys, answer rows see every real key). The cache must equal this."""
        P, G = prompt_embeds.shape[1], answer_ids.shape[1]
        keys = torch.cat([key_mask, torch.ones_like(answer_ids, dtype=torch.bool)], dim=1)
        mask = keys[:, None, None, :].repeat(1, 1, P + G, 1)
        mask[:, :, :P, P:] = False
        x = torch.cat([prompt_embeds, self.lm.embed_tokens(answer_ids)], dim=1)
        return self.lm(x, keys, attn_mask=mask)[:, P:]

    @torch.no_grad()
    def generate(self, batch: Batch, decoding, visual_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The LLaDA sampler with LaViDa's shift schedule; with prefix_dlm, the prompt's K/V are computed
        once and every step runs only the answer. Visual positions in visual_mask stay e_MASK."""
        pe = self.prompt_embeds(batch, visual_mask=visual_mask)
        if self.cfg.prefix_dlm:
            cache = self.prefix_cache(pe, batch.key_mask)
            logits_fn = lambda a: self.cached_answer_logits(cache, batch.key_mask, a)
        else:
            logits_fn = lambda a: self.answer_logits(pe, batch.key_mask, a)
        return llada_generate(logits_fn, len(batch), decoding.gen_length, self.mask_id, decoding.steps,
                              decoding.block_length, decoding.remasking, generator,
                              transfer=lambda n, k: shifted_transfer_counts(n, k, self.cfg.shift))


def _resolve_full(overrides: dict) -> dict:
    from models.lavida_full import FullLaViDa, lavida_config
    from models.llada_v_full import resolve_full
    return resolve_full(FullLaViDa, "lavida", overrides, lavida_config())


_resolve = scale_resolver("lavida", LaViDaConfig, _resolve_full)


@register("models", "lavida")
class LaViDaEntry:
    """LaViDa (LLaDA backbone): LLaDA-V's vision side, 2-D pooled views, complementary masking, Prefix-DLM.

    Scale tiny (the replica) or full (the published checkpoint, --weights; models/lavida_full.py)."""

    scales = ("tiny", "full")
    family = "masked-diffusion VLM"
    capabilities = (MASKED_DIFFUSION, IMAGE_ATTENTION)
    trainable_parts = tuple(PARTS)
    resolve = staticmethod(_resolve)
    text_tokenizer = staticmethod(LLaDAVEntry.text_tokenizer)
    # The DiSP paper's LaViDa setting (§4.1, App.): one 32-token block at step_ratio 0.5; centre trigger;
    # DiSP mask ratio 0.5; 40% poison for misclassification. Applied by make_spec where not given.
    decoding_defaults = {"gen_length": 32, "block_length": 32, "steps": 16}
    cell_defaults = {"attack_args": {"position": "center"}, "defense_args": {"mask_ratio": 0.5},
                     "poison_rate": {"misclassification": 0.4}}

    @staticmethod
    def build(model_args: dict, tokenizer, template: str, seed: int) -> LaViDa:
        """Tiny: a fresh replica. Full: the published checkpoint, strictly loaded (models/lavida_full.py)."""
        if "weights" in model_args:
            from models.lavida_full import FullLaViDa
            from models.llada_v_full import build_full
            return build_full(FullLaViDa, model_args)
        torch.manual_seed(seed)
        return LaViDa(LaViDaConfig(**model_args), tokenizer, template)

    @staticmethod
    def full_args() -> dict:
        from models.lavida_full import lavida_config
        from models.llada_v_full import full_args
        return full_args(lavida_config())

    @staticmethod
    def check_weights(path):
        """Headers + config only: what --scale full --weights PATH would load (a WeightsReport)."""
        from models.lavida_full import FullLaViDa, lavida_config
        from models.llada_v_full import check_weights
        return check_weights(FullLaViDa, path, lavida_config())

    train_base = staticmethod(LLaDAVEntry.train_base)
