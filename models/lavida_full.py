"""LaViDa at full scale (jacklishufan/LaViDa, checkpoint lavida-llada-v1.0-instruct) in our modules.

The same LLaDA-8B LM and vision side as ``models.llada_v_full`` with LaViDa's differences, each the tiny
replica's code (``models.lavida``) run on the published geometry:

- **Keys**: the LM under LLaDA's OLMo names, mapped one to one to ours (``model.transformer.wte`` ->
  ``embed_tokens``; ``blocks.{i}.{q,k,v}_proj`` -> ``self_attn.*``; ``attn_out`` -> ``o_proj``;
  ``ff_proj`` -> ``mlp.gate_proj``; ``up_proj`` -> ``mlp.up_proj``; ``blocks.{i}.ff_out`` -> ``mlp.down_proj``;
  ``attn_norm`` / ``ff_norm`` -> the two RMSNorms; ``ln_f`` -> ``norm``), the **global**
  ``model.transformer.ff_out`` -> ``lm_head`` matched before the per-block ``ff_out``. Vision tower,
  projector and newline keep LLaDA-V's names.
- **Views pooled**: every view's 27 x 27 projected tokens pooled bilinearly to 14 x 14 before the anyres
  merge (384^2 -> 196 + 14 x 15 = 406 visual tokens).
- **Training**: complementary masking (``models.lavida.complementary_loss``).
- **Decoding**: the LLaDA sampler with the ``shift`` schedule, and with ``prefix_dlm`` the prompt's K/V
  computed once and reused (``models.lavida.LaViDa.cached_answer_logits``).
- Template: LLaDA's chat template as LLaDA-V's (LaViDa's conversation template with the same system
  prompt is assumed: unverified).
"""
from __future__ import annotations

import re
from dataclasses import replace

import torch

from models.base import Batch
from models.lavida import LaViDa, complementary_loss, shifted_transfer_counts
from models.llada import generate
from models.llada_v_full import FullConfig, FullLLaDAV, llada_v_ckpt_key, llada_v_key

_BLOCK = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
          "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
          "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}
_GLOBAL = {"model.transformer.ff_out.weight": "lm.lm_head.weight",      # the global ff_out first
           "model.transformer.wte.weight": "lm.embed_tokens.weight",
           "model.transformer.ln_f.weight": "lm.norm.weight"}
_BLOCK_RE = re.compile(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.weight$")


def lavida_key(key: str) -> str | None:
    """Published LaViDa key (OLMo names for the LM) -> our module key, or None."""
    if key in _GLOBAL:
        return _GLOBAL[key]
    if key.startswith("model.transformer."):
        m = _BLOCK_RE.match(key)
        if m and m.group(2) in _BLOCK:
            return f"lm.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
        return None
    if key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
        return None                      # LLaMA names are LLaDA-V's layout, not LaViDa's
    return llada_v_key(key)


_INV_GLOBAL = {v: k for k, v in _GLOBAL.items()}
_INV_BLOCK = {v: k for k, v in _BLOCK.items()}


def lavida_ckpt_key(module_key: str) -> str:
    """The inverse: our module key -> the published LaViDa key."""
    if module_key in _INV_GLOBAL:
        return _INV_GLOBAL[module_key]
    m = re.match(r"lm\.layers\.(\d+)\.(.+)\.weight$", module_key)
    if m:
        return f"model.transformer.blocks.{m.group(1)}.{_INV_BLOCK[m.group(2)]}.weight"
    return llada_v_ckpt_key(module_key)


def lavida_config(**over) -> FullConfig:
    """LaViDa's published settings on the FullConfig geometry: 14 x 14 pooled views."""
    return FullConfig(**{"pool_side": 14, **over})


class FullLaViDa(FullLLaDAV):
    """LaViDa's published architecture: LLaDA-V's modules with pooled views, complementary masking,
    the shift schedule and the Prefix-DLM cache."""

    key_map = staticmethod(lavida_key)
    ckpt_key = staticmethod(lavida_ckpt_key)

    def __init__(self, cfg: FullConfig, tokenizer=None):
        if not cfg.pool_side:
            cfg = replace(cfg, pool_side=14)
        super().__init__(cfg, tokenizer)

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        pe = self.prompt_embeds(batch, visual_mask=batch.visual_mask)
        pe2, km2 = torch.cat([pe, pe]), torch.cat([batch.key_mask, batch.key_mask])
        return complementary_loss(lambda a: self.answer_logits(pe2, km2, a).float(), self._on(batch.response),
                                  self.mask_id, generator)

    def prefix_cache(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor) -> list:
        """Every layer's (k, v) of the prompt attending only itself (no logits computed for the prompt)."""
        keep: list = []
        self.lm(prompt_embeds, self._on(key_mask), keep=keep, head_from=prompt_embeds.shape[1])
        return keep

    def cached_answer_logits(self, cache: list, key_mask: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        return LaViDa.cached_answer_logits(self, cache, self._on(key_mask), self._on(answer_ids))

    def prefix_dlm_logits(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        return LaViDa.prefix_dlm_logits(self, prompt_embeds, self._on(key_mask), self._on(answer_ids))

    @torch.no_grad()
    def generate(self, batch: Batch, decoding, visual_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, prefix_dlm: bool | None = None) -> torch.Tensor:
        """The LLaDA sampler with the shift schedule; with the Prefix-DLM cache (``cfg.prefix_dlm`` unless
        ``prefix_dlm`` is given) the prompt runs once and every step only the answer."""
        pe = self.prompt_embeds(batch, visual_mask=visual_mask)
        if self.cfg.prefix_dlm if prefix_dlm is None else prefix_dlm:
            cache = self.prefix_cache(pe, batch.key_mask)
            logits_fn = lambda a: self.cached_answer_logits(cache, batch.key_mask, a)
        else:
            logits_fn = lambda a: self.answer_logits(pe, batch.key_mask, a)
        return generate(logits_fn, len(batch), decoding.gen_length, self.mask_id, decoding.steps, decoding.block_length,
                        decoding.remasking, generator, device=self.device, suppress=self.suppress,
                        transfer=lambda n, k: shifted_transfer_counts(n, k, self.cfg.shift)).cpu()
