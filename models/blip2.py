"""BLIP-2 (Li et al. 2023; transformers' `Blip2ForConditionalGeneration`): a frozen ViT, a Q-Former whose
learned queries cross-attend to the image features, a linear projection into a causal LM; an
autoregressive victim of the cross-view paper.

The `tiny` scale is transformers' own class at a small config, trained here on the embedded task. Its
own ViT is replaced by the frozen tiny encoder every victim reads (a `SiglipVisionModel` holding it
exactly, `models.encoder.siglip_state`, over the same base view + four crops as LLaDA-V), whose
second-to-last-layer features the Q-Former reads, so victims differ by architecture, not by what they
see; the composite's `vision_model` slot holds that tower. The LM sees `num_query_tokens` (16)
projected query outputs where the prompt has its image placeholders. LM: a LLaMA of the tiny LLaDA's
size, next-token loss on the answer, cached greedy decoding (shared with LLaVA).

The `full` scale (`Blip2Full`) is `from_pretrained(PATH)` of a published decoder-only BLIP-2 checkpoint,
offline and strict (`models.published`), with its tokenizer and image processor and the plain prompt
`Question: {Q} Answer:` after the 32 query tokens; greedy decoding from `inputs_embeds`.

Trainable parts (the issue's mapping of BLIP-2's modules): `projector` = `qformer` + `query_tokens` +
`language_projection`; `projector+lm` adds `language_model`; `all` adds the vision tower. phi for the
cross-view defense is the Q-Former output. No masked-diffusion capability: DiSP is refused up front.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.errors import BenchError
from core.registry import register
from models.base import Batch, scale_resolver
from models.encoder import VisionTower, siglip_config, siglip_state
from models.checkpoint import FullStages, WeightsReport, read_config
from models.llava import LLaVA, LlavaEntry, LlavaTinyConfig
from models.published import (ChatLayout, FullConfig, full_args, full_config, inspect_pretrained,
                              load_image_processor, load_tokenizer, offline_pretrained, pixel_values, resolve_full,
                              text_tokenizer, weights_dir)

PARTS = {"projector": ("qformer", "query_tokens", "language_projection"),
         "projector+lm": ("qformer", "query_tokens", "language_projection", "language_model"),
         "all": ("qformer", "query_tokens", "language_projection", "language_model", "vision_model")}


@dataclass(frozen=True)
class Blip2TinyConfig(LlavaTinyConfig):
    num_query_tokens: int = 16      # learned queries = visual tokens the LM sees (published: 32)
    qformer_dim: int = 64
    qformer_layers: int = 2

    def __post_init__(self):
        super().__post_init__()
        if min(self.num_query_tokens, self.qformer_dim, self.qformer_layers) < 1 or self.qformer_dim % self.n_heads:
            raise BenchError("num_query_tokens, qformer_dim and qformer_layers must be >= 1 and qformer_dim a "
                             "multiple of n_heads")


class BLIP2(LLaVA):
    """A `Blip2ForConditionalGeneration` behind the victim core contract; decoding and the AR loss as LLaVA."""

    def __init__(self, cfg: Blip2TinyConfig, tokenizer, template: str):
        nn.Module.__init__(self)
        from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, LlamaConfig,
                                  SiglipVisionModel)

        self.cfg, self.tok, self.template = cfg, tokenizer, template
        enc = cfg.encoder()
        self._mim = [VisionTower(enc)]     # first, as in every tiny victim: the same seed gives the same encoder
        text = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_hidden,
                           num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_heads, max_position_embeddings=512, rms_norm_eps=1e-5,
                           pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                           tie_word_embeddings=False)
        qformer = Blip2QFormerConfig(hidden_size=cfg.qformer_dim, num_hidden_layers=cfg.qformer_layers,
                                     num_attention_heads=cfg.n_heads, intermediate_size=4 * cfg.qformer_dim,
                                     encoder_hidden_size=enc.dim, vocab_size=tokenizer.vocab_size)
        config = Blip2Config(vision_config=siglip_config(enc).to_dict(), qformer_config=qformer.to_dict(),
                             text_config=text.to_dict(), num_query_tokens=cfg.num_query_tokens,
                             image_token_index=tokenizer.image_id)
        self.hf = Blip2ForConditionalGeneration(config)
        self.hf.vision_model = SiglipVisionModel(siglip_config(enc))        # the shared frozen encoder
        self.hf.vision_model.load_state_dict(siglip_state(self._mim[0]))
        self.init_layout(tokenizer, template, cfg.num_query_tokens)

    def _tower(self) -> nn.Module:
        return self.hf.vision_model

    def _lm(self) -> nn.Module:
        return self.hf.language_model

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of every view -> the Q-Former's queries cross-attend to all of them -> the
        language projection: (B, num_query_tokens, d_model)."""
        feats = self.view_features(images)
        queries = self.hf.query_tokens.expand(len(images), -1, -1)
        q = self.hf.qformer(query_embeds=queries, encoder_hidden_states=feats,
                            encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long))[0]
        return self.hf.language_projection(q)

    def phi_module(self) -> nn.Module:
        """The Q-Former (the cross-view defense's phi for BLIP-2 is its output)."""
        return self.hf.qformer

    def phi_pool(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return out.mean(1)

    def set_trainable(self, parts: str) -> None:
        on = PARTS[parts]
        for name in ("qformer", "language_projection", "language_model", "vision_model"):
            getattr(self.hf, name).requires_grad_(name in on)
        self.hf.query_tokens.requires_grad_("query_tokens" in on)


def _tokens(path) -> tuple:
    """The checkpoint's tokenizer and image-token id: `config.image_token_index`, else the tokenizer's
    `<image>`; a snapshot with neither is refused by name (transformers 5's BLIP-2 trap)."""
    tokenizer = load_tokenizer(path, "blip2")
    image_id = read_config(path).get("image_token_index")
    if image_id is None:
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise BenchError(f"blip2: {path} predates transformers' BLIP-2 image tokens: config.json has no "
                             "image_token_index and the tokenizer no <image> token (use a snapshot with the "
                             "updated processor files)")
    return tokenizer, image_id


def blip2_key(key: str) -> str:
    """Published BLIP-2 keys are the transformers 5 module keys (vision_model, qformer, query_tokens,
    language_projection, language_model.*)."""
    return key


BLIP2_TEMPLATE = "<image>Question: {prompt} Answer:"   # BLIP-2's VQA prompt; the query tokens come before the BOS


class Blip2Full(FullStages, ChatLayout, BLIP2):
    """A published BLIP-2 checkpoint with a decoder-only LM (Salesforce/blip2-opt-*), behind the same
    contract: its own tokenizer and image processor, `num_query_tokens` image tokens placed before the
    BOS as transformers 5's `Blip2Processor` does, the ViT's last (post-layernorm) hidden state read by
    the Q-Former, and the tiny class's Q-Former, projection, loss, decoding and CP code.

    transformers 5 trap (FULL-SCALE.md): the image-token id comes from `config.image_token_index` (or the
    tokenizer's `<image>` token); a snapshot with neither is refused by name rather than run with
    positions that no embedding fills. The visual tokens are scattered into `inputs_embeds` here, so
    nothing relies on the class's own `forward` or `generate`."""

    def __init__(self, cfg: FullConfig):
        nn.Module.__init__(self)
        from transformers import Blip2ForConditionalGeneration

        self.cfg = cfg
        path = weights_dir(cfg.weights, "blip2")
        self.hf, self.weights_report = offline_pretrained(Blip2ForConditionalGeneration, cfg, "blip2", blip2_key)
        if not self.hf.config.use_decoder_only_language_model:
            raise BenchError(f"blip2: {path} has an encoder-decoder LM ({self.hf.config.text_config.model_type}); "
                             "only decoder-only BLIP-2 checkpoints (OPT) are supported")
        self.hf.requires_grad_(False)                    # set_trainable opens what a fine-tune trains
        self.processor = load_image_processor(path, "blip2")
        tokenizer, image_id = _tokens(path)
        self.init_chat(tokenizer, BLIP2_TEMPLATE, self.hf.config.num_query_tokens, image_id, image_first=True)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_values(self.processor, images)

    def _tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """BLIP-2 reads the ViT's last hidden state (after its post-layernorm), CLS included."""
        return self._tower()(pixel_values=pixels).last_hidden_state


def _check_weights(path) -> WeightsReport:
    from transformers import Blip2ForConditionalGeneration
    return inspect_pretrained(Blip2ForConditionalGeneration, path, "blip2", blip2_key)


_resolve = scale_resolver("blip2", Blip2TinyConfig, lambda args: resolve_full("blip2", args, check=_check_weights))


@register("models", "blip2")
class Blip2Entry:
    """BLIP-2 (transformers Blip2ForConditionalGeneration): frozen encoder -> Q-Former queries -> projection -> causal LM; scales tiny, full."""

    scales = ("tiny", "full")
    family = "autoregressive VLM"
    capabilities = ()
    trainable_parts = tuple(PARTS)
    resolve = staticmethod(_resolve)
    decoding_defaults = LlavaEntry.decoding_defaults

    @staticmethod
    def build(model_args: dict, tokenizer, template: str, seed: int) -> BLIP2:
        torch.manual_seed(seed)
        if "weights" in model_args:
            return Blip2Full(full_config("blip2", model_args))
        return BLIP2(Blip2TinyConfig(**model_args), tokenizer, template)

    full_args = staticmethod(full_args)

    @staticmethod
    def check_weights(path: str) -> WeightsReport:
        """Headers and config only: what a full-scale run would load from PATH (the Salesforce layout)."""
        return _check_weights(path)

    @staticmethod
    def text_tokenizer(model_args: dict):
        """The checkpoint's tokenizer at full scale (None at tiny: the task's)."""
        return text_tokenizer(model_args, lambda path: (*_tokens(path), BLIP2_TEMPLATE, None))

    @staticmethod
    def train_base(model: BLIP2, task, seed: int, gen_length: int) -> dict:
        return LlavaEntry.train_base(model, task, seed, gen_length)
