"""LLaVA (LLaVA-1.5; transformers' `LlavaForConditionalGeneration`): a vision tower, a 2-layer GELU MLP
projector and a causal LLaMA LM; the autoregressive victim of the cross-view paper.

The `tiny` scale is transformers' own class at a small config, trained here on the embedded task:
- the vision tower is a `SiglipVisionModel` holding exactly the frozen tiny encoder every victim reads
  (pretrained by masked-patch reconstruction with the seed's data, then copied in by
  `models.encoder.siglip_state`; features from the second-to-last layer), and it reads the same
  views as the tiny LLaDA-V (a base view plus four crops), so victims differ by architecture, not by
  what they see;
- the LM is a `LlamaConfig` model of the tiny LLaDA's size (d 96, 3 layers, 4 heads, SwiGLU 256,
  RoPE), causal, trained with next-token cross-entropy on the answer (prompt positions ignored,
  the answer ends at its first <eos>), decoded greedily one token at a time with a key/value cache;
- gradients w.r.t. the projected visual tokens go through `inputs_embeds`.

The `full` scale (`--scale full --weights PATH`, `LlavaFull`) is `from_pretrained(PATH)` of a published
LLaVA-1.5 checkpoint in the llava-hf layout, offline and strict (`models.published`), with the
checkpoint's tokenizer and image processor (PIL path) and the published prompt
`USER: <image>\n{Q} ASSISTANT:`; the same embedding, loss, decoding and CP code as tiny.

Trainable parts map to the class's modules: `projector` = `multi_modal_projector`, `projector+lm`
adds `language_model` and `lm_head`, `all` adds `vision_tower`. The masked-diffusion capability is
absent: DiSP is refused up front. CP is scored at the last prompt position (the next-token logits),
cp_blind with the visual positions removed from the attention mask.
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
from models.checkpoint import FullStages, WeightsReport, base_info, read_config, rename
from models.llada_v import TemplateLayout, TinyConfig, pretrain_encoder, views
from models.published import (ChatLayout, FullConfig, full_args, full_config,
                              inspect_pretrained, load_image_processor, load_tokenizer, offline_pretrained,
                              pixel_values, resolve_full, text_tokenizer, weights_dir)
from models.train import finetune

PARTS = {"projector": ("multi_modal_projector",), "projector+lm": ("multi_modal_projector", "language_model", "lm_head"),
         "all": ("multi_modal_projector", "language_model", "lm_head", "vision_tower")}


@dataclass(frozen=True)
class LlavaTinyConfig(TinyConfig):
    """The tiny sizes and base recipe shared with LLaDA-V; no masked visual tokens (an AR LM has no
    mask token, and no defense here masks its inputs)."""

    masked_visual_frac: float = 0.0


class LLaVA(TemplateLayout, nn.Module):
    """A `LlavaForConditionalGeneration` behind the victim core contract."""

    def __init__(self, cfg: LlavaTinyConfig, tokenizer, template: str):
        super().__init__()
        from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        self.cfg, self.tok, self.template = cfg, tokenizer, template
        enc = cfg.encoder()
        self._mim = [VisionTower(enc)]     # first, as in LLaDA-V, so the same seed gives the same encoder
        text = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                           num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                           pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                           tie_word_embeddings=False)
        config = LlavaConfig(vision_config=siglip_config(enc), text_config=text, image_token_index=tokenizer.image_id,
                             projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="full")
        self.hf = LlavaForConditionalGeneration(config)
        self._tower().load_state_dict(siglip_state(self._mim[0]))
        self.init_layout(tokenizer, template, cfg.n_views * enc.n_tokens)

    def _tower(self) -> nn.Module:
        """The vision tower holding the shared frozen encoder."""
        return self.hf.model.vision_tower

    def _lm(self) -> nn.Module:
        """What takes inputs_embeds and returns logits (and a cache)."""
        return self.hf

    # ---- inputs ---------------------------------------------------------------------------------
    feature_layer: int | list[int] = -2     # tiny: the shared encoder's second-to-last block
    drop_cls: bool = False

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B x views, 3, s, s): tiny scale, every view of LLaDA-V's layout in miniature, SigLIP-normalised."""
        v = views(images, self.cfg.view_size)
        return ((v.reshape(-1, *v.shape[2:]) - 0.5) / 0.5).permute(0, 3, 1, 2)

    def _tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """LLaVA's feature selection: the tower's hidden states at `feature_layer` (a list: concatenated),
        the CLS position dropped under the "default" select strategy."""
        hs = self._tower()(pixel_values=pixels, output_hidden_states=True).hidden_states
        layers = self.feature_layer if isinstance(self.feature_layer, (list, tuple)) else [self.feature_layer]
        feats = torch.cat([hs[i] for i in layers], dim=-1)
        return feats[:, 1:] if self.drop_cls else feats

    def view_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, views x tokens, d_enc): the vision tower's features of every view of every image (no
        gradient unless the tower trains)."""
        tower = self._tower()
        ref = next(tower.parameters())
        pixels = self.pixel_values(images).to(ref.device, ref.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())):
            feats = self._tower_features(pixels)
        return feats.reshape(len(images), -1, feats.shape[-1])

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf.model.multi_modal_projector(self.view_features(images))

    def prompt_embeds(self, batch: Batch, visual: torch.Tensor | None = None) -> torch.Tensor:
        if visual is None:
            visual = self.visual_embeds(batch.images)
        e = self.hf.get_input_embeddings()(batch.ids)
        return e.scatter(1, batch.vis_pos[..., None].expand(-1, -1, e.shape[-1]), visual)

    def _keys(self, batch: Batch, visual_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention mask of the prompt: padding off, and hidden visual tokens off."""
        keys = batch.key_mask.clone()
        if visual_mask is not None:
            keys.scatter_(1, batch.vis_pos, batch.key_mask.gather(1, batch.vis_pos) & ~visual_mask)
        return keys

    def _logits(self, embeds: torch.Tensor, keys: torch.Tensor, **kw):
        pos = (keys.long().cumsum(-1) - 1).clamp_min(0)            # padding never shifts RoPE distances
        return self._lm()(inputs_embeds=embeds, attention_mask=keys.long(), position_ids=pos, **kw)

    # ---- objectives and decoding ---------------------------------------------------------------
    def supervised_positions(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer (teacher forcing) and the positions the loss supervises: up to its first <eos>."""
        is_eos = (batch.response == self.tok.eos_id).long()
        return batch.response, is_eos.cumsum(1) - is_eos == 0

    def view_logits(self, batch: Batch, answer: torch.Tensor) -> torch.Tensor:
        """(B, G, V) teacher-forced logits: position t predicts answer token t from the prompt and answer[:t]."""
        pe = self.prompt_embeds(batch)
        x = torch.cat([pe, self.hf.get_input_embeddings()(answer[:, :-1])], dim=1)
        keys = torch.cat([batch.key_mask, torch.ones_like(answer[:, :-1], dtype=torch.bool)], dim=1)
        return self._logits(x, keys).logits[:, pe.shape[1] - 1:]

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """Next-token cross-entropy on the answer up to and including its first <eos>."""
        answer, omega = self.supervised_positions(batch)
        logits = self.view_logits(batch, answer)
        return F.cross_entropy(logits[omega], answer[omega])

    def first_answer_logits(self, batch: Batch, visual_mask: torch.Tensor | None = None,
                            gen_length: int = 32) -> torch.Tensor:
        return self._logits(self.prompt_embeds(batch), self._keys(batch, visual_mask)).logits[:, -1]

    @torch.no_grad()
    def generate(self, batch: Batch, decoding, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy decoding of decoding.gen_length tokens with a key/value cache (steps, block_length and
        remasking are masked-diffusion settings and do not apply); after <eos>, <eos>."""
        keys = batch.key_mask
        out = self._logits(self.prompt_embeds(batch), keys, use_cache=True)
        past, nxt = out.get("cache"), out.logits[:, -1].argmax(-1)
        done = nxt == self.tok.eos_id
        toks = [nxt]
        for _ in range(decoding.gen_length - 1):
            keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
            pos = keys.long().sum(-1, keepdim=True) - 1
            out = self._lm()(inputs_embeds=self.hf.get_input_embeddings()(nxt[:, None]), attention_mask=keys.long(),
                             position_ids=pos, cache=past, use_cache=True)
            past = out.get("cache")
            nxt = torch.where(done, torch.full_like(nxt, self.tok.eos_id), out.logits[:, -1].argmax(-1))
            done |= nxt == self.tok.eos_id
            toks.append(nxt)
        return torch.stack(toks, dim=1)

    def phi_module(self) -> nn.Module:
        """The middle LM layer (the cross-view defense's phi for LLaVA)."""
        layers = self.hf.model.language_model.layers
        return layers[(len(layers) - 1) // 2]

    def set_trainable(self, parts: str) -> None:
        on = PARTS[parts]
        mods = {"multi_modal_projector": self.hf.model.multi_modal_projector, "language_model": self.hf.model.language_model,
                "lm_head": self.hf.lm_head, "vision_tower": self.hf.model.vision_tower}
        for name, mod in mods.items():
            mod.requires_grad_(name in on)


LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"     # LLaVA-1.5's published prompt (llava-hf model card)


def llava_key(key: str) -> str:
    """Published llava-hf key -> transformers 5 module key (the class's own load-time renaming)."""
    return rename(key, (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                        ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")))


class LlavaFull(FullStages, ChatLayout, LLaVA):
    """A published LLaVA-1.5 checkpoint (llava-hf layout: `LlavaForConditionalGeneration.save_pretrained`)
    behind the same contract: its own tokenizer and image processor, the published template, features
    at `vision_feature_layer` with `vision_feature_select_strategy`, and every method below the
    collation (embedding, loss, cached greedy decoding, CP) shared with the tiny class."""

    def __init__(self, cfg: FullConfig):
        nn.Module.__init__(self)
        from transformers import LlavaForConditionalGeneration

        self.cfg = cfg
        path = weights_dir(cfg.weights, "llava")
        self.hf, self.weights_report = offline_pretrained(LlavaForConditionalGeneration, cfg, "llava", llava_key)
        self.hf.requires_grad_(False)                    # set_trainable opens what a fine-tune trains
        self.processor = load_image_processor(path, "llava")
        hc = self.hf.config
        self.feature_layer, self.drop_cls = hc.vision_feature_layer, hc.vision_feature_select_strategy == "default"
        grid = hc.vision_config.image_size // hc.vision_config.patch_size
        self.init_chat(load_tokenizer(path, "llava"), LLAVA_TEMPLATE, grid * grid + (not self.drop_cls), hc.image_token_index)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_values(self.processor, images)

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        out = LLaVA.visual_embeds(self, images)
        if out.shape[1] != self.n_visual:
            raise BenchError(f"llava: the image processor's output gives {out.shape[1]} visual tokens, the "
                             f"config {self.n_visual} (image_size / patch_size disagree with preprocessor_config.json)")
        return out


def _check_weights(path) -> WeightsReport:
    from transformers import LlavaForConditionalGeneration
    return inspect_pretrained(LlavaForConditionalGeneration, path, "llava", llava_key)


_resolve = scale_resolver("llava", LlavaTinyConfig, lambda args: resolve_full("llava", args, check=_check_weights))


@register("models", "llava")
class LlavaEntry:
    """LLaVA-1.5 (transformers LlavaForConditionalGeneration): vision tower -> MLP projector -> causal LLaMA; scales tiny, full."""

    scales = ("tiny", "full")
    family = "autoregressive VLM"
    capabilities = ()
    trainable_parts = tuple(PARTS)
    resolve = staticmethod(_resolve)
    decoding_defaults = {"steps": 32, "block_length": 32}     # greedy, one token a step: recorded, not used

    @staticmethod
    def build(model_args: dict, tokenizer, template: str, seed: int) -> LLaVA:
        """Tiny: the class at a small config (the task's tokenizer and template). Full (model args hold
        `weights`): the published checkpoint with its own tokenizer, processor and template."""
        torch.manual_seed(seed)
        if "weights" in model_args:
            return LlavaFull(full_config("llava", model_args))
        return LLaVA(LlavaTinyConfig(**model_args), tokenizer, template)

    full_args = staticmethod(full_args)

    @staticmethod
    def check_weights(path: str) -> WeightsReport:
        """Headers and config only: what a full-scale run would load from PATH (the llava-hf layout)."""
        return _check_weights(path)

    @staticmethod
    def text_tokenizer(model_args: dict):
        """The checkpoint's tokenizer at full scale (None at tiny: the task's)."""
        def load(path):
            return (load_tokenizer(path, "llava"), read_config(path).get("image_token_index"), LLAVA_TEMPLATE, None)
        return text_tokenizer(model_args, load)

    @staticmethod
    def train_base(model: LLaVA, task, seed: int, gen_length: int) -> dict:
        """Full scale: the published checkpoint is the base (nothing to train). Tiny: the shared encoder's MIM pretraining (then frozen, copied into the SigLIP tower), then projector
        + LM on the base instruction mix with the prompt placed before/among the visual tokens in half."""
        if isinstance(model, ChatLayout):
            return base_info(model)
        cfg = model.cfg
        mim = pretrain_encoder(model._mim[0], task, cfg, seed)
        model._tower().load_state_dict(siglip_state(model._mim[0]))
        rng = np.random.default_rng([seed, 41])
        samples = [s.with_(meta={**s.meta, "prompt_at": int(rng.integers(0, model.n_visual + 1))})
                   if rng.random() < cfg.prompt_first_frac else s for s in task.base_samples()]
        base = finetune(model, samples, trainable="projector+lm", lr=cfg.base_lr, epochs=cfg.base_epochs,
                        batch_size=cfg.base_batch, seed=seed, gen_length=gen_length, desc="base LM")
        return {"mim_loss": mim[-1], "base_loss": base[-1]}
