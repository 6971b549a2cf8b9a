"""The victim-model contract every architecture implements (tiny replicas and full-scale adapters).

Defenses talk to models only through this interface: DiSP and cross-view need the visual input
embeddings, gradients w.r.t. them, and generation with chosen visual positions held masked.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, Sequence

import torch

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


class VictimModel(Protocol):
    """What the pipeline, the metrics and every defense may call."""

    visual_span: slice          # positions of the visual tokens in the prompt sequence
    mask_id: int

    def collate(self, samples: Sequence[Sample], with_response: bool = True) -> Batch: ...

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder + projector: (B, T_img, d) visual input embeddings."""

    def prompt_embeds(self, batch: Batch, visual: torch.Tensor | None = None,
                      visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S, d) input embeddings; visual positions where visual_mask is True become e_MASK."""

    def answer_logits(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor,
                      answer_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, G, V) of the answer segment given the prompt embeddings and current answer ids."""

    def mask_embedding(self) -> torch.Tensor: ...

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def generate(self, batch: Batch, decoding, visual_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor: ...

    def set_trainable(self, parts: str) -> None: ...

    def decode(self, ids: torch.Tensor) -> list[str]: ...
