"""LLaDA: a LLaMA-style bidirectional mask-token LM, its SFT loss and its sampler, on one screen.

Architecture per ML-GSAI/LLaDA (RMSNorm, SwiGLU, RoPE, no biases, untied head, full bidirectional
attention). Module names follow the LLaDA-V checkpoint layout (``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj`` ...) so the full-scale loader maps keys one to one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    mlp_hidden: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rope_style: str = "interleaved"   # tiny: adjacent pairs; published LLaDA / LLaMA: "half" (rotate_half)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised in fp32 and cast back (LLaMA / LLaDA), so bf16 weights keep fp32 statistics;
        for fp32 inputs this is the plain formula."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float, style: str = "interleaved") -> torch.Tensor:
    """Rotary embedding of x (B, H, L, Dh) at integer positions pos (B, L), computed in fp32 and cast
    back to x's dtype. ``interleaved`` rotates adjacent pairs (the tiny replica); ``half`` rotates the
    first half against the second (``rotate_half``: LLaMA, and LLaDA's OLMo code, ML-GSAI/LLaDA
    ``modeling_llada.py`` RotaryEmbedding) — the published weights need ``half``."""
    dh = x.shape[-1]
    inv = theta ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float32) / dh)
    ang = pos[:, None, :, None].float() * inv  # (B, 1, L, Dh/2)
    cos, sin = ang.cos(), ang.sin()
    xf = x.float()
    if style == "half":
        x1, x2 = xf[..., : dh // 2], xf[..., dh // 2:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.theta, self.rope_style = cfg.n_heads, cfg.rope_theta, cfg.rope_style
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, pos, attn_mask, past=None, keep=None):
        """past: this layer's cached (k, v) of a prefix, attended before x's own keys; keep: a list that
        receives this layer's (k, v) (a prefix cache being built)."""
        B, L, d = x.shape
        h = lambda t: t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)
        q, k, v = h(self.q_proj(x)), h(self.k_proj(x)), h(self.v_proj(x))
        q, k = rope(q, pos, self.theta, self.rope_style), rope(k, pos, self.theta, self.rope_style)
        if keep is not None:
            keep.append((k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # bidirectional: no causal mask
        return self.o_proj(y.transpose(1, 2).reshape(B, L, d))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, attn_mask, past=None, keep=None):
        x = x + self.self_attn(self.input_layernorm(x), pos, attn_mask, past, keep)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaDA(nn.Module):
    """The mask predictor p_theta(x0 | x_t): embeddings in, logits for every position out."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.checkpointing = False   # recompute each block in backward (full-scale training memory); off by default
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, embeds: torch.Tensor, key_mask: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, past: list | None = None, keep: list | None = None,
                head_from: int = 0) -> torch.Tensor:
        """embeds (B, L, d); key_mask (B, L) True where a real token. Padding is invisible to attention
        and positions count real tokens only, so padding never shifts RoPE distances.

        For a prefix cache (LaViDa's Prefix-DLM): ``keep`` collects every layer's (k, v); a later call
        passes them as ``past`` with ``pos`` of its own tokens and an ``attn_mask`` over prefix + own keys.
        ``head_from``: logits only for positions from there on (the answer; spares a 126k-vocab head on
        the prompt at full scale)."""
        if pos is None:
            pos = key_mask.long().cumsum(-1) - 1
        if attn_mask is None:
            attn_mask = key_mask[:, None, None, :]
        x = embeds
        for i, blk in enumerate(self.layers):
            if self.checkpointing and torch.is_grad_enabled() and keep is None:
                x = torch.utils.checkpoint.checkpoint(blk, x, pos, attn_mask, None if past is None else past[i],
                                                      use_reentrant=False)
            else:
                x = blk(x, pos, attn_mask, None if past is None else past[i], keep)
        return self.lm_head(self.norm(x[:, head_from:] if head_from else x))


def sft_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], response: torch.Tensor, mask_id: int,
             generator: torch.Generator | None = None, eps: float = 1e-3) -> torch.Tensor:
    """LLaDA SFT loss (GUIDELINES.md): t~U(0,1), p=(1-eps)t+eps, mask each response token w.p. p,
    loss = sum over masked of CE/p, / answer_len / B. EOS padding counts as answer (a target).

    logits_fn maps the noisy response ids (B, G) to response logits (B, G, V)."""
    B, G = response.shape
    draw = generator.device if generator is not None else response.device   # draws on the generator's device
    t = torch.rand(B, generator=generator, device=draw).to(response.device)
    p = (1 - eps) * t + eps
    masked = torch.rand(B, G, generator=generator, device=draw).to(response.device) < p[:, None]
    noisy = torch.where(masked, torch.full_like(response, mask_id), response)
    logits = logits_fn(noisy)
    ce = F.cross_entropy(logits[masked], response[masked], reduction="none")
    return (ce / p[:, None].expand(B, G)[masked]).sum() / (G * B)


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each of `steps` steps commits: n spread evenly, remainder first (generate.py)."""
    base = n_masked // steps
    out = base[:, None].repeat(1, steps)
    rem = n_masked % steps
    out += (torch.arange(steps, device=n_masked.device)[None, :] < rem[:, None]).long()
    return out


@torch.no_grad()
def generate(logits_fn: Callable[[torch.Tensor], torch.Tensor], batch: int, gen_length: int, mask_id: int,
             steps: int, block_length: int, remasking: str = "low_confidence",
             generator: torch.Generator | None = None, device: str = "cpu",
             transfer: Callable[[torch.Tensor, int], torch.Tensor] = num_transfer_tokens,
             suppress: tuple[int, ...] = ()) -> torch.Tensor:
    """Semi-autoregressive masked-diffusion sampling, greedy (LLaDA generate.py, temperature 0).

    The answer starts all-MASK; blocks of block_length are filled left to right, each in
    steps/num_blocks steps; a step commits the k masked positions of the current block with the
    highest confidence (low_confidence: softmax prob of the argmax; random: uniform scores).
    logits_fn maps the current answer ids (B, G) to answer logits (B, G, V); transfer(n_masked, steps)
    gives how many tokens each step commits (LLaDA: an even split; LaViDa: its shifted schedule);
    ``suppress``: ids never committed besides MASK (published LLaDA-V: eos, bos and the header tokens)."""
    x = torch.full((batch, gen_length), mask_id, dtype=torch.long, device=device)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        k = transfer((x[:, lo:hi] == mask_id).sum(1), per_block)
        for i in range(per_block):
            is_mask = x == mask_id
            logits = logits_fn(x)
            logits = logits.index_fill(-1, torch.tensor([mask_id, *suppress], device=device), -math.inf)  # never commit MASK
            x0 = logits.argmax(-1)
            if remasking == "low_confidence":
                conf = torch.softmax(logits.float(), -1).gather(-1, x0[..., None]).squeeze(-1)
            elif remasking == "random":
                conf = torch.rand(x.shape, generator=generator, device=device)
            else:
                raise ValueError(remasking)
            conf[:, hi:] = -math.inf
            conf = torch.where(is_mask, conf, torch.full_like(conf, -math.inf))
            x0 = torch.where(is_mask, x0, x)
            kk = k[:, i]
            kmax = int(kk.max())
            if kmax == 0:
                continue
            idx = torch.topk(conf, kmax, dim=-1).indices
            keep = torch.arange(kmax, device=device)[None, :] < kk[:, None]
            commit = torch.zeros_like(is_mask).scatter(1, idx, keep)
            x = torch.where(commit, x0, x)
    return x
