"""The victim-model contract: a core every architecture implements (tiny replicas and full-scale
adapters, diffusion and autoregressive) and capabilities some families add.

Defenses talk to models only through this interface and declare the capabilities they need
(``Defense.requires``); a cell whose victim lacks one is refused before any work. DiSP needs
``masked-diffusion`` (a mask embedding that means "unknown" in the context, generation with chosen
visual positions held masked).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable, Protocol, Sequence

import torch

from core.errors import BenchError
from tasks.base import Sample


@dataclass
class Batch:
    """Collated inputs: images (B, H, W, 3); ids (B, S) the prompt sequence with image placeholders;
    key_mask (B, S) True on real tokens; vis_pos (B, T_img) where the visual tokens sit;
    response (B, G) answer ids padded with EOS, or None; visual_mask (B, T_img) visual tokens held at
    e_MASK during training (base-model augmentation), or None."""

    images: torch.Tensor
    ids: torch.Tensor
    key_mask: torch.Tensor
    vis_pos: torch.Tensor
    response: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx) -> "Batch":
        return Batch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                        for f in fields(self)})


MASKED_DIFFUSION = "masked-diffusion"
IMAGE_ATTENTION = "image-attention"     # image_attention(batch): per-layer attention of the last prompt token (BYE)
CAPABILITIES = (MASKED_DIFFUSION, IMAGE_ATTENTION)


class VictimModel(Protocol):
    """The core every victim implements, whatever its family: what the pipeline, the metrics and a
    family-agnostic defense may call. A model entry lists its extra capabilities in ``capabilities``."""

    n_visual: int                 # visual tokens per image

    def collate(self, samples: Sequence[Sample], with_response: bool = True) -> Batch: ...

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder + projector: (B, T_img, d) visual input embeddings (differentiable w.r.t. the projector)."""

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def first_answer_logits(self, batch: Batch, visual_mask: torch.Tensor | None = None,
                            gen_length: int = 32) -> torch.Tensor:
        """(B, V) logits of the first answer token given the prompt (option scoring for CP);
        ``visual_mask`` hides those visual tokens (all of them: CP blind); ``gen_length`` is the
        answer a masked-diffusion model sees fully masked (an autoregressive one ignores it)."""

    def generate(self, batch: Batch, decoding, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def supervised_positions(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the answer as the model sees it in one training draw, (B, G) positions the loss supervises)."""

    def view_logits(self, batch: Batch, answer: torch.Tensor) -> torch.Tensor:
        """(B, G, V) answer logits for the batch's images given that answer (a training-time view)."""

    def phi_module(self) -> torch.nn.Module:
        """The module whose output is the family's middle-layer feature phi (cross-view defense)."""

    def phi_pool(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B, d) per-sample phi from phi_module()'s output."""

    def set_trainable(self, parts: str) -> None: ...

    def decode(self, ids: torch.Tensor) -> list[str]: ...


class MaskedDiffusion(VictimModel, Protocol):
    """The masked-diffusion capability (LLaDA-V, LaViDa): a mask token that means "unknown" anywhere in
    the context, answer logits under a partly masked answer, and generation with chosen visual
    positions held at the mask embedding (what DiSP's masked inference needs)."""

    visual_span: slice            # positions of the visual tokens in the prompt sequence
    mask_id: int

    def mask_embedding(self) -> torch.Tensor: ...

    def prompt_embeds(self, batch: Batch, visual: torch.Tensor | None = None,
                      visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, d) input embeddings; visual positions where visual_mask is True become e_MASK."""

    def answer_logits(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor,
                      answer_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) of the answer segment given the prompt embeddings and current answer ids."""

    def generate(self, batch: Batch, decoding, visual_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor: ...


def scale_resolver(name: str, tiny: type, full: Callable[[dict], dict], defaults: dict | None = None):
    """A model entry's ``resolve(scale, overrides) -> model_args``, the same for every victim: scale
    'full' hands the overrides to the entry's full-scale resolver ``full`` (the published checkpoint's
    args); 'tiny' checks them against the tiny config dataclass ``tiny`` (unknown keys refused) and
    returns its fields, entry ``defaults`` under the overrides; any other scale is refused."""
    def resolve(scale: str, overrides: dict) -> dict:
        if scale == "full":
            return full(overrides)
        if scale != "tiny":
            raise BenchError(f"unknown scale {scale!r} for {name} (valid: tiny, full)")
        valid = sorted(f.name for f in fields(tiny))
        unknown = set(overrides) - set(valid)
        if unknown:
            raise BenchError(f"unknown model arg(s) {sorted(unknown)} (valid: {', '.join(valid)})")
        return asdict(tiny(**{**(defaults or {}), **overrides}))
    return resolve
