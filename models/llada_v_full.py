"""LLaDA-V at full scale: the published checkpoint (GSAI-ML/LLaDA-V) in our own modules, loaded strictly.

What runs (facts from ML-GSAI/LLaDA-V ``train/llava/...`` as summarised in the project's FULL-SCALE notes):

- **LM**: ``models.llada.LLaDA`` (the tiny replica's module, LLaMA names) at 4096 x 32 layers, 32 heads,
  FFN 12288, RoPE theta 5e5 in the ``half`` (rotate_half) convention, RMSNorm eps 1e-5 in fp32, untied
  head, bidirectional attention.
- **Vision**: transformers' ``SiglipVisionModel`` (so400m/14-384) with the stored depth (26 of SigLIP's
  27 layers; no head); features = the last stored layer, before ``post_layernorm``.
- **Projector** ``mlp2x_gelu`` (``model.mm_projector.{0,2}``, 1152 -> 4096 -> 4096, exact GELU) and
  ``model.image_newline``.
- **anyres_max_4** (LLaVA-OneVision ``prepare_inputs_labels_for_multimodal``): grids 1x1..6x6 of 384-px
  views; the best grid for the image (most effective resolution, then least waste); the base view (the
  image resized to 384: 729 tokens, no newline) and the grid's feature map unpadded to the image's aspect,
  shrunk bilinearly when its area exceeds 4 x 729 by more than 1.1^2, one ``image_newline`` per row.
  A 384^2 image gives 729 + 27 x 28 = 1485 visual tokens.
- **Template** (LLaMA-3 style, ``conv_llada_plain``-like) and special ids from the checkpoint's tokenizer
  (``models.hf_tokenizer``); **sampler**: ``models.llada.generate``, the tiny replica's, with eos, bos and
  the header ids never committed and <|eot_id|> ending the answer.

Loading is strict (``models.checkpoint``): geometry is read from the safetensors headers (never from
config.json alone), every key maps one to one with equal shape, or the run stops with exit 2. Devices
through accelerate: bf16 on a GPU that supports it, fp32 on CPU. At full scale the projector trains by
default (the DiSP paper's recipe; ``projector+lm`` and ``all`` as at tiny scale); a stage stores the
trained parts plus the checkpoint's hash (``models.checkpoint.FullStages``).

``write_synthetic_checkpoint`` writes a random model of any size in this published layout (shards +
index + config.json + a word-level tokenizer): tests and tiny-random end-to-end cells use it.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import BenchError
from models import checkpoint as ckpt
from models.checkpoint import resolve_device
from models.base import Batch
from models.hf_tokenizer import LLADA_SPECIALS, CheckpointTokenizer, write_word_tokenizer
from models.llada import LLaDA, LMConfig, generate, sft_loss
from models.llada_v import LLaDAV
from tasks.base import Sample

SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
          "the user provides, and assist the user with a variety of tasks using natural language.")
TEMPLATE = ("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
GEOMETRY = ("vocab_size", "d_model", "n_layers", "mlp_hidden", "vis_width", "vis_layers", "vis_mlp", "view_size", "patch")


@dataclass(frozen=True)
class FullConfig:
    """A full-scale run's model args. ``weights``: the checkpoint directory; ``checkpoint``: its hash,
    ``dtype`` / ``device``: resolved at spec time so every record pins them. The geometry fields are
    read from the checkpoint's headers (published values as defaults, for random builds)."""

    weights: str = ""
    checkpoint: str = ""
    dtype: str = "auto"             # auto: bfloat16 on a bf16-capable GPU, else float32
    device: str = "auto"            # auto: accelerate's device (cuda if present, else cpu)
    image_size: int = 384           # side of the task's (square) images: fixes n_visual for the run
    max_prompt: int = 64            # question tokens (padded to this)
    vocab_size: int = 126464
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    mlp_hidden: int = 12288
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    vis_width: int = 1152
    vis_layers: int = 26            # stored SigLIP layers (27 - 1)
    vis_heads: int = 16
    vis_mlp: int = 4304
    view_size: int = 384
    patch: int = 14
    max_grid: int = 6               # anyres grids 1x1 .. max_grid x max_grid
    max_patches: int = 4            # anyres_max_4
    pool_side: int = 0              # LaViDa: every view pooled to pool_side^2 tokens (14); 0: none
    shift: float = 1.0              # LaViDa sampler: the shift schedule's s
    prefix_dlm: bool = False        # LaViDa sampler: Prefix-DLM prompt cache

    def __post_init__(self):
        for name in ("image_size", "max_prompt", "d_model", "n_layers", "n_heads", "vis_width", "vis_layers",
                     "vis_heads", "view_size", "patch", "max_grid", "max_patches"):
            if getattr(self, name) < 1:
                raise BenchError(f"model arg {name} must be >= 1, got {getattr(self, name)}")
        if self.pool_side < 0:
            raise BenchError(f"model arg pool_side must be >= 0 (0: no pooling), got {self.pool_side}")
        if not self.shift > 0:
            raise BenchError(f"model arg shift must be > 0, got {self.shift}")
        if self.view_size < self.patch or self.d_model % self.n_heads or self.vis_width % self.vis_heads:
            raise BenchError("view_size must be >= patch, and widths multiples of their head counts")

    @property
    def grid_side(self) -> int:
        """Tokens per view side after the optional pooling (27, or LaViDa's 14)."""
        return self.pool_side or self.view_size // self.patch


# ---- anyres (LLaVA-NeXT / OneVision) ---------------------------------------------------------------
def select_grid(height: int, width: int, view: int, max_grid: int) -> tuple[int, int]:
    """(rows, cols) of the anyres grid for an image: among (cols*view, rows*view) for 1..max_grid each,
    the most effective resolution after fitting the image, ties broken by the least wasted area
    (LLaVA-NeXT ``select_best_resolution``; candidates in its (i, j) order, first wins)."""
    best, best_fit, best_waste = (1, 1), -1, math.inf
    for i in range(1, max_grid + 1):
        for j in range(1, max_grid + 1):
            W, H = i * view, j * view
            scale = min(W / width, H / height)
            fit = min(int(width * scale) * int(height * scale), width * height)
            waste = W * H - fit
            if fit > best_fit or (fit == best_fit and waste < best_waste):
                best, best_fit, best_waste = (j, i), fit, waste
    return best


def unpad_extent(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of an (h, w) feature map that hold the image, not its padding
    (LLaVA-NeXT ``unpad_image``)."""
    if width / height > w / h:
        new_h = int(height * (w / width))
        pad = (h - new_h) // 2
        return pad, h - pad, 0, w
    new_w = int(width * (h / height))
    pad = (w - new_w) // 2
    return 0, h, pad, w - pad


def _shrunk(h: int, w: int, unit: int, max_patches: int) -> tuple[int, int] | None:
    times = math.sqrt(h * w / (max_patches * unit ** 2))
    return (int(h // times), int(w // times)) if times > 1.1 else None


def visual_token_count(height: int, width: int, cfg: FullConfig) -> int:
    """Visual tokens the LM reads for one image: base view + unpadded (maybe shrunk) grid + one newline per row."""
    u = cfg.grid_side
    rows, cols = select_grid(height, width, cfg.view_size, cfg.max_grid)
    r0, r1, c0, c1 = unpad_extent(rows * u, cols * u, height, width)
    h, w = r1 - r0, c1 - c0
    h, w = _shrunk(h, w, u, cfg.max_patches) or (h, w)
    return u * u + h * (w + 1)


def anyres_views(image: torch.Tensor, cfg: FullConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """(H, W, 3) image in [0, 1] -> ((1 + rows*cols, 3, view, view) SigLIP-normalised views, (rows, cols)).
    Base view: the image resized to view x view; grid: the image fitted into the grid's canvas keeping
    its aspect, centred on black, cut row-major (LLaVA-NeXT ``resize_and_pad_image`` /
    ``divide_to_patches``). Resizing is torch bicubic with antialiasing (the reference uses PIL bicubic)."""
    H, W, _ = image.shape
    v = cfg.view_size
    rows, cols = select_grid(H, W, v, cfg.max_grid)
    x = image.permute(2, 0, 1)[None].float()
    resize = lambda t, size: F.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    base = resize(x, (v, v))
    TH, TW = rows * v, cols * v
    sw, sh = TW / W, TH / H
    nh, nw = (min(math.ceil(H * sw), TH), TW) if sw < sh else (TH, min(math.ceil(W * sh), TW))
    canvas = torch.zeros(1, 3, TH, TW)
    top, left = (TH - nh) // 2, (TW - nw) // 2
    canvas[:, :, top:top + nh, left:left + nw] = resize(x, (nh, nw))
    crops = canvas.reshape(3, rows, v, cols, v).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, v, v)
    return (torch.cat([base, crops]) - 0.5) / 0.5, (rows, cols)


# ---- key maps ----------------------------------------------------------------------------------
_LLADA_V_RULES = (("model.vision_tower.vision_tower.vision_model.", "vision_tower."), ("model.mm_projector.", "mm_projector."),
                  ("model.image_newline", "image_newline"), ("model.embed_tokens.", "lm.embed_tokens."),
                  ("model.layers.", "lm.layers."), ("model.norm.", "lm.norm."), ("lm_head.", "lm.lm_head."))


def llada_v_key(key: str) -> str | None:
    """Published LLaDA-V key (LLaMA names) -> our module key, or None (not modelled)."""
    for old, new in _LLADA_V_RULES:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def llada_v_ckpt_key(module_key: str) -> str:
    """The inverse: our module key -> the published LLaDA-V key (writing synthetic checkpoints)."""
    for old, new in _LLADA_V_RULES:
        if module_key == new or (new.endswith(".") and module_key.startswith(new)):
            return old + module_key[len(new):]
    raise KeyError(module_key)


# ---- the model ---------------------------------------------------------------------------------
def siglip_config(cfg: FullConfig):
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=cfg.vis_width, intermediate_size=cfg.vis_mlp, num_hidden_layers=cfg.vis_layers,
                              num_attention_heads=cfg.vis_heads, image_size=cfg.view_size, patch_size=cfg.patch,
                              layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)


class FullLLaDAV(ckpt.FullStages, LLaDAV):
    """LLaDA-V's published architecture in our modules, with the tiny replica's objectives and sampler
    (inherited from ``LLaDAV``). ``tokenizer`` may be None for a random model driven by ids (benchmarks)."""

    key_map = staticmethod(llada_v_key)
    ckpt_key = staticmethod(llada_v_ckpt_key)

    def __init__(self, cfg: FullConfig, tokenizer: CheckpointTokenizer | None = None):
        nn.Module.__init__(self)
        from transformers import SiglipVisionModel
        self.cfg, self.tok, self.template = cfg, tokenizer, TEMPLATE
        self.vision_tower = SiglipVisionModel(siglip_config(cfg))
        self.mm_projector = nn.Sequential(nn.Linear(cfg.vis_width, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
        self.image_newline = nn.Parameter(torch.randn(cfg.d_model) * cfg.d_model ** -0.5)
        self.lm = LLaDA(LMConfig(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden,
                                 cfg.rope_theta, cfg.norm_eps, rope_style="half"))
        self.n_visual = visual_token_count(cfg.image_size, cfg.image_size, cfg)
        if tokenizer is not None:
            ids = {r: getattr(tokenizer, f"{r}_id") for r in LLADA_SPECIALS}
        else:   # no tokenizer (random benchmarks): the published ids, or the synthetic ones for a tiny vocabulary
            ids = {r: (pub if cfg.vocab_size > 126348 else SYNTH_SPECIALS[text]) for r, (text, pub, _) in LLADA_SPECIALS.items()}
        self.mask_id = ids["mask"]
        # never committed at a masked answer position (LLaDA-V's generate)
        self.suppress = tuple(ids[r] for r in ("eos", "bos", "start_header", "end_header"))
        if tokenizer is not None:
            pre, rest = TEMPLATE.split("<image>")
            self._mid, post = rest.split("{prompt}")
            self._pre, self._post = tokenizer.encode_template(pre), tokenizer.encode_template(post)
            self.visual_span = slice(len(self._pre), len(self._pre) + self.n_visual)

    # ---- placement ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm.lm_head.weight.device

    def _on(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    # ---- inputs ---------------------------------------------------------------------------------
    def collate(self, samples: Sequence[Sample], with_response: bool = True, gen_length: int = 32) -> Batch:
        """The published template around each prompt: <bos> system ... user header [visual x n_visual]
        '\\n' question <pad>* <|eot_id|> assistant header; the answer (ends with <|eot_id|>, padded with
        EOS as LLaDA's SFT) after it. Padding sits before the template's tail and is invisible."""
        if self.tok is None:
            raise BenchError("this full-scale model has no tokenizer (built from random weights for benchmarks)")
        tok = self.tok
        sizes = {tuple(np.asarray(s.image).shape[:2]) for s in samples}
        for h, w in sizes:
            if visual_token_count(h, w, self.cfg) != self.n_visual:
                raise BenchError(f"a {h}x{w} image gives {visual_token_count(h, w, self.cfg)} visual tokens, not "
                                 f"{self.n_visual} (model arg image_size={self.cfg.image_size}); resize the task's images")
        ids, real = [], []
        for s in samples:
            q = tok.encode(self._mid + s.prompt)
            if len(q) > self.cfg.max_prompt:
                raise BenchError(f"prompt longer than {self.cfg.max_prompt} tokens (model arg max_prompt): {s.prompt!r}")
            pad = self.cfg.max_prompt - len(q)
            row = self._pre + [tok.image_id] * self.n_visual + q + [tok.pad_id] * pad + self._post
            ids.append(row)
            real.append([True] * (len(self._pre) + self.n_visual + len(q)) + [False] * pad + [True] * len(self._post))
        images = torch.from_numpy(np.stack([np.asarray(s.image, dtype=np.float32) for s in samples]))
        vis = torch.arange(self.visual_span.start, self.visual_span.stop)[None].repeat(len(samples), 1)
        resp = None
        if with_response:
            rows = []
            for s in samples:
                r = tok.encode(s.response) + [tok.eot_id]
                if len(r) > gen_length:
                    raise BenchError(f"response longer than gen_length={gen_length} tokens: {s.response!r}")
                rows.append(r + [tok.eos_id] * (gen_length - len(r)))
            resp = torch.tensor(rows)
        vmask = None
        if any("masked_visual" in s.meta for s in samples):
            vmask = torch.zeros(len(samples), self.n_visual, dtype=torch.bool)
            for i, s in enumerate(samples):
                vmask[i, list(s.meta.get("masked_visual", ()))] = True
        return Batch(images, torch.tensor(ids), torch.tensor(real), vis, resp, vmask)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tok.decode(row.tolist()) for row in ids.cpu()]

    # ---- vision ---------------------------------------------------------------------------------
    def tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, v, v) normalised views -> (N, (v/p)^2, width): the last stored SigLIP layer, before post_layernorm."""
        vt = self.vision_tower
        px = pixels.to(self.device, vt.embeddings.patch_embedding.weight.dtype)
        return vt.encoder(inputs_embeds=vt.embeddings(px)).last_hidden_state

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-view token grids (N, s*s, d) -> (N, p*p, d) when pool_side is set (LaViDa), else unchanged."""
        if not self.cfg.pool_side:
            return tokens
        N, T, d = tokens.shape
        s = int(round(T ** 0.5))
        g = tokens.reshape(N, s, s, d).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(self.cfg.pool_side,) * 2, mode="bilinear", align_corners=False)
        return g.permute(0, 2, 3, 1).reshape(N, -1, d)

    def merge(self, feats: torch.Tensor, grid: tuple[int, int], height: int, width: int) -> torch.Tensor:
        """One image's projected view tokens (1 + rows*cols, u*u, d) -> (n_visual, d): base view, then the
        grid map unpadded, shrunk if too large, with image_newline after every row."""
        rows, cols = grid
        u = int(round(feats.shape[1] ** 0.5))
        d = feats.shape[-1]
        base, tiles = feats[0], feats[1:]
        m = tiles.reshape(rows, cols, u, u, d).permute(4, 0, 2, 1, 3).reshape(d, rows * u, cols * u)
        r0, r1, c0, c1 = unpad_extent(rows * u, cols * u, height, width)
        m = m[:, r0:r1, c0:c1]
        small = _shrunk(m.shape[1], m.shape[2], u, self.cfg.max_patches)
        if small:
            m = F.interpolate(m[None], size=small, mode="bilinear", align_corners=False)[0]
        nl = self.image_newline.to(m.dtype)[:, None, None].expand(d, m.shape[1], 1)
        m = torch.cat([m, nl], dim=2).flatten(1).T
        return torch.cat([base, m])

    def visual_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> (B, n_visual, d): anyres views -> SigLIP (frozen unless trained) ->
        projector -> (LaViDa: per-view pooling) -> merged with newlines."""
        views, grids = zip(*(anyres_views(img.cpu(), self.cfg) for img in images))
        n = len(views[0])                     # same-size images: the same grid, so one tower pass for all
        train_tower = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(train_tower and torch.is_grad_enabled()):
            f = self.tower_features(torch.cat(views))
        f = self.pool(self.mm_projector(f))
        H, W = images.shape[1], images.shape[2]
        return torch.stack([self.merge(f[i * n:(i + 1) * n], grids[i], H, W) for i in range(len(images))])

    # ---- the LM side (the tiny replica's, placed on the model's device) ------------------------------
    def mask_embedding(self) -> torch.Tensor:
        return self.lm.embed_tokens.weight[self.mask_id]

    def prompt_embeds(self, batch: Batch, visual: torch.Tensor | None = None,
                      visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        if visual is None:
            visual = self.visual_embeds(batch.images)
        visual = visual.to(self.device, self.lm.embed_tokens.weight.dtype)
        if visual_mask is not None:   # DiSP Eq. 10
            visual = torch.where(self._on(visual_mask)[..., None], self.mask_embedding().expand_as(visual), visual)
        e = self.lm.embed_tokens(self._on(batch.ids))
        return e.scatter(1, self._on(batch.vis_pos)[..., None].expand(-1, -1, e.shape[-1]), visual)

    def answer_logits(self, prompt_embeds: torch.Tensor, key_mask: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
        answer_ids, key_mask = self._on(answer_ids), self._on(key_mask)
        x = torch.cat([prompt_embeds, self.lm.embed_tokens(answer_ids)], dim=1)
        km = torch.cat([key_mask, torch.ones_like(answer_ids, dtype=torch.bool)], dim=1)
        return self.lm(x, km, head_from=prompt_embeds.shape[1])

    def first_answer_logits(self, batch: Batch, visual_mask: torch.Tensor | None = None,
                            gen_length: int = 32) -> torch.Tensor:
        return super().first_answer_logits(batch, visual_mask, gen_length).float().cpu()

    def loss(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        pe = self.prompt_embeds(batch, visual_mask=batch.visual_mask)
        return sft_loss(lambda a: self.answer_logits(pe, batch.key_mask, a).float(), self._on(batch.response),
                        self.mask_id, generator)

    @torch.no_grad()
    def generate(self, batch: Batch, decoding, visual_mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``models.llada.generate`` (the tiny replica's sampler) on the model's device, eos / bos / header
        ids never committed; visual positions in visual_mask stay e_MASK."""
        pe = self.prompt_embeds(batch, visual_mask=visual_mask)
        return generate(lambda a: self.answer_logits(pe, batch.key_mask, a), len(batch), decoding.gen_length,
                        self.mask_id, decoding.steps, decoding.block_length, decoding.remasking, generator,
                        device=self.device, suppress=self.suppress).cpu()


# ---- building: from headers, from a checkpoint, at random -------------------------------------------
def geometry(path, key_map=llada_v_key) -> dict:
    """The FullConfig geometry a checkpoint's headers (and config.json, for head counts) imply; keys the
    map cannot place leave the published defaults (the strict match then names them)."""
    shapes = {key_map(k): i.shape for k, i in ckpt.read_header(path).items() if key_map(k)}
    conf = ckpt.read_config(path)
    g: dict = {}
    if "lm.embed_tokens.weight" in shapes:
        g["vocab_size"], g["d_model"] = shapes["lm.embed_tokens.weight"]
    layer = lambda pat: {int(m.group(1)) for k in shapes if (m := re.match(pat, k))}
    if (ls := layer(r"lm\.layers\.(\d+)\.")):
        g["n_layers"] = max(ls) + 1
    if "lm.layers.0.mlp.gate_proj.weight" in shapes:
        g["mlp_hidden"] = shapes["lm.layers.0.mlp.gate_proj.weight"][0]
    pe = shapes.get("vision_tower.embeddings.patch_embedding.weight")
    pos = shapes.get("vision_tower.embeddings.position_embedding.weight")
    if pe and pos:
        g["vis_width"], g["patch"] = pe[0], pe[-1]
        side = int(round(pos[0] ** 0.5))     # 27 for 384 px / 14 (SigLIP's conv drops the last 6 px)
        g["view_size"] = FullConfig.view_size if FullConfig.view_size // pe[-1] == side else side * pe[-1]
    if (vs := layer(r"vision_tower\.encoder\.layers\.(\d+)\.")):
        g["vis_layers"] = max(vs) + 1
    if "vision_tower.encoder.layers.0.mlp.fc1.weight" in shapes:
        g["vis_mlp"] = shapes["vision_tower.encoder.layers.0.mlp.fc1.weight"][0]
    heads = conf.get("num_attention_heads", conf.get("n_heads"))
    if heads:
        g["n_heads"] = int(heads)
    if conf.get("rope_theta"):
        g["rope_theta"] = float(conf["rope_theta"])
    if conf.get("rms_norm_eps"):
        g["norm_eps"] = float(conf["rms_norm_eps"])
    if conf.get("vision_num_attention_heads"):
        g["vis_heads"] = int(conf["vision_num_attention_heads"])
    return g


def meta_model(cls, cfg: FullConfig) -> nn.Module:
    """The model with no storage (accelerate's init_empty_weights): its shapes, for header checks."""
    from accelerate import init_empty_weights
    with init_empty_weights():
        return cls(cfg)


def check_weights(cls, path, cfg: FullConfig | None = None) -> ckpt.WeightsReport:
    """Headers + config only: what a run of ``cls`` would load from ``path`` (no tensor data read)."""
    cfg = replace(cfg or FullConfig(), **geometry(path, cls.key_map))
    return ckpt.inspect_checkpoint(path, ckpt.module_shapes(meta_model(cls, cfg)), cls.key_map)


def load_model(cls, cfg: FullConfig, with_tokenizer: bool = True) -> tuple[nn.Module, ckpt.WeightsReport]:
    """Build ``cls`` on the meta device and fill every tensor from ``cfg.weights`` on ``cfg.device`` in
    ``cfg.dtype`` (strict: BenchError naming the first mismatches); tokenizer from the same directory."""
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    tok = CheckpointTokenizer(cfg.weights, ckpt.read_config(cfg.weights)) if with_tokenizer else None
    from accelerate import init_empty_weights
    with init_empty_weights():
        model = cls(cfg, tok)
    report = ckpt.load_checkpoint(cfg.weights, model, cls.key_map, dtype=getattr(torch, dtype), device=device,
                                  with_hash=not cfg.checkpoint)
    report.hash = report.hash or cfg.checkpoint
    model.to(device)        # non-persistent buffers (SigLIP position ids) follow the weights
    model.requires_grad_(False)
    return model.eval(), report


def random_model(cls, cfg: FullConfig, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                 tokenizer=None) -> nn.Module:
    """A randomly initialised model built directly on ``device`` (initialised in float32, where every
    init routine is defined, then cast to ``dtype``) — benchmarks and synthetic checkpoints."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg, tokenizer)
    model.to(dtype).requires_grad_(False)
    return model.eval()


def tiny_config(**over) -> FullConfig:
    """A tiny random geometry of the same modules: 2-layer LM, 1-layer SigLIP, 28-px views of 2x2 patches
    (a square image gives 4 + 2 x 3 = 10 visual tokens)."""
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, vis_width=32, vis_layers=1,
                vis_heads=4, vis_mlp=48, view_size=28, patch=14, image_size=28, max_prompt=24, dtype="float32", device="cpu")
    return FullConfig(**{**base, **over})


SYNTH_SPECIALS = {"<|endoftext|>": 0, "<|startoftext|>": 1, "<|mdm_mask|>": 2, "<|start_header_id|>": 3,
                  "<|end_header_id|>": 4, "<|eot_id|>": 5}


def published_config(cfg: FullConfig, family: str = "llada-v") -> dict:
    """config.json in the published style (LLaDA-V: llava_llada, LLaMA field names; LaViDa: LLaDA's OLMo
    field names) for a synthetic checkpoint of geometry ``cfg``."""
    ids = {"bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0, "mask_token_id": 2}
    mm = {"mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "google/siglip-so400m-patch14-384",
          "mm_hidden_size": cfg.vis_width, "image_aspect_ratio": "anyres_max_4", "mm_patch_merge_type": "spatial_unpad",
          "image_grid_pinpoints": f"(1x1),...,({cfg.max_grid}x{cfg.max_grid})", "vision_num_attention_heads": cfg.vis_heads}
    if family == "lavida":
        return {"architectures": ["LlavaLladaForMaskedDiffusion"], "model_type": "llava_llada", "d_model": cfg.d_model,
                "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "mlp_hidden_size": cfg.mlp_hidden,
                "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
                "mm_spatial_pool_mode": "bilinear", **ids, **mm}
    return {"architectures": ["LlavaLLaDAModelLM"], "model_type": "llava_llada", "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.mlp_hidden,
            "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, **ids, **mm}


def write_synthetic_checkpoint(path, cfg: FullConfig | None = None, *, cls=None, family: str = "llada-v",
                               seed: int = 0, words: Sequence[str] = (), shards: int = 3) -> nn.Module:
    """Write a random model of geometry ``cfg`` (default ``tiny_config()``) in the published layout:
    about ``shards`` safetensors shards (split by size) + ``model.safetensors.index.json`` + ``config.json`` + a word-level
    ``tokenizer.json`` over ``words`` (plus the template's words and LLaDA's special tokens at ids 0-5).
    Returns the module it was written from (same logits as the loaded checkpoint). Public: tests and
    tiny-random full-scale cells (the synthetic task's vocabulary as ``words``) use it."""
    cls = cls or FullLLaDAV
    cfg = cfg or tiny_config()
    text = TEMPLATE.replace("{prompt}", " ").replace("<image>", " ")
    for special in SYNTH_SPECIALS:
        text = text.replace(special, " ")
    vocab = list(dict.fromkeys([*text.split(), *words]))
    need = len(SYNTH_SPECIALS) + 1 + len(vocab)
    if need > cfg.vocab_size:
        raise BenchError(f"synthetic tokenizer needs {need} ids, the config's vocab_size is {cfg.vocab_size}")
    write_word_tokenizer(path, [w for w in vocab if w not in SYNTH_SPECIALS], SYNTH_SPECIALS)
    model = random_model(cls, cfg, seed=seed)
    tensors = {cls.ckpt_key(k): v for k, v in model.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    ckpt.write_checkpoint(path, tensors, published_config(cfg, family), shard_bytes=max(1, total // shards + 1))
    return model


# ---- the registry entries' full-scale side (models.llada_v / models.lavida dispatch here) ----------------
RUN_ARGS = ("weights", "checkpoint", "dtype", "device", "image_size", "max_prompt", "pool_side", "shift", "prefix_dlm")


def resolve_full(cls, name: str, overrides: dict, base: FullConfig | None = None) -> dict:
    """model_args of a full-scale cell: the weights directory (required), its geometry read from the
    headers, its hash, and the resolved dtype and device, so every record pins all four. Geometry
    cannot be overridden (the checkpoint decides it)."""
    valid = set(RUN_ARGS)
    unknown = set(overrides) - valid
    if unknown:
        fixed = sorted(unknown & {f.name for f in fields(FullConfig)})
        raise BenchError(f"model arg(s) {fixed} are read from the checkpoint" if fixed and fixed == sorted(unknown)
                         else f"unknown model arg(s) {sorted(unknown)} for {name} at scale full (valid: {', '.join(RUN_ARGS)})")
    weights = overrides.get("weights")
    if not weights:
        raise BenchError(f"scale 'full' for {name} needs --weights PATH, the published checkpoint directory "
                         f"(docs/full-scale.md; check it with: bench check-weights --model {name} PATH)")
    path = Path(str(weights)).expanduser().resolve()
    if not path.is_dir():
        raise BenchError(f"--weights {weights}: not a directory")
    device, dtype = resolve_device(str(overrides.get("device", "auto")), str(overrides.get("dtype", "auto")))
    digest = ckpt.checkpoint_hash(path)
    if overrides.get("checkpoint") and overrides["checkpoint"] != digest:
        raise BenchError(f"the checkpoint at {path} has hash {digest[:12]}, the spec asks for {str(overrides['checkpoint'])[:12]}")
    given = {k: v for k, v in overrides.items() if k in RUN_ARGS}
    cfg = replace(base or FullConfig(), **{**given, **geometry(path, cls.key_map), "weights": str(path),
                                           "checkpoint": digest, "device": device, "dtype": dtype})
    check_weights(cls, path, cfg).raise_if_bad()      # another layout or a broken checkpoint: refused before any work
    return asdict(cfg)


def full_args(base: FullConfig | None = None) -> dict:
    """The settable model args at full scale and their defaults (``bench list --args``)."""
    cfg = asdict(base or FullConfig())
    return {k: cfg[k] for k in RUN_ARGS if k not in ("weights", "checkpoint")}


def build_full(cls, model_args: dict) -> nn.Module:
    """The full-scale model of a cell (strictly loaded; its WeightsReport as ``weights_report``)."""
    model, report = load_model(cls, FullConfig(**model_args))
    model.weights_report = report
    return model


def text_tokenizer(model_args: dict) -> CheckpointTokenizer:
    return CheckpointTokenizer(model_args["weights"], ckpt.read_config(model_args["weights"]))
