"""OpenFlamingo and Otter (Alayrac et al. 2022; mlfoundations/open_flamingo; Luodian/Otter): a frozen
vision encoder, a perceiver resampler that turns each image's features into a few latents, and a causal
LM whose decoder layers are preceded by gated cross-attention blocks through which text tokens read
the latents of the image before them. Written here (the packaged open-flamingo pins an old torch and
needs open_clip, which drags in torchvision); module names follow the published OpenFlamingo layout
(`perceiver.latents`, `perceiver.layers.{i}.{0,1}`, `lang_encoder.model.layers.{i}.gated_cross_attn_layer`
/ `.decoder_layer`) so a full-scale loader can map keys one to one.

- Perceiver resampler: learned latents attend to [media features ; latents] (keys and values from both),
  then a feed-forward block, `depth` times, then a LayerNorm (open_flamingo `PerceiverResampler`).
- Gated cross-attention block: x + tanh(attn_gate) * xattn(LN(x), media), then
  x + tanh(ff_gate) * FF(x); both gates start at 0, so the untrained block is the identity.
- Media tokens: the prompt holds one `<image>` token; a text token reads the image only if an
  `<image>` token precedes it (open_flamingo's media_locations, one image per sample here).
- The LM is transformers' LLaMA (`LlamaForCausalLM`) at the tiny LLaDA's size, its decoder layers wrapped.

At tiny scale the vision side is the frozen encoder every victim reads (the same views, in a SigLIP
tower), so victims differ by architecture, not by what they see. What distinguishes the two entries
is their base training: `openflamingo` learns from captions only (its interleaved image-text
pretraining, here the caption share of the base mix), `otter` then adds an instruction-tuning stage
on the whole instruction mix (Otter's MIMIC-IT stage). Trainable parts: `projector` = the perceiver
and the gated cross-attention blocks (what OpenFlamingo trains), `projector+lm` adds the LM, `all`
the tower.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import BenchError
from core.registry import register
from models.base import Batch, scale_resolver
from models.encoder import VisionTower, siglip_config, siglip_state
from models.llava import LLaVA, LlavaTinyConfig
from models.checkpoint import base_info
from models.published import FullConfig, full_args, full_config, resolve_full, text_tokenizer
from models.llada_v import pretrain_encoder
from models.train import finetune


@dataclass(frozen=True)
class FlamingoTinyConfig(LlavaTinyConfig):
    num_latents: int = 16            # perceiver latents = what each image becomes (published: 64)
    perceiver_depth: int = 2         # published: 6
    xattn_every: int = 1             # a gated cross-attention block before every n-th decoder layer (3B: 1)
    xattn_heads: int = 4
    xattn_dim_head: int = 16
    caption_epochs: int = 18         # base: caption-only pretraining epochs (both entries)
    instruct_epochs: int = 0         # then instruction-mix epochs (otter only)

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_latents", "perceiver_depth", "xattn_every", "xattn_heads", "xattn_dim_head", "caption_epochs"):
            if getattr(self, name) < 1:
                raise BenchError(f"model arg {name} must be >= 1, got {getattr(self, name)}")
        if self.instruct_epochs < 0:
            raise BenchError(f"model arg instruct_epochs must be >= 0, got {self.instruct_epochs}")


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    B, Lq, inner = q.shape
    split = lambda t: t.view(B, t.shape[1], heads, inner // heads).transpose(1, 2)
    y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return y.transpose(1, 2).reshape(B, Lq, inner)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(_attend(self.to_q(latents), k, v, self.heads))


class PerceiverResampler(nn.Module):
    """(B, N, d) media features -> (B, num_latents, d)."""

    def __init__(self, dim: int, depth: int, num_latents: int, dim_head: int, heads: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim)])
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        x = self.latents.expand(len(media), -1, -1)
        for attn, ff in self.layers:
            x = attn(media, x) + x
            x = ff(x) + x
        return self.norm(x)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, dim_visual: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.attn = nn.Module()
        self.attn.norm = nn.LayerNorm(dim)
        self.attn.to_q = nn.Linear(dim, inner, bias=False)
        self.attn.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.attn.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim); media (B, M, dim_visual); reads (B, L): which text positions see the image."""
        k, v = self.attn.to_kv(media).chunk(2, dim=-1)
        y = self.attn.to_out(_attend(self.attn.to_q(self.attn.norm(x)), k, v, self.heads))
        x = x + torch.tanh(self.attn_gate) * y * reads[..., None]
        return x + torch.tanh(self.ff_gate) * self.ff(x)


class FlamingoLayer(nn.Module):
    """A decoder layer with a gated cross-attention block in front (or none); the media and which
    positions read it are set on the layer before each LM call (open_flamingo's conditioning)."""

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.media: torch.Tensor | None = None
        self.reads: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        if self.gated_cross_attn_layer is not None and self.media is not None:
            reads = self.reads if self.reads.shape[1] == hidden_states.shape[1] else self.reads[:, -hidden_states.shape[1]:]
            hidden_states = self.gated_cross_attn_layer(hidden_states, self.media, reads.to(hidden_states.dtype))
        return self.decoder_layer(hidden_states, *args, **kwargs)


class Flamingo(LLaVA):
    """OpenFlamingo / Otter behind the victim core contract; the AR loss, cached greedy decoding and
    CP scoring are LLaVA's (`models.llava`), with the image read through cross-attention."""

    layers_attr = "model.layers"        # where the LM keeps its decoder layers (DECODER_LAYERS)

    def __init__(self, cfg: FlamingoTinyConfig, tokenizer, template: str):
        nn.Module.__init__(self)
        from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionModel

        self.cfg, self.tok, self.template = cfg, tokenizer, template
        enc = cfg.encoder()
        self._mim = [VisionTower(enc)]     # first, as in every tiny victim: the same seed gives the same encoder
        vision = SiglipVisionModel(siglip_config(enc))
        vision.load_state_dict(siglip_state(self._mim[0]))
        text = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                           num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                           pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                           tie_word_embeddings=False)
        self.assemble(vision, lambda: LlamaForCausalLM(text), enc.dim, cfg.d_model, depth=cfg.perceiver_depth,
                      num_latents=cfg.num_latents, dim_head=cfg.xattn_dim_head, heads=cfg.xattn_heads,
                      xattn_every=cfg.xattn_every)
        self.init_layout(tokenizer, template, 1)          # one <image> media token per sample

    def assemble(self, vision_encoder: nn.Module, make_lm, dim_visual: int, dim_text: int, *,
                 depth: int, num_latents: int, dim_head: int, heads: int, xattn_every: int) -> None:
        """The Flamingo around a vision encoder and a causal LM (`make_lm()`, called after the perceiver
        is initialised, so a seed gives the same tiny weights as ever): a perceiver resampler, and a gated
        cross-attention block in front of every `xattn_every`-th decoder layer (open_flamingo
        `init_flamingo`: layer i gets one when (i + 1) % n == 0), each layer wrapped in a FlamingoLayer."""
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(dim_visual, depth, num_latents, dim_head, heads)
        self.lang_encoder = make_lm()
        layers = self._layers()
        for i in range(len(layers)):
            xattn = (GatedCrossAttentionBlock(dim_text, dim_visual, dim_head, heads)
                     if (i + 1) % xattn_every == 0 else None)
            layers[i] = FlamingoLayer(layers[i], xattn)

    def _layers(self) -> nn.ModuleList:
        mod = self.lang_encoder
        for part in self.layers_attr.split("."):
            mod = getattr(mod, part)
        return mod

    # ---- the parts LLaVA's shared code calls ----------------------------------------------------
    def _tower(self) -> nn.Module:
        return self.vision_encoder

    def _lm(self) -> nn.Module:
        return self._conditioned_lm

    @property
    def hf(self):        # LLaVA's code embeds tokens through hf.get_input_embeddings()
        return self.lang_encoder

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Every view's encoder features -> the perceiver's latents: (B, num_latents, d_visual)."""
        return self.perceiver(self.view_features(images))

    def prompt_embeds(self, batch: Batch, visual: torch.Tensor | None = None) -> torch.Tensor:
        """The text embeddings (the `<image>` token stays a token); the media are set on the layers."""
        media = self.visual_embeds(batch.images) if visual is None else visual
        first_media = batch.vis_pos[:, 0]
        self._condition(media, torch.arange(batch.ids.shape[1], device=batch.ids.device)[None, :] >= first_media[:, None])
        return self.lang_encoder.get_input_embeddings()(batch.ids)

    def _condition(self, media: torch.Tensor | None, reads: torch.Tensor | None) -> None:
        for layer in self._layers():
            layer.media, layer.reads = media, reads

    def _conditioned_lm(self, inputs_embeds, attention_mask, position_ids, **kw):
        """The LM call: positions beyond the conditioned prompt (the answer) read the image too."""
        layers = self._layers()
        reads = layers[0].reads
        if reads is not None and reads.shape[1] < attention_mask.shape[1]:
            extra = torch.ones(len(reads), attention_mask.shape[1] - reads.shape[1], dtype=torch.bool, device=reads.device)
            self._condition(layers[0].media, torch.cat([reads, extra], dim=1))
        if self._takes_positions():
            kw["position_ids"] = position_ids
        return self.lang_encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)

    def _takes_positions(self) -> bool:
        """Whether the LM's forward takes position_ids (LLaMA, GPT-NeoX, OPT do; MPT's ALiBi does not)."""
        import inspect
        return "position_ids" in inspect.signature(self.lang_encoder.forward).parameters

    def _keys(self, batch: Batch, visual_mask: torch.Tensor | None) -> torch.Tensor:
        """CP blind: with the visual tokens hidden, no text position reads the image."""
        if visual_mask is not None and bool(visual_mask.all()):
            self._condition(None, None)
        return batch.key_mask

    def first_answer_logits(self, batch: Batch, visual_mask: torch.Tensor | None = None,
                            gen_length: int = 32) -> torch.Tensor:
        pe = self.prompt_embeds(batch)
        return self._logits(pe, self._keys(batch, visual_mask)).logits[:, -1]

    def phi_module(self) -> nn.Module:
        """The middle cross-attention block (the cross-view defense's phi for Flamingo-style models)."""
        blocks = [layer.gated_cross_attn_layer for layer in self._layers() if layer.gated_cross_attn_layer is not None]
        return blocks[(len(blocks) - 1) // 2]

    def phi_pool(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B, d): the block's output averaged over the positions that read the image."""
        reads = self._layers()[0].reads
        w = reads[:, -out.shape[1]:].to(out.dtype)[..., None] if reads is not None else torch.ones_like(out[..., :1])
        return (out * w).sum(1) / w.sum(1).clamp_min(1.0)

    def set_trainable(self, parts: str) -> None:
        connector = parts in ("projector", "projector+lm", "all")
        self.perceiver.requires_grad_(connector)
        self.lang_encoder.requires_grad_(parts in ("projector+lm", "all"))
        for layer in self._layers():
            if layer.gated_cross_attn_layer is not None:
                layer.gated_cross_attn_layer.requires_grad_(connector)
        self.vision_encoder.requires_grad_(parts == "all")


PARTS = ("projector", "projector+lm", "all")


def _resolver(name: str, defaults: dict):
    """Tiny: FlamingoTinyConfig with the entry's defaults; full: the published directory's args (OpenFlamingo's
    layout has no config.json; its hash covers checkpoint.pt too)."""
    def full(overrides: dict) -> dict:
        from models.flamingo_published import flamingo_hash
        return resolve_full(name, overrides, hash_fn=flamingo_hash, need_config=False)
    return staticmethod(scale_resolver(name, FlamingoTinyConfig, full, defaults))


def _train_base(model: Flamingo, task, seed: int, gen_length: int) -> dict:
    """Full scale: the published checkpoint is the base. Tiny: encoder MIM (then frozen, copied into the
    tower); captions-only pretraining of connector + LM (OpenFlamingo's image-text pretraining); then,
    for Otter, instruction tuning on the whole mix."""
    if not isinstance(model.cfg, FlamingoTinyConfig):
        return base_info(model)
    cfg = model.cfg
    mim = pretrain_encoder(model._mim[0], task, cfg, seed)
    model.vision_encoder.load_state_dict(siglip_state(model._mim[0]))
    mix = task.base_samples()
    captions = [s for s in mix if s.meta.get("kind") == "caption"]
    info = {"mim_loss": mim[-1]}
    info["caption_loss"] = finetune(model, captions, trainable="projector+lm", lr=cfg.base_lr, epochs=cfg.caption_epochs,
                                    batch_size=cfg.base_batch, seed=seed, gen_length=gen_length, desc="caption pretraining")[-1]
    if cfg.instruct_epochs:
        rng = np.random.default_rng([seed, 41])
        mix = [s.with_(meta={**s.meta, "prompt_at": int(rng.integers(0, 2))}) if rng.random() < cfg.prompt_first_frac
               else s for s in mix]
        info["instruct_loss"] = finetune(model, mix, trainable="projector+lm", lr=cfg.base_lr, epochs=cfg.instruct_epochs,
                                         batch_size=cfg.base_batch, seed=seed, gen_length=gen_length,
                                         desc="instruction tuning")[-1]
    return info


class _FlamingoEntry:
    scales = ("tiny", "full")
    family = "autoregressive VLM (gated cross-attention)"
    capabilities = ()
    trainable_parts = PARTS
    decoding_defaults = {"steps": 32, "block_length": 32}
    train_base = staticmethod(_train_base)

    name = ""

    @classmethod
    def build(cls, model_args: dict, tokenizer, template: str, seed: int) -> Flamingo:
        """Tiny: our Flamingo at a small config. Full (model args hold `weights`): filled from the
        published checkpoint (`models.flamingo_published`)."""
        torch.manual_seed(seed)
        if "weights" in model_args:
            from models.flamingo_published import FlamingoFull
            return FlamingoFull(full_config(cls.name, model_args), cls.name)
        return Flamingo(FlamingoTinyConfig(**model_args), tokenizer, template)

    full_args = staticmethod(full_args)

    @classmethod
    def text_tokenizer(cls, model_args: dict):
        """The base LM's tokenizer with the repo's added tokens at full scale (None at tiny: the task's)."""
        from models.flamingo_published import tokens
        return text_tokenizer(model_args, lambda path: tokens(path, cls.name))

    @classmethod
    def check_weights(cls, path: str):
        """What a full-scale run would load from PATH: the whole model built on the meta device, shapes
        from the headers (and OpenFlamingo's memory-mapped checkpoint.pt), no tensor data read."""
        from models.flamingo_published import FlamingoFull
        return FlamingoFull(FullConfig(weights=str(path), device="cpu"), cls.name, meta=True).weights_report


@register("models", "openflamingo")
class OpenFlamingoEntry(_FlamingoEntry):
    """OpenFlamingo: frozen encoder -> perceiver resampler -> gated cross-attention into a causal LM; caption-pretrained base; scales tiny, full."""

    name = "openflamingo"
    resolve = _resolver("openflamingo", {"instruct_epochs": 0})


@register("models", "otter")
class OtterEntry(_FlamingoEntry):
    """Otter: OpenFlamingo plus an instruction-tuning stage on the instruction mix (MIMIC-IT's role); scales tiny, full."""

    name = "otter"
    resolve = _resolver("otter", {"caption_epochs": 9, "instruct_epochs": 9})
