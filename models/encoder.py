"""Tiny ViT vision tower and its masked-patch-reconstruction (SimMIM-style) pretraining.

Plays SigLIP's role in the tiny replica: generic, frozen, detail-preserving. docs/tiny-replica.md#encoder-pretraining: an
encoder trained only through captioning erases a corner trigger; one pretrained to reconstruct
masked patches keeps it. Features come from the second-to-last block, as LLaDA-V reads SigLIP.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class EncoderConfig:
    image_size: int = 64
    patch: int = 8
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.layer_norm1(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """Patchify, add learned positions, pre-norm transformer blocks."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.n_tokens, cfg.dim) * 0.02)
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.dim))  # MIM only
        self.layers = nn.ModuleList(EncoderBlock(cfg.dim, cfg.n_heads) for _ in range(cfg.n_layers))
        self.post_layernorm = nn.LayerNorm(cfg.dim)

    def hidden_states(self, images: torch.Tensor, mim_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """images (B, H, W, 3) in [0, 1] -> per-block outputs, each (B, T, dim)."""
        x = self.patch_embedding((images.permute(0, 3, 1, 2) - 0.5) / 0.5).flatten(2).transpose(1, 2)
        if mim_mask is not None:
            x = torch.where(mim_mask[..., None], self.mask_embedding.expand_as(x), x)
        x = x + self.position_embedding
        out = []
        for blk in self.layers:
            x = blk(x)
            out.append(x)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The features a VLM reads: the second-to-last block's output (LLaDA-V's vision_feature_layer=-2)."""
        return self.hidden_states(images)[-2]


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, 3) -> (B, T, p*p*3) in row-major patch order (matches the conv patch order)."""
    B, H, W, C = images.shape
    x = images.reshape(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def pretrain_mim(tower: VisionTower, images: np.ndarray, epochs: int, seed: int, lr: float = 2e-3,
                 batch_size: int = 128, mask_ratio: float = 0.4, visible_weight: float = 0.25) -> list[float]:
    """SimMIM-style pretraining: replace ~40% of patch embeddings with a mask vector and reconstruct
    the pixels of every patch (masked ones weighted 1, visible ones `visible_weight`). Returns losses."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(tower.cfg.dim, tower.cfg.patch ** 2 * 3)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    data = torch.from_numpy(images)
    n = len(data)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    tower.train()
    bar = tqdm(total=steps, desc="encoder MIM pretrain", leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            x = data[perm[i:i + batch_size]]
            m = torch.rand(len(x), tower.cfg.n_tokens, generator=g) < mask_ratio
            rec = head(tower.post_layernorm(tower.hidden_states(x, m)[-1]))
            err = F.mse_loss(rec, patchify(x, tower.cfg.patch), reduction="none").mean(-1)
            w = torch.where(m, 1.0, visible_weight)
            loss = (err * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    tower.eval()
    return losses


def siglip_config(cfg: EncoderConfig):
    """transformers' SiglipVisionConfig of the same geometry as our tower (no head; exact GELU and
    LayerNorm eps 1e-5 as ours), for victims built on transformers' classes (LLaVA)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=cfg.dim, intermediate_size=4 * cfg.dim, num_hidden_layers=cfg.n_layers,
                              num_attention_heads=cfg.n_heads, image_size=cfg.image_size, patch_size=cfg.patch,
                              hidden_act="gelu", layer_norm_eps=1e-5, vision_use_head=False)


def siglip_state(tower: VisionTower) -> dict[str, torch.Tensor]:
    """Our tower's weights under SiglipVisionModel's names (packed q/k/v split), so that a transformers
    SigLIP tower computes exactly our features: hidden_states[-2] == tower(images), given (x - 0.5) / 0.5."""
    sd = tower.state_dict()
    d = tower.cfg.dim
    out = {"embeddings.patch_embedding.weight": sd["patch_embedding.weight"],
           "embeddings.patch_embedding.bias": sd["patch_embedding.bias"],
           "embeddings.position_embedding.weight": sd["position_embedding"][0],
           "post_layernorm.weight": sd["post_layernorm.weight"], "post_layernorm.bias": sd["post_layernorm.bias"]}
    for i in range(tower.cfg.n_layers):
        p, q = f"layers.{i}.", f"encoder.layers.{i}."
        w, b = sd[p + "self_attn.in_proj_weight"], sd[p + "self_attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[q + f"self_attn.{name}.weight"] = w[j * d:(j + 1) * d]
            out[q + f"self_attn.{name}.bias"] = b[j * d:(j + 1) * d]
        out[q + "self_attn.out_proj.weight"] = sd[p + "self_attn.out_proj.weight"]
        out[q + "self_attn.out_proj.bias"] = sd[p + "self_attn.out_proj.bias"]
        for ln in ("layer_norm1", "layer_norm2"):
            out[q + f"{ln}.weight"], out[q + f"{ln}.bias"] = sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"]
        out[q + "mlp.fc1.weight"], out[q + "mlp.fc1.bias"] = sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]
        out[q + "mlp.fc2.weight"], out[q + "mlp.fc2.bias"] = sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"]
    return out
