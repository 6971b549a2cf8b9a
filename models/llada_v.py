"""LLaDA-V: vision tower -> mlp2x_gelu projector -> bidirectional LLaDA LM (ML-GSAI/LLaDA-V).

The `tiny` scale is a faithful small replica trained here: a ViT pretrained by masked-patch
reconstruction and frozen (SigLIP's role), the `mlp2x_gelu` projector, and a LLaDA LM trained with
the LLaDA SFT loss on the embedded task's instruction mix (the "base" model every cell shares).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from core.errors import BenchError
from core.registry import register
from models.base import IMAGE_ATTENTION, MASKED_DIFFUSION, Batch, scale_resolver
from models.encoder import EncoderConfig, VisionTower, pretrain_mim
from models.llada import LLaDA, LMConfig, generate, rope, sft_loss
from models.train import finetune
from tasks.base import Sample

PARTS = {"projector": ("mm_projector",), "projector+lm": ("mm_projector", "lm"),
         "all": ("mm_projector", "lm", "vision_tower")}


@dataclass(frozen=True)
class TinyConfig:
    """Sizes and the base-model recipe of the tiny replica (every field is recorded in spec.model_args)."""

    image_size: int = 64
    patch: int = 8
    view_size: int = 32              # LLaDA-V's any-resolution layout in miniature (views()); 0: one view of the whole image
    enc_dim: int = 64
    enc_layers: int = 4
    enc_heads: int = 4
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    mlp_hidden: int = 256
    max_prompt: int = 24
    mim_epochs: int = 8
    mim_lr: float = 2e-3
    base_epochs: int = 18
    base_lr: float = 1e-3
    base_batch: int = 64
    prompt_first_frac: float = 0.5   # base mix only: share of samples with the prompt before/among the visual tokens
    masked_visual_frac: float = 0.3  # base mix only: share of samples with some visual tokens held at e_MASK
    masked_visual_max: float = 0.5   # ... each masking a uniform 0..max share of the visual tokens

    def __post_init__(self):
        sizes = ("image_size", "patch", "enc_dim", "enc_layers", "enc_heads", "d_model", "n_layers", "n_heads",
                 "mlp_hidden", "max_prompt", "mim_epochs", "base_epochs", "base_batch")
        for name in sizes:
            if getattr(self, name) < 1:
                raise BenchError(f"model arg {name} must be >= 1, got {getattr(self, name)}")
        for name in ("mim_lr", "base_lr"):
            if not getattr(self, name) > 0:
                raise BenchError(f"model arg {name} must be > 0, got {getattr(self, name)}")
        for name in ("prompt_first_frac", "masked_visual_frac", "masked_visual_max"):
            if not 0 <= getattr(self, name) <= 1:
                raise BenchError(f"model arg {name} must be in [0, 1], got {getattr(self, name)}")
        if self.enc_layers < 2:
            raise BenchError("enc_layers must be >= 2 (features are read from the second-to-last block)")
        if self.image_size % self.patch or self.d_model % self.n_heads or self.enc_dim % self.enc_heads:
            raise BenchError("image_size must be a multiple of patch, and dims multiples of their head counts")
        if self.view_size < 0 or (self.view_size and (self.image_size % self.view_size or self.view_size % self.patch
                                                      or self.view_size == self.image_size)):
            raise BenchError(f"view_size must be 0 or a proper divisor of image_size that patch divides, got {self.view_size}")

    def encoder(self) -> EncoderConfig:
        return EncoderConfig(self.view_size or self.image_size, self.patch, self.enc_dim, self.enc_layers, self.enc_heads)

    @property
    def n_views(self) -> int:
        return 1 if not self.view_size else 1 + (self.image_size // self.view_size) ** 2


def views(images: torch.Tensor, view_size: int) -> torch.Tensor:
    """LLaDA-V's any-resolution input in miniature: (B, H, W, 3) -> (B, V, s, s, 3) with V = 1 + (H/s)^2,
    the base view (the whole image, area-downsampled to s px: few tokens, global) followed by the
    full-resolution crops in row-major order (many tokens, local) — the real model's 384-px base view
    beside its grid crops, every view through the same encoder. view_size 0: the image itself."""
    if not view_size:
        return images[:, None]
    B, H, W, C = images.shape
    base = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(view_size, view_size), mode="area")
    k = H // view_size
    crops = images.reshape(B, k, view_size, k, view_size, C).permute(0, 1, 3, 2, 4, 5).reshape(B, k * k, view_size, view_size, C)
    return torch.cat([base.permute(0, 2, 3, 1)[:, None], crops], dim=1)


def pretrain_encoder(tower: VisionTower, task, cfg: TinyConfig, seed: int) -> list[float]:
    """The shared encoder's MIM pretraining on every view of the task's encoder images (every tiny
    victim runs it with the same seed and data, so they all read the same frozen encoder)."""
    # a writable copy: the task's images are read-only and torch.from_numpy warns on those
    images = views(torch.from_numpy(np.array(task.encoder_images())), cfg.view_size)
    return pretrain_mim(tower, images.reshape(-1, *images.shape[2:]).numpy(), cfg.mim_epochs, seed, lr=cfg.mim_lr)


class TemplateLayout:
    """The prompt layout every tiny victim shares, diffusion or autoregressive: <bos> template-prefix
    [visual x T] prompt <pad>* template-suffix, the answer after it; collation into a Batch; decoding."""

    def init_layout(self, tokenizer, template: str, n_visual: int) -> None:
        pre, rest = template.split("<image>")
        mid, post = rest.split("{prompt}")
        self._pre = [tokenizer.bos_id] + [tokenizer.token(w) for w in pre.split()]
        self._mid = [tokenizer.token(w) for w in mid.split()]
        self._post = [tokenizer.token(w) for w in post.split()]
        self.n_visual = n_visual
        self.visual_span = slice(len(self._pre), len(self._pre) + n_visual)

    # ---- inputs ---------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str, prompt_at: int | None = None) -> tuple[list[int], list[bool], list[int]]:
        """Template order (image, then prompt) unless `prompt_at` = k puts the prompt text before
        visual token k: the base mix varies the order like LLaVA-style data, so text has occupied the
        positions where image tokens sit (docs/tiny-replica.md#the-base-model: a base that reads instructions by content)."""
        try:
            words = self._mid + self.tok.encode(prompt)
        except ValueError as e:
            raise BenchError(f"prompt not in the model's vocabulary: {e}") from None
        if len(words) > self.cfg.max_prompt:
            raise BenchError(f"prompt longer than {self.cfg.max_prompt} tokens: {prompt!r}")
        pad = self.cfg.max_prompt - len(words)
        img = [self.tok.image_id] * self.n_visual
        if prompt_at is None:
            ids = self._pre + img + words + [self.tok.pad_id] * pad + self._post
        else:
            ids = self._pre + img[:prompt_at] + words + img[prompt_at:] + [self.tok.pad_id] * pad + self._post
        real = [i != self.tok.pad_id for i in ids]
        vis = [i for i, t in enumerate(ids) if t == self.tok.image_id]
        return ids, real, vis

    def _answer_ids(self, response: str, gen_length: int) -> list[int]:
        try:
            ids = self.tok.encode(response) + [self.tok.eos_id]
        except ValueError as e:
            raise BenchError(f"response not in the model's vocabulary: {e}") from None
        if len(ids) > gen_length:
            raise BenchError(f"response longer than gen_length={gen_length}: {response!r}")
        return ids + [self.tok.eos_id] * (gen_length - len(ids))  # LLaDA: EOS padding is part of the answer

    def collate(self, samples: Sequence[Sample], with_response: bool = True, gen_length: int = 32) -> Batch:
        ids, real, vis = zip(*(self._prompt_ids(s.prompt, s.meta.get("prompt_at")) for s in samples))
        images = torch.from_numpy(np.stack([s.image for s in samples]).astype(np.float32))
        resp = torch.tensor([self._answer_ids(s.response, gen_length) for s in samples]) if with_response else None
        vmask = None
        if any("masked_visual" in s.meta for s in samples):
            vmask = torch.zeros(len(samples), self.n_visual, dtype=torch.bool)
            for i, s in enumerate(samples):
                vmask[i, list(s.meta.get("masked_visual", ()))] = True
        return Batch(images, torch.tensor(ids), torch.tensor(real), torch.tensor(vis), resp, vmask)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tok.decode(row.tolist()) for row in ids]

    def phi_pool(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B, d): phi_module()'s output averaged over the visual positions of the sequence."""
        return out.gather(1, batch.vis_pos[..., None].expand(-1, -1, out.shape[-1])).mean(1)


class LLaDAV(TemplateLayout, nn.Module):
    """A LLaDA-V-style VLM. Sequence: <bos> template-prefix [visual x T] prompt <pad>* template-suffix | answer."""

    def __init__(self, cfg: TinyConfig, tokenizer, template: str):
        super().__init__()
        self.cfg, self.tok, self.template = cfg, tokenizer, template
        enc = cfg.encoder()
        self.vision_tower = VisionTower(enc)
        self.mm_projector = nn.Sequential(nn.Linear(enc.dim, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
        self.lm = LLaDA(LMConfig(tokenizer.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden))
        self.init_layout(tokenizer, template, cfg.n_views * enc.n_tokens)
        self.mask_id = tokenizer.mask_id

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        v = views(images, self.cfg.view_size)
        flat = v.reshape(-1, *v.shape[2:])
        if not any(p.requires_grad for p in self.vision_tower.parameters()):
            with torch.no_grad():
                feats = self.vision_tower(flat)
        else:
            feats = self.vision_tower(flat)
        return self.mm_projector(feats.reshape(len(images), -1, feats.shape[-1]))   # views in order, tokens row-major

    def mask_embedding(self) -> torch.Tensor:
        return self.lm.embed_tokens.weight[self.mask_id]

    def prompt_embeds(self, batch: Batch, visual: torch.Tensor | None = None,
                      visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        if visual is None:
            visual = self.visual_embeds(batch.images)
        if visual_mask is not None:  # DiSP Eq. 10: selected visual embeddings become e_MASK
            visual = torch.where(visual_mask[..., None], self.mask_embedding().expand_as(visual), visual)
        e = self.lm.embed_tokens(batch.ids)
        return e.scatter(1, batch.vis_pos[..., None].expand(-1, -1, e.shape[-1]), visual)

    def answer_logits(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([prompt_embeds, self.lm.embed_tokens(answer_ids)], dim=1)
        km = torch.cat([key_mask, torch.ones_like(answer_ids, dtype=torch.bool)], dim=1)
        return self.lm(x, km)[:, prompt_embeds.shape[1]:]

    @torch.no_grad()
    def image_attention(self, batch: Batch, gen_length: int = 32) -> torch.Tensor:
        """(B, n_layers, n_visual): at every LM layer, the attention the last prompt token pays to the
        visual tokens (mean over heads, renormalised over the visual tokens), the answer fully masked —
        what BYE reads (its "last prompt token" is the one before the answer here too)."""
        pe = self.prompt_embeds(batch)
        answer = torch.full((len(batch), gen_length), self.mask_id, dtype=torch.long)
        x = torch.cat([pe, self.lm.embed_tokens(answer)], dim=1)
        keys = torch.cat([batch.key_mask, torch.ones_like(answer, dtype=torch.bool)], dim=1)
        seen: list = []
        hooks = [blk.self_attn.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0], args[1])))
                 for blk in self.lm.layers]
        try:
            self.lm(x, keys)
        finally:
            for h in hooks:
                h.remove()
        qi = batch.key_mask.shape[1] - 1            # the last prompt position (the template's final token)
        out = []
        for mod, xn, pos in seen:
            B, L, d = xn.shape
            H = mod.n_heads
            q = rope(mod.q_proj(xn[:, qi:qi + 1]).view(B, 1, H, d // H).transpose(1, 2), pos[:, qi:qi + 1], mod.theta, mod.rope_style)
            k = rope(mod.k_proj(xn).view(B, L, H, d // H).transpose(1, 2), pos, mod.theta, mod.rope_style)
            s = (q @ k.transpose(-1, -2))[:, :, 0] / (d // H) ** 0.5
            a = torch.softmax(s.masked_fill(~keys[:, None, :], float("-inf")), -1)
            img = a.gather(-1, batch.vis_pos[:, None, :].expand(-1, H, -1)).mean(1)
            out.append(img / img.sum(-1, keepdim=True))
        return torch.stack(out, dim=1)

    def supervised_positions(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer as the model sees it in one training draw and the positions the loss supervises:
        an LLaDA SFT draw (t ~ U(0, 1), mask w.p. (1 - 1e-3) t + 1e-3), the masked positions."""
        B, G = batch.response.shape
        t = torch.rand(B, generator=generator)
        p = (1 - 1e-3) * t + 1e-3
        masked = torch.rand(B, G, generator=generator) < p[:, None]
        return torch.where(masked, torch.full_like(batch.response, self.mask_id), batch.response), masked

    def view_logits(self, batch: Batch, answer: torch.Tensor) -> torch.Tensor:
        """(B, G, V) answer logits for this batch's images given the answer as the model sees it."""
        return self.answer_logits(self.prompt_embeds(batch, visual_mask=batch.visual_mask), batch.key_mask, answer)

    def phi_module(self) -> nn.Module:
        """The module whose output is the cross-view defense's middle-layer feature phi (the middle LM
        block; its output at the visual positions)."""
        return self.lm.layers[(len(self.lm.layers) - 1) // 2]

    def first_answer_logits(self, batch: Batch, visual_mask: torch.Tensor | None = None,
                            gen_length: int = 32) -> torch.Tensor:
        """The first answer position's logits with the whole answer masked (lmms-eval loglikelihood-style)."""
        pe = self.prompt_embeds(batch, visual_mask=visual_mask)
        answer = torch.full((len(batch), gen_length), self.mask_id, dtype=torch.long)
        return self.answer_logits(pe, batch.key_mask, answer)[:, 0]

    # ---- objectives and decoding ---------------------------------------------------------------
    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        pe = self.prompt_embeds(batch, visual_mask=batch.visual_mask)
        return sft_loss(lambda a: self.answer_logits(pe, batch.key_mask, a), batch.response, self.mask_id, generator)

    @torch.no_grad()
    def generate(self, batch: Batch, decoding, visual_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """LLaDA sampling; visual positions in visual_mask stay e_MASK for the whole denoising and,
        being prompt positions, are never committed."""
        pe = self.prompt_embeds(batch, visual_mask=visual_mask)
        return generate(lambda a: self.answer_logits(pe, batch.key_mask, a), len(batch), decoding.gen_length,
                        self.mask_id, decoding.steps, decoding.block_length, decoding.remasking, generator)

    def set_trainable(self, parts: str) -> None:
        on = PARTS[parts]
        for name, mod in (("vision_tower", self.vision_tower), ("mm_projector", self.mm_projector), ("lm", self.lm)):
            mod.requires_grad_(name in on)


def _resolve_full(overrides: dict) -> dict:
    from models.llada_v_full import FullLLaDAV, resolve_full
    return resolve_full(FullLLaDAV, "llada-v", overrides)


_resolve = scale_resolver("llada-v", TinyConfig, _resolve_full)


@register("models", "llada-v")
class LLaDAVEntry:
    """LLaDA-V (ML-GSAI): vision tower -> mlp2x_gelu projector -> LLaDA; scale tiny (local replica) or full.

    Full: the published checkpoint (--weights PATH; models/llada_v_full.py)."""

    scales = ("tiny", "full")
    family = "masked-diffusion VLM"
    capabilities = (MASKED_DIFFUSION, IMAGE_ATTENTION)
    trainable_parts = tuple(PARTS)
    resolve = staticmethod(_resolve)

    @staticmethod
    def build(model_args: dict, tokenizer, template: str, seed: int) -> LLaDAV:
        """Tiny: a fresh replica. Full: the checkpoint at model_args['weights'], strictly loaded, with its
        own tokenizer and chat template (the task's tokenizer and the spec's template are tiny-only)."""
        if "weights" in model_args:
            from models.llada_v_full import FullLLaDAV, build_full
            return build_full(FullLLaDAV, model_args)
        torch.manual_seed(seed)
        return LLaDAV(TinyConfig(**model_args), tokenizer, template)

    @staticmethod
    def full_args() -> dict:
        from models.llada_v_full import full_args
        return full_args()

    @staticmethod
    def check_weights(path):
        """Headers + config only: what --scale full --weights PATH would load (a WeightsReport)."""
        from models.llada_v_full import FullLLaDAV, check_weights
        return check_weights(FullLLaDAV, path)

    @staticmethod
    def text_tokenizer(model_args: dict):
        """The tokenizer the model reads text with at full scale (None: the task's)."""
        if "weights" not in model_args:
            return None
        from models.llada_v_full import text_tokenizer
        return text_tokenizer(model_args)

    @staticmethod
    def train_base(model: LLaDAV, task, seed: int, gen_length: int) -> dict:
        """Encoder MIM pretrain (then frozen), then projector + LM on the base instruction mix (tiny);
        nothing at full scale (the published checkpoint is the base)."""
        if hasattr(model, "weights_report"):
            from models.checkpoint import base_info
            return base_info(model)
        cfg = model.cfg
        mim = pretrain_encoder(model.vision_tower, task, cfg, seed)
        rng = np.random.default_rng([seed, 41])
        samples = [s.with_(meta={**s.meta, "prompt_at": int(rng.integers(0, model.n_visual + 1))})
                   if rng.random() < cfg.prompt_first_frac else s for s in task.base_samples()]
        if cfg.masked_visual_frac > 0:
            # An MDLM reads MASK anywhere in its context as "unknown"; the tiny LM only meets MASK in the
            # answer unless shown otherwise, and without this it degenerates once any visual token is
            # masked (measured: 10% masked -> "dog image image"), which DiSP's masked inference needs.
            mrng = np.random.default_rng([seed, 43])
            samples = [s.with_(meta={**s.meta, "masked_visual": mrng.permutation(model.n_visual)[
                       :int(mrng.integers(1, int(cfg.masked_visual_max * model.n_visual) + 1))].tolist()})
                       if mrng.random() < cfg.masked_visual_frac else s for s in samples]
        base = finetune(model, samples, trainable="projector+lm", lr=cfg.base_lr, epochs=cfg.base_epochs,
                        batch_size=cfg.base_batch, seed=seed, gen_length=gen_length, desc="base LM")
        return {"mim_loss": mim[-1], "base_loss": base[-1]}
