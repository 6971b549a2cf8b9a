"""Published checkpoints of transformers classes at `--scale full`: loaded offline from a local
directory, driven with the checkpoint's own tokenizer, image processor and chat template.

- `FullConfig` / `resolve_full`: the model args (`weights`, `dtype`, `device`, and `checkpoint`, the
  weights' hash), resolved when the spec is made so every record pins them.
- `inspect_pretrained` checks a directory from its safetensors headers and config.json only
  (`models.checkpoint`'s one-to-one, equal-shape rule against the class built on the meta device);
  `offline_pretrained` runs that check, then `from_pretrained(PATH)` with `HF_HUB_OFFLINE=1` and
  `local_files_only=True`, and checks transformers' own loading report too: a missing, unexpected or
  reshaped key exits 2 (BenchError) naming the first ones, never a silently re-initialised module.
- `HFTokens` gives a transformers tokenizer the small interface the benchmark's code uses (ids of
  bos / eos / pad / image, `encode`, `decode`, `token` for single-token CP options).
- `ChatLayout` collates samples into the shared `Batch` with the published template: the prompt
  tokenized as one string, the image placeholder expanded to the model's visual-token count, rows
  left-padded (position ids restart after the padding, `models.llava.LLaVA._logits`).
- Stages keep the trained parts plus the checkpoint hash (`models.checkpoint.FullStages`).

The tiny scale keeps its word-level layout (`models.llada_v.TemplateLayout`); everything downstream of
collation (embedding, loss, decoding, CP scoring) is the same code at both scales.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.errors import BenchError
from models.base import Batch
from models.checkpoint import (WeightsReport, checkpoint_hash, match_keys, module_shapes, read_config, read_header,
                               resolve_device)
from tasks.base import Sample

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class FullConfig:
    """`--scale full` model args of a transformers-class victim: ``weights`` the local checkpoint
    directory, ``checkpoint`` its hash (filled at spec time so every record pins it), ``dtype`` and
    ``device`` ('auto': accelerate's device; bfloat16 on a bf16-capable GPU, else float32)."""

    weights: str = ""
    checkpoint: str = ""
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise BenchError(f"model arg dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def resolve_full(name: str, overrides: dict, check=None, hash_fn=checkpoint_hash, need_config: bool = True) -> dict:
    """The full-scale model args of an entry; with `weights` given, the directory is checked (`check`:
    the entry's header-only `check_weights`, so a mismatched checkpoint is refused before any work),
    its hash filled in (a stale `checkpoint` hash is refused: the weights changed under the spec) and
    'auto' device and dtype resolved."""
    valid = {f.name for f in fields(FullConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise BenchError(f"unknown model arg(s) {sorted(unknown)} for {name} at scale full "
                         f"(valid: {', '.join(sorted(valid))})")
    cfg = FullConfig(**overrides)
    if cfg.weights:
        path = weights_dir(cfg.weights, name, need_config)
        if check is not None:
            report = check(path)
            if not report.ok:
                raise BenchError(f"{name}: " + report.error())
        digest = hash_fn(path)
        if cfg.checkpoint and cfg.checkpoint != digest:
            raise BenchError(f"{name}: {cfg.weights} hashes to {digest[:12]}, the spec pins {cfg.checkpoint[:12]}")
        device, dtype = resolve_device(cfg.device, cfg.dtype)      # pinned in the spec, so in every record
        cfg = replace(cfg, checkpoint=digest, device=device, dtype=dtype)
    return asdict(cfg)


def full_args() -> dict:
    """The model args a run sets at full scale beside --weights, with their defaults (`bench list --args`)."""
    return {k: v for k, v in asdict(FullConfig()).items() if k not in ("weights", "checkpoint")}


def full_config(name: str, model_args: dict) -> FullConfig:
    cfg = FullConfig(**model_args)
    if not cfg.weights:
        raise BenchError(f"scale 'full' for {name} needs --weights PATH (a local checkpoint directory)")
    return cfg


def weights_dir(path: str | os.PathLike, what: str, need_config: bool = True) -> Path:
    """The local directory a full-scale victim reads; a hub id or a missing path is refused (no downloads)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise BenchError(f"{what}: {path} is not a local directory (full scale reads local files only; "
                         "download the checkpoint first)")
    if need_config and not (p / "config.json").is_file():
        raise BenchError(f"{what}: {p} has no config.json (expected a save_pretrained directory)")
    return p


def _first(keys, n: int = 3) -> str:
    keys = sorted(keys, key=str)
    return ", ".join(str(k) for k in keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def meta_pretrained(cls, path: Path, model_types: tuple[str, ...] | None = None):
    """`cls` built from the directory's config.json on the meta device: its shapes at no memory cost
    (an Auto class through `from_config`; a vision class reads its part of a composite config). A
    config of another model type (`model_types`, default the class's own) is refused by name."""
    from transformers import AutoConfig
    auto = cls.__name__.startswith("Auto")
    if not auto:
        found = read_config(path).get("model_type")
        want = model_types or (cls.config_class.model_type,)
        if found not in want:
            raise BenchError(f"{path} holds a {found!r} checkpoint, not {' or '.join(map(repr, want))} ({cls.__name__})")
    try:
        config = (AutoConfig if auto else cls.config_class).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"{path}/config.json: not a {cls.__name__} config ({str(e).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        return cls.from_config(config) if auto else cls(config)


def tied_shapes(model: torch.nn.Module, stored: set[str]) -> dict[str, tuple]:
    """`module_shapes(model)` with tied parameters (one tensor under two names, e.g. OPT's lm_head and
    embed_tokens) counted once: a name the checkpoint omits is dropped when another name of its tied
    group is stored."""
    shapes = module_shapes(model)
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        if len(names) > 1 and any(n in stored for n in names):
            for n in names:
                if n not in stored:
                    shapes.pop(n, None)
    return shapes


def inspect_pretrained(cls, path: str | os.PathLike, what: str, key_map, drop: tuple[str, ...] = (),
                       model_types: tuple[str, ...] | None = None) -> WeightsReport:
    """Headers and config only (`models.checkpoint`): whether every stored key maps one to one, with
    equal shape, onto `cls` built from the config. Stored keys under a `drop` prefix are parts the
    victim does not use by design (CLIP's text tower beside its vision tower) and are left out."""
    p = weights_dir(path, what)
    model = meta_pretrained(cls, p, model_types)
    infos = {k: i for k, i in read_header(p).items() if not k.startswith(drop)}
    shapes = tied_shapes(model, {key_map(k) for k in infos})
    match = match_keys({k: i.shape for k, i in infos.items()}, shapes, key_map)
    report = WeightsReport(path=str(p), n_tensors=len(infos), n_params=sum(i.numel for i in infos.values()),
                           total_bytes=sum(i.nbytes for i in infos.values()),
                           dtypes=dict(Counter(i.dtype for i in infos.values())),
                           modules=dict(Counter(k.split(".")[0] for k in match.mapping.values())), match=match,
                           config=read_config(p), hash=checkpoint_hash(p))
    return report


def offline_pretrained(cls, cfg: FullConfig, what: str, key_map, drop: tuple[str, ...] = (),
                       model_types: tuple[str, ...] | None = None):
    """`cls.from_pretrained(weights)` offline (`HF_HUB_OFFLINE=1`, `local_files_only`) after the strict
    header check (BenchError naming the first mismatches, before any tensor is read); transformers'
    own loading report is checked as well (it re-initialises what it cannot fill, and only warns).
    Returns (model in eval mode on the resolved device and dtype, WeightsReport)."""
    p = weights_dir(cfg.weights, what)
    report = inspect_pretrained(cls, p, what, key_map, drop, model_types)
    if not report.ok:
        raise BenchError(f"{what}: " + report.error())
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model, info = cls.from_pretrained(p, local_files_only=True, output_loading_info=True,
                                          ignore_mismatched_sizes=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise BenchError(f"{what}: cannot load {cls.__name__} from {p}: {str(e).strip().splitlines()[0]}") from None
    info["unexpected_keys"] = {k for k in info.get("unexpected_keys", ()) if not str(k).startswith(drop)}
    bad = [f"{kind} {_first(info[key])}" for kind, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                                                           ("reshaped", "mismatched_keys")) if info.get(key)]
    if bad:
        raise BenchError(f"{what}: {p} does not match {cls.__name__}: " + "; ".join(bad))
    report.loaded_dtype, report.device = dtype, device
    return model.to(device).eval(), report


def load_tokenizer(path: Path, what: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"{what}: no usable tokenizer in {path}: {str(e).strip().splitlines()[0]}") from None


def load_image_processor(path: Path, what: str):
    """The checkpoint's image processor (transformers falls back to its PIL version: no torchvision here)."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"{what}: no usable image processor (preprocessor_config.json) in {path}: "
                         f"{str(e).strip().splitlines()[0]}") from None


def pixel_values(processor, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) floats in [0, 1] -> the processor's (B, 3, h, w) pixels. Images go in as uint8, the
    form a published processor is written for (its rescale, resize and normalisation then apply as
    published); the pixels carry no gradient (gradients are taken w.r.t. the visual tokens)."""
    arr = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return processor(images=list(arr), return_tensors="pt")["pixel_values"]


class HFTokens:
    """A transformers tokenizer behind the interface the benchmark's code reads from `model.tok`."""

    def __init__(self, tokenizer, image_id: int, answer_after: str, eos_id: int | None = None):
        self.hf = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        if self.eos_id is None:
            raise BenchError("the checkpoint's tokenizer defines no eos token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.image_id = image_id
        self.vocab_size = len(tokenizer)
        self._after = answer_after
        self._after_ids = tokenizer(answer_after, add_special_tokens=False).input_ids

    def encode(self, text: str) -> list[int]:
        """The ids of `text` as it reads right after the template's last word (so an answer tokenizes
        as the model reads it in context: ' cat' for a byte-level BPE, '▁cat' for SentencePiece)."""
        ids = self.hf(f"{self._after} {text}", add_special_tokens=False).input_ids
        if ids[:len(self._after_ids)] != self._after_ids:        # the boundary merged: tokenize alone
            return self.hf(text, add_special_tokens=False).input_ids
        return ids[len(self._after_ids):]

    def token(self, word: str) -> int:
        """The single id of a CP option word; a word the tokenizer splits is refused (its first piece
        could be shared by another option)."""
        ids = self.encode(word)
        if len(ids) != 1:
            raise BenchError(f"option {word!r} is {len(ids)} tokens for this tokenizer (CP needs one-token options)")
        return ids[0]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.hf.decode(ids, skip_special_tokens=True).strip()


class ChatLayout:
    """Collation at full scale: the published template with `{prompt}`, its `<image>` placeholder
    expanded to `n_visual` image-token ids (in the string, or before the BOS where the model wants its
    image tokens first, as BLIP-2's processor does), left padding."""

    def init_chat(self, tokenizer, template: str, n_visual: int, image_id: int, image_first: bool = False,
                  eos_id: int | None = None) -> None:
        """`eos_id`: the token that ends an answer when it is not the tokenizer's eos (Flamingo's <|endofchunk|>)."""
        if template.count("<image>") != 1 or "{prompt}" not in template:
            raise BenchError(f"chat template needs one <image> and a {{prompt}}: {template!r}")
        self.template, self.n_visual, self._image_first = template, n_visual, image_first
        self.tok = HFTokens(tokenizer, image_id, template.rstrip().split()[-1], eos_id)
        self._image_text = tokenizer.convert_ids_to_tokens(image_id)

    def _chat_ids(self, prompt: str) -> list[int]:
        text = self.template.replace("{prompt}", prompt)
        hf = self.tok.hf
        if self._image_first:
            ids = [self.tok.image_id] * self.n_visual + hf(text.replace("<image>", "")).input_ids
        else:
            ids = hf(text.replace("<image>", self._image_text * self.n_visual)).input_ids
        if sum(i == self.tok.image_id for i in ids) != self.n_visual:
            raise BenchError(f"the tokenizer does not keep {self._image_text!r} as one token, or the prompt "
                             f"contains it: {prompt!r}")
        return ids

    def _answer_ids(self, response: str, gen_length: int) -> list[int]:
        ids = self.tok.encode(response) + [self.tok.eos_id]
        if len(ids) > gen_length:
            raise BenchError(f"response longer than gen_length={gen_length} tokens: {response!r}")
        return ids + [self.tok.eos_id] * (gen_length - len(ids))

    def collate(self, samples: Sequence[Sample], with_response: bool = True, gen_length: int = 32) -> Batch:
        rows = [self._chat_ids(s.prompt) for s in samples]
        width = max(map(len, rows))
        ids = torch.tensor([[self.tok.pad_id] * (width - len(r)) + r for r in rows])
        real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
        vis = torch.stack([torch.nonzero((row == self.tok.image_id) & keep).squeeze(1) for row, keep in zip(ids, real)])
        images = torch.from_numpy(np.stack([s.image for s in samples]).astype(np.float32))
        resp = torch.tensor([self._answer_ids(s.response, gen_length) for s in samples]) if with_response else None
        dev = self.hf.get_input_embeddings().weight.device        # the images stay on the CPU (the processor reads them)
        return Batch(images, ids.to(dev), real.to(dev), vis.to(dev), None if resp is None else resp.to(dev), None)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self.tok.decode(row.tolist()) for row in ids]



def text_tokenizer(model_args: dict, load) -> "HFTokens | None":
    """An entry's `text_tokenizer` hook: the tokens the model reads text with at full scale (what the
    pipeline's up-front answer-length check counts), None at tiny scale. `load(path)` gives
    (tokenizer, image id, template, eos id) without loading the weights."""
    if not model_args.get("weights"):
        return None
    tokenizer, image_id, template, eos_id = load(Path(model_args["weights"]).expanduser())
    return HFTokens(tokenizer, image_id, template.rstrip().split()[-1], eos_id)
