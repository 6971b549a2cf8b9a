"""OpenFlamingo and Otter at `--scale full`: our Flamingo (`models.flamingo`) filled from the published
checkpoints, strictly (every stored key maps one to one onto a module key of equal shape, every module
key is filled, or exit 2 naming the first mismatches — `models.checkpoint`).

Where the weights come from (read from mlfoundations/open_flamingo `open_flamingo/src/{factory,flamingo,
flamingo_lm,helpers}.py` and `open_flamingo/train/train_utils.py`; Luodian/Otter
`src/otter_ai/models/otter/{modeling_otter,flamingo_pt2otter_hf}.py`):

- **OpenFlamingo** publishes `checkpoint.pt`: a state dict holding only what its training kept
  (`filter_state_dict_to_trainable`): `perceiver.*` (latents, `layers.{i}.0` attention, `layers.{i}.1`
  feed-forward, `norm`), the gated cross-attention blocks under the LM's decoder layers
  (`lang_encoder.<layers>.{i}.gated_cross_attn_layer.{attn.{norm,to_q,to_kv,to_out},attn_gate,ff.{0,1,3},ff_gate}`)
  and the embeddings (resized for the added `<|endofchunk|>`, `<image>` and, when the tokenizer has
  none, `<PAD>`). The CLIP ViT-L/14 tower and the base LM load separately: here from `vision/`
  (transformers `CLIPVisionModel`, or a whole CLIP directory whose text tower is left out) and `lm/`
  (a transformers causal LM and its tokenizer) beside the checkpoint. Our module names are the
  published ones, so the key map is the identity.
- **Otter** publishes a transformers-style directory (`config.json` with `vision_config`, `text_config`,
  `cross_attn_every_n_layers`; weights for the whole model). Its names differ from OpenFlamingo's by a
  small table (its `rename_flamingo_checkpoint`): a perceiver block is one module
  (`perceiver.layers.{i}.{to_q,...}`, feed-forward `perceiver.layers.{i}.feed_forward.{0,1,3}`) and a
  gated block's feed-forward is `feed_forward` instead of `ff`; `otter_key` maps them back.

Visual features are the CLIP tower's last hidden state without the CLS position (Otter:
`vision_encoder(x)[0][:, 1:]`; OpenFlamingo reads open_clip's `output_tokens`, the same tokens before
`ln_post` in the open_clip releases it was trained with — newer open_clip applies `ln_post` first:
unverified against the released weights). Answers end at `<|endofchunk|>`, as in both repos.
Decoder layers are found where the reference code looks for them (`DECODER_LAYERS`).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import BenchError
from models.checkpoint import FullStages, WeightsReport, match_keys, read_config, read_header, read_index, resolve_device
from models.flamingo import Flamingo
from models.published import (ChatLayout, FullConfig, inspect_pretrained, load_image_processor, load_tokenizer,
                              meta_pretrained, offline_pretrained, pixel_values, tied_shapes)

DECODER_LAYERS = {"llama": "model.layers", "mistral": "model.layers", "opt": "model.decoder.layers",
                  "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h", "mpt": "transformer.blocks"}
TEMPLATES = {"openflamingo": "<image>Question:{prompt} Short answer:",    # open_flamingo eval VQA prompt
             "otter": "<image>User: {prompt} GPT:<answer>"}                 # Otter's instruction prompt
SPECIALS = {"openflamingo": ("<|endofchunk|>", "<image>"), "otter": ("<|endofchunk|>", "<image>", "<answer>")}
CLIP_TEXT = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")   # not part of Flamingo
HEADS = 8                        # perceiver and cross-attention heads in both repos (dim_head = width / 8)
_PERCEIVER_ATTN = re.compile(r"^perceiver\.layers\.(\d+)\.(norm_media|norm_latents|to_q|to_kv|to_out)\.")
_PERCEIVER_FF = re.compile(r"^perceiver\.layers\.(\d+)\.feed_forward\.")


def otter_key(key: str) -> str:
    """Otter's published name -> ours (OpenFlamingo's): the inverse of Otter's rename table."""
    key = _PERCEIVER_ATTN.sub(r"perceiver.layers.\1.0.\2.", key)
    key = _PERCEIVER_FF.sub(r"perceiver.layers.\1.1.", key)
    return key.replace(".gated_cross_attn_layer.feed_forward.", ".gated_cross_attn_layer.ff.")


def otter_name(key: str) -> str:
    """Ours -> Otter's published name (what Otter's `rename_flamingo_checkpoint` produces)."""
    key = re.sub(r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1.", key)
    key = re.sub(r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.feed_forward.", key)
    return key.replace(".gated_cross_attn_layer.ff.", ".gated_cross_attn_layer.feed_forward.")


def layers_attr(model_type: str) -> str:
    if model_type not in DECODER_LAYERS:
        raise BenchError(f"base LM type {model_type!r} is not one Flamingo wraps here "
                         f"(known: {', '.join(sorted(DECODER_LAYERS))})")
    return DECODER_LAYERS[model_type]


def read_openflamingo(path: Path) -> dict[str, torch.Tensor]:
    """The published `checkpoint.pt` (a plain state dict; a training checkpoint's `model_state_dict`
    is unwrapped), memory-mapped, tensors only (`weights_only`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise BenchError(f"{path}: not a readable OpenFlamingo checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{path}: expected a state dict of tensors")
    return state


def geometry(shapes: dict[str, tuple], layers: str, n_layers: int) -> dict:
    """Perceiver depth and latents, head widths and the cross-attention spacing, read from the stored
    shapes (published: depth 6, 64 latents, dim_head 64, 8 heads; every 1 / 2 / 4 layers for 3B / 4B / 9B)."""
    prefix = f"lang_encoder.{layers}."
    try:
        depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"perceiver\.layers\.(\d+)\.", k)))
        num_latents = shapes["perceiver.latents"][0]
        inner = shapes["perceiver.layers.0.0.to_q.weight"][0]
        with_xattn = sorted({int(k[len(prefix):].split(".")[0]) for k in shapes
                             if k.startswith(prefix) and ".gated_cross_attn_layer." in k})
        every = with_xattn[0] + 1
    except (ValueError, KeyError, IndexError):
        raise BenchError("checkpoint has no perceiver / gated cross-attention keys in the OpenFlamingo layout "
                         f"(expected perceiver.layers.N.0.to_q.weight, {prefix}N.gated_cross_attn_layer.*)") from None
    if with_xattn != [i for i in range(n_layers) if (i + 1) % every == 0]:
        raise BenchError(f"gated cross-attention blocks at layers {with_xattn[:8]} are not every {every}-th of "
                         f"{n_layers} decoder layers (does the base LM match the checkpoint?)")
    xinner = shapes[f"{prefix}{with_xattn[0]}.gated_cross_attn_layer.attn.to_q.weight"][0]
    if xinner != inner or inner % HEADS:
        raise BenchError(f"perceiver width {inner} and cross-attention width {xinner} must agree and split into {HEADS} heads")
    return dict(depth=depth, num_latents=num_latents, dim_head=inner // HEADS, heads=HEADS, xattn_every=every)


def _tokenizer(path: Path, flavour: str, what: str):
    """The base LM's tokenizer with the tokens both repos add (in their order, so the ids match training)."""
    tok = load_tokenizer(path, what)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[flavour])})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok


class FlamingoFull(FullStages, ChatLayout, Flamingo):
    """A published OpenFlamingo or Otter behind the victim contract; every method below collation is
    our Flamingo's (and through it LLaVA's loss, cached greedy decoding and CP scoring)."""

    feature_layer, drop_cls = -1, True

    def __init__(self, cfg: FullConfig, flavour: str, meta: bool = False):
        """`meta`: check only — every module on the meta device, shapes from the safetensors headers and
        the memory-mapped checkpoint.pt, no tensor data read (what `bench check-weights` runs)."""
        nn.Module.__init__(self)
        self.cfg, self.flavour = cfg, flavour
        root = Path(cfg.weights).expanduser()
        if not root.is_dir():
            raise BenchError(f"{flavour}: {cfg.weights} is not a local directory (full scale reads local files only)")
        device, dtype = resolve_device(cfg.device, cfg.dtype)
        if flavour == "openflamingo":
            tok, self.weights_report = self._load_openflamingo(root, device, dtype, meta)
        else:
            tok, self.weights_report = self._load_otter(root, device, dtype, meta)
        for t in SPECIALS[flavour]:
            if tok.convert_tokens_to_ids(t) >= self.lang_encoder.get_input_embeddings().weight.shape[0]:
                raise BenchError(f"{flavour}: token {t} has id {tok.convert_tokens_to_ids(t)}, past the checkpoint's "
                                 "embedding rows (tokenizer and checkpoint disagree)")
        self.requires_grad_(False)
        self.eval()
        self.init_chat(tok, TEMPLATES[flavour], 1, tok.convert_tokens_to_ids("<image>"),
                       eos_id=tok.convert_tokens_to_ids("<|endofchunk|>"))

    # ---- loading ------------------------------------------------------------------------------
    def _load_openflamingo(self, root: Path, device: str, dtype: str, meta: bool):
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        what = "openflamingo"
        if not (root / "checkpoint.pt").is_file():
            raise BenchError(f"{what}: {root} has no checkpoint.pt (the published OpenFlamingo weights)")
        vision_args = dict(drop=CLIP_TEXT, model_types=("clip", "clip_vision_model"))
        if meta:                     # header checks of vision/ and lm/, the modules on the meta device
            for cls, d, kw in ((CLIPVisionModel, "vision", vision_args), (AutoModelForCausalLM, "lm", {})):
                part = inspect_pretrained(cls, root / d, f"{what} {d}/", lambda k: k, **kw)
                if not part.ok:
                    raise BenchError(f"{what} {d}/: " + part.error())
            vision = meta_pretrained(CLIPVisionModel, root / "vision", vision_args["model_types"])
            lm = meta_pretrained(AutoModelForCausalLM, root / "lm")
        else:
            sub = lambda d: FullConfig(weights=str(root / d), dtype=dtype, device="cpu")
            vision, _ = offline_pretrained(CLIPVisionModel, sub("vision"), f"{what} vision/", lambda k: k, **vision_args)
            lm, _ = offline_pretrained(AutoModelForCausalLM, sub("lm"), f"{what} lm/", lambda k: k)
        self.processor = load_image_processor(root / "vision", f"{what} vision/")
        tok = _tokenizer(root / "lm", "openflamingo", f"{what} lm/")
        state = read_openflamingo(root / "checkpoint.pt")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.layers_attr = layers_attr(lm.config.model_type)
        embed = f"lang_encoder.{self._embed_name(lm)}"
        if embed in shapes and shapes[embed][0] != lm.get_input_embeddings().weight.shape[0]:
            self._resize(lm, shapes[embed][0])
        geo = geometry(shapes, self.layers_attr, lm.config.num_hidden_layers)
        with torch.device("meta" if meta else "cpu"):
            self.assemble(vision, lambda: lm, vision.config.hidden_size, lm.config.hidden_size, **geo)
        self.to(getattr(torch, dtype))
        # strict over what the checkpoint must fill: the perceiver and gated blocks, plus any LM tensor it
        # stores (the embeddings); everything else came strictly from vision/ and lm/
        own = tied_shapes(self, set(shapes))
        need = {k: s for k, s in own.items() if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or k in shapes}
        match = match_keys(shapes, need, lambda k: k)
        if not match.ok:
            raise BenchError(f"{what}: {root / 'checkpoint.pt'} does not match the model: " + "; ".join(match.problems()))
        if not meta:
            params = dict(self.state_dict())
            with torch.no_grad():
                for ck, mk in match.mapping.items():
                    params[mk].copy_(state[ck])
            self.to(device)
        return tok, _report(root, {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()},
                            match, self.cfg.checkpoint, None if meta else dtype, None if meta else device)

    def _load_otter(self, root: Path, device: str, dtype: str, meta: bool):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

        what = "otter"
        conf = read_config(root)
        if not {"vision_config", "text_config"} <= set(conf):
            raise BenchError(f"{what}: {root}/config.json lacks vision_config / text_config (an Otter checkpoint directory)")
        text = dict(conf["text_config"])
        try:
            text_cfg = AutoConfig.for_model(text.pop("model_type"), **text)
        except (KeyError, ValueError) as e:
            raise BenchError(f"{what}: text_config is not a transformers config ({e})") from None
        self.processor = load_image_processor(root, what)
        tok = _tokenizer(root, "otter", what)
        self.layers_attr = layers_attr(text_cfg.model_type)
        shapes = {k: i.shape for k, i in read_header(root).items()}
        with init_empty_weights():
            vision = CLIPVisionModel(CLIPVisionConfig(**conf["vision_config"]))
            lm = AutoModelForCausalLM.from_config(text_cfg)
        embed = self._embed_name(lm)
        rows = shapes.get(otter_name(f"lang_encoder.{embed}"), (None,))[0]
        geo = geometry({otter_key(k): s for k, s in shapes.items()}, self.layers_attr, text_cfg.num_hidden_layers)
        if geo["xattn_every"] != conf.get("cross_attn_every_n_layers", geo["xattn_every"]):
            raise BenchError(f"{what}: config.json says cross_attn_every_n_layers="
                             f"{conf['cross_attn_every_n_layers']}, the weights every {geo['xattn_every']}")
        with init_empty_weights():
            if rows is not None and rows != lm.get_input_embeddings().weight.shape[0]:
                lm.resize_token_embeddings(rows, mean_resizing=False)
            self.assemble(vision, lambda: lm, vision.config.hidden_size, text_cfg.hidden_size, **geo)
        match = match_keys(shapes, tied_shapes(self, {otter_key(k) for k in shapes}), otter_key)
        if not match.ok:
            raise BenchError(f"{what}: checkpoint {root} does not match the model: " + "; ".join(match.problems()))
        if not meta:
            fill(root, self, match.mapping, getattr(torch, dtype), device)
            lm.tie_weights()        # a tied head follows the embedding it was filled through
            self.to(device)         # buffers that init_empty_weights left real (position ids, rotary tables)
        infos = read_header(root)
        return tok, _report(root, {k: (i.shape, i.dtype) for k, i in infos.items()}, match, self.cfg.checkpoint,
                            None if meta else dtype, None if meta else device)

    @staticmethod
    def _embed_name(lm: nn.Module) -> str:
        emb = lm.get_input_embeddings()
        return next(n for n, m in lm.named_modules() if m is emb) + ".weight"

    @staticmethod
    def _resize(lm: nn.Module, rows: int) -> None:
        """Resize the LM's embeddings to the checkpoint's rows (the repos resize for their added tokens).
        Output rows the checkpoint does not store (an untied head) become the mean of the old rows, a
        deterministic stand-in for the random rows the repos leave there."""
        out = lm.get_output_embeddings()
        old = None if out is None or out.weight is lm.get_input_embeddings().weight else out.weight.detach().clone()
        lm.resize_token_embeddings(rows, mean_resizing=False)
        if old is not None and rows > old.shape[0]:
            with torch.no_grad():
                lm.get_output_embeddings().weight[old.shape[0]:] = old.mean(0)

    # ---- inputs -------------------------------------------------------------------------------
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        return pixel_values(self.processor, images)

    def _tower_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The CLIP tower's last hidden state without the CLS position (Otter `vision_encoder(x)[0][:, 1:]`)."""
        return self._tower()(pixel_values=pixels).last_hidden_state[:, 1:]


def _report(root: Path, stored: dict[str, tuple], match, digest: str, dtype: str | None, device: str | None) -> WeightsReport:
    """The WeightsReport of a Flamingo checkpoint: {key: (shape, dtype name)} as stored, the key match."""
    size = {"float32": 4, "F32": 4, "int64": 8, "I64": 8}
    return WeightsReport(path=str(root), n_tensors=len(stored), n_params=sum(math.prod(s) for s, _ in stored.values()),
                         total_bytes=sum(math.prod(s) * size.get(d, 2) for s, d in stored.values()),
                         dtypes=dict(Counter(d for _, d in stored.values())),
                         modules=dict(Counter(k.split(".")[0] for k in match.mapping.values())), match=match,
                         hash=digest or flamingo_hash(root), loaded_dtype=dtype, device=device)


def fill(root: Path, module: nn.Module, mapping: dict[str, str], dtype: torch.dtype, device: str) -> None:
    """Materialise every mapped tensor of a safetensors directory into `module` (built on the meta
    device), shard by shard (accelerate's `set_module_tensor_to_device`)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    index = read_index(root)
    for fname in sorted({index[k] for k in mapping}):
        with safe_open(str(root / fname), framework="pt", device="cpu") as fh:
            for ck in (k for k in mapping if index[k] == fname):
                t = fh.get_tensor(ck)
                set_module_tensor_to_device(module, mapping[ck], device, value=t,
                                            dtype=dtype if t.is_floating_point() else None)


def flamingo_hash(root: Path) -> str:
    """sha256 over the files a full-scale Flamingo reads: OpenFlamingo's checkpoint.pt with vision/ and
    lm/ (each hashed as `models.checkpoint` hashes a directory), or Otter's directory."""
    import hashlib

    from models.checkpoint import _file_sha256, checkpoint_hash

    if (root / "checkpoint.pt").is_file():
        lines = [f"checkpoint.pt {_file_sha256(root / 'checkpoint.pt')}"]
        lines += [f"{d}/ {checkpoint_hash(root / d)}" for d in ("vision", "lm") if (root / d).is_dir()]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return checkpoint_hash(root)


def tokens(path: Path, flavour: str) -> tuple:
    """(tokenizer with the repo's added tokens, <image> id, template, <|endofchunk|> id) without the weights."""
    tok = _tokenizer(path / "lm" if flavour == "openflamingo" else path, flavour, flavour)
    return tok, tok.convert_tokens_to_ids("<image>"), TEMPLATES[flavour], tok.convert_tokens_to_ids("<|endofchunk|>")

