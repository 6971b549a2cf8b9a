"""Strict, family-agnostic loading of published safetensors checkpoints (never random weights).

A published checkpoint directory holds ``config.json``, the tensors in one ``model.safetensors`` or in
shards listed by ``model.safetensors.index.json`` (``weight_map``: key -> shard file), and usually the
tokenizer files. A victim family supplies a **key map** (a function: checkpoint key -> our module key,
or ``None`` for a key we do not model) and the shapes of its module (read from a module built on the
``meta`` device, so an 8B model's shapes cost no memory). The rule this module enforces:

    every checkpoint key maps to exactly one module key with an equal shape, and every module key is
    the image of exactly one checkpoint key

otherwise ``BenchError`` names the first mismatches (missing / unexpected / duplicate / shape), before a
single tensor is read. Nothing is ever left at its random initialisation.

Public API (stable: other families reuse it; keep it family-agnostic):

- ``read_index(path)``            -> {checkpoint key: shard file name}
- ``read_header(path)``           -> {checkpoint key: TensorInfo(shape, dtype)} (headers only, no tensor data)
- ``read_config(path)``           -> config.json as a dict ({} if absent)
- ``match_keys(ckpt, module, key_map)`` -> KeyMatch (the mapping and every mismatch; pure, shape-only)
- ``inspect_checkpoint(path, module_shapes, key_map)`` -> WeightsReport (headers + config only)
- ``load_checkpoint(path, module, key_map, dtype=, device=)`` -> WeightsReport (strict; fills ``module``)
- ``load_state_dict_strict(module, state_dict, key_map)`` -> WeightsReport (the same rule for an in-memory dict)
- ``checkpoint_hash(path)``       -> sha256 over the files a run loads (shards, index, config)
- ``module_shapes(module)``       -> {module key: shape} (parameters and persistent buffers)
- ``write_checkpoint(path, tensors, config, shard_bytes=)`` -> writes shards + index + config.json in
  the published layout (tests and synthetic checkpoints)
- ``resolve_device(device, dtype)`` -> the ('auto'-resolved) device and dtype names a full-scale spec pins
- ``base_info(model)``            -> the base stage's info at full scale (the loaded model's weights report)

The report's ``summary()`` is what ``bench check-weights`` prints; records pin ``report.hash``.
Source of the layout: the safetensors format (huggingface/safetensors, docs "Metadata parsing") and
transformers' sharded-checkpoint index (``model.safetensors.index.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from core.errors import BenchError
from core.files import file_sha256

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
KeyMap = Callable[[str], "str | None"]     # checkpoint key -> module key (None: not modelled -> unexpected)
SHOW = 5                                   # mismatches named per kind in a message

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_NAME = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor as its header describes it: shape, safetensors dtype name, shard file."""

    shape: tuple[int, ...]
    dtype: str
    file: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 4)


# ---- reading a directory (headers only) ------------------------------------------------------------
def _dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise BenchError(f"weights path {str(p)!r} does not exist")
    if p.is_file():
        if p.name.endswith(".safetensors"):
            return p.parent
        raise BenchError(f"weights path {str(p)!r} is a file; give the checkpoint directory")
    return p


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """{checkpoint key: shard file name}: from ``model.safetensors.index.json`` when present, else from
    the single ``model.safetensors`` (or, failing both, every ``*.safetensors`` in the directory)."""
    d = _dir(path)
    if (d / INDEX_NAME).exists():
        try:
            wm = json.loads((d / INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise BenchError(f"{d / INDEX_NAME}: not a safetensors index ({e})") from None
        missing = sorted({f for f in wm.values() if not (d / f).exists()})
        if missing:
            raise BenchError(f"{d}: the index names shard(s) that are not there: {', '.join(missing[:SHOW])}")
        return dict(wm)
    files = [d / SINGLE_NAME] if (d / SINGLE_NAME).exists() else sorted(d.glob("*.safetensors"))
    if not files:
        raise BenchError(f"{d}: no safetensors checkpoint ({INDEX_NAME} or *.safetensors) found")
    out: dict[str, str] = {}
    for f in files:
        for k in _header_of(f):
            if k in out:
                raise BenchError(f"{d}: key {k!r} stored in both {out[k]} and {f.name}")
            out[k] = f.name
    return out


def _header_of(file: Path) -> dict[str, dict]:
    """The JSON header of one safetensors file (8-byte little-endian length, then JSON): no tensor data read."""
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 1 << 30:
                raise ValueError("bad header length")
            head = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise BenchError(f"{file}: not a readable safetensors file ({e})") from None
    head.pop("__metadata__", None)
    return head


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """{checkpoint key: TensorInfo} over every shard, from the headers only (an index entry whose shard
    lacks the key is an error)."""
    d = _dir(path)
    index = read_index(d)
    out: dict[str, TensorInfo] = {}
    for fname in sorted(set(index.values())):
        head = _header_of(d / fname)
        for k, v in head.items():
            if index.get(k) == fname:
                out[k] = TensorInfo(tuple(v["shape"]), v["dtype"], fname)
    lost = [k for k in index if k not in out]
    if lost:
        raise BenchError(f"{d}: index lists key(s) missing from their shard: {', '.join(lost[:SHOW])}")
    return out


def read_config(path: str | os.PathLike) -> dict:
    """config.json of the checkpoint directory as a dict ({} when there is none)."""
    f = _dir(path) / CONFIG_NAME
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise BenchError(f"{f}: not valid JSON ({e})") from None


_HASHES: dict[tuple, str] = {}


def _file_sha256(f: Path) -> str:
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(f, chunk=1 << 24)
    return _HASHES[key]


def checkpoint_hash(path: str | os.PathLike) -> str:
    """sha256 over "name sha256" lines of every file a run loads (shards, index, config.json), sorted by
    name. Per-file hashes are the content sha256 (what the Hub lists as a file's LFS oid), so a hash
    identifies the weights whatever directory holds them; computed once per file per process."""
    d = _dir(path)
    names = set(read_index(d).values()) | {n for n in (INDEX_NAME, CONFIG_NAME) if (d / n).exists()}
    lines = "".join(f"{n} {_file_sha256(d / n)}\n" for n in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


# ---- matching keys ------------------------------------------------------------------------------
def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{module key: shape} of a module's state dict (parameters + persistent buffers); works on a module
    built on the meta device, so a full-size model's shapes cost no memory."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@dataclass
class KeyMatch:
    """How checkpoint keys meet module keys: ``mapping`` (checkpoint key -> module key) of the good
    pairs, and every mismatch. ``ok`` only when all four mismatch lists are empty."""

    mapping: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)          # module keys no checkpoint key maps to
    unexpected: list[str] = field(default_factory=list)       # checkpoint keys the map sends nowhere (or to no module key)
    duplicate: list[tuple[str, str]] = field(default_factory=list)   # (checkpoint key, module key) already taken
    shape: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # (ckpt key, module key, ckpt shape, module shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.duplicate or self.shape)

    def problems(self, n: int = SHOW) -> list[str]:
        """One phrase per kind of mismatch, naming the first n of each."""
        out = []
        if self.missing:
            out.append(f"{len(self.missing)} missing (module keys no checkpoint key fills): {', '.join(self.missing[:n])}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected (checkpoint keys with no module key): {', '.join(self.unexpected[:n])}")
        if self.duplicate:
            out.append(f"{len(self.duplicate)} duplicate: " + ", ".join(f"{c} -> {m}" for c, m in self.duplicate[:n]))
        if self.shape:
            out.append(f"{len(self.shape)} shape mismatch: " + ", ".join(
                f"{c} {list(cs)} vs {m} {list(ms)}" for c, m, cs, ms in self.shape[:n]))
        return out


def match_keys(ckpt_shapes: Mapping[str, tuple], module_shapes: Mapping[str, tuple], key_map: KeyMap) -> KeyMatch:
    """Apply ``key_map`` to every checkpoint key (sorted) and check the one-to-one, equal-shape rule."""
    m = KeyMatch()
    taken: dict[str, str] = {}
    for ck in sorted(ckpt_shapes):
        mk = key_map(ck)
        if mk is None or mk not in module_shapes:
            m.unexpected.append(ck)
        elif mk in taken:
            m.duplicate.append((ck, mk))
        elif tuple(ckpt_shapes[ck]) != tuple(module_shapes[mk]):
            taken[mk] = ck
            m.shape.append((ck, mk, tuple(ckpt_shapes[ck]), tuple(module_shapes[mk])))
        else:
            taken[mk] = ck
            m.mapping[ck] = mk
    m.missing = sorted(k for k in module_shapes if k not in taken)
    return m


@dataclass
class WeightsReport:
    """What a run loads (or would load) from a checkpoint: counts, dtypes, size, the modules filled,
    the config, the first mismatches, and the files' hash (None when only headers were read)."""

    path: str
    n_tensors: int
    n_params: int
    total_bytes: int
    dtypes: dict[str, int]                      # safetensors dtype name -> tensor count
    modules: dict[str, int]                     # top module prefix -> tensors mapped into it
    match: KeyMatch
    config: dict = field(default_factory=dict)
    hash: str | None = None
    loaded_dtype: str | None = None             # the torch dtype the module holds after loading
    device: str | None = None

    @property
    def ok(self) -> bool:
        return self.match.ok

    def error(self) -> str:
        return f"checkpoint {self.path} does not match the model: " + "; ".join(self.match.problems())

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise BenchError(self.error())

    def summary(self) -> str:
        """Human-readable lines (what ``bench check-weights`` prints)."""
        gb = self.total_bytes / 1e9
        lines = [f"checkpoint: {self.path}",
                 f"tensors: {self.n_tensors}  params: {self.n_params:,}  size: {gb:.2f} GB  dtypes: "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(self.dtypes.items())),
                 "modules filled: " + ", ".join(f"{k} ({v})" for k, v in self.modules.items())]
        if self.hash:
            lines.append(f"sha256: {self.hash}")
        lines.append("status: OK, every key maps one to one with equal shape" if self.ok
                     else "status: MISMATCH\n  " + "\n  ".join(self.match.problems()))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The fields a record pins (hash, dtype, device, counts)."""
        return {"path": self.path, "hash": self.hash, "dtype": self.loaded_dtype, "device": self.device,
                "n_tensors": self.n_tensors, "n_params": self.n_params, "total_bytes": self.total_bytes,
                "stored_dtypes": dict(self.dtypes)}


def _module_counts(mapping: Mapping[str, str], depth: int) -> dict[str, int]:
    return dict(Counter(".".join(mk.split(".")[:min(depth, len(mk.split(".")) - 1) or 1]) for mk in mapping.values()))


def _report(path: str, infos: Mapping[str, TensorInfo], match: KeyMatch, config: dict, depth: int) -> WeightsReport:
    return WeightsReport(path=path, n_tensors=len(infos), n_params=sum(i.numel for i in infos.values()),
                         total_bytes=sum(i.nbytes for i in infos.values()),
                         dtypes=dict(Counter(i.dtype for i in infos.values())),
                         modules=_module_counts(match.mapping, depth), match=match, config=config)


def inspect_checkpoint(path: str | os.PathLike, module_shapes: Mapping[str, tuple], key_map: KeyMap,
                       module_depth: int = 2) -> WeightsReport:
    """Headers + config only: what a run would load, with every mismatch (no tensor data is read).
    ``module_depth`` is how many dotted name parts group the filled modules in the report."""
    infos = read_header(path)
    match = match_keys({k: i.shape for k, i in infos.items()}, module_shapes, key_map)
    return _report(str(path), infos, match, read_config(path), module_depth)


def load_checkpoint(path: str | os.PathLike, module: torch.nn.Module, key_map: KeyMap, *,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    module_depth: int = 2, with_hash: bool = True) -> WeightsReport:
    """Strictly load a checkpoint directory into ``module`` (which may live on the meta device: each
    tensor is materialised on ``device`` in ``dtype`` — or its own dtype — via accelerate's
    ``set_module_tensor_to_device``). Raises BenchError naming the first mismatches before reading
    any tensor data. Returns the report with the files' hash."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    report = inspect_checkpoint(path, module_shapes(module), key_map, module_depth)
    report.raise_if_bad()
    d = _dir(path)
    index = read_index(d)
    by_file: dict[str, list[str]] = {}
    for ck in report.match.mapping:
        by_file.setdefault(index[ck], []).append(ck)
    dev = torch.device(device)
    for fname, keys in sorted(by_file.items()):
        with safe_open(str(d / fname), framework="pt", device="cpu") as fh:
            for ck in keys:
                t = fh.get_tensor(ck)
                set_module_tensor_to_device(module, report.match.mapping[ck], dev, value=t,
                                            dtype=dtype if t.is_floating_point() else None)
    report.loaded_dtype = str(next(module.parameters()).dtype).replace("torch.", "")
    report.device = str(dev)
    if with_hash:
        report.hash = checkpoint_hash(d)
    return report


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], key_map: KeyMap,
                           module_depth: int = 2) -> WeightsReport:
    """The same strict rule for an in-memory state dict in checkpoint naming: map, check, copy."""
    infos = {k: TensorInfo(tuple(v.shape), _TORCH_NAME.get(v.dtype, str(v.dtype))) for k, v in state_dict.items()}
    match = match_keys({k: i.shape for k, i in infos.items()}, module_shapes(module), key_map)
    report = _report("<state dict>", infos, match, {}, module_depth)
    report.raise_if_bad()
    own = module.state_dict()
    with torch.no_grad():
        for ck, mk in match.mapping.items():
            own[mk].copy_(state_dict[ck])
    return report


# ---- writing the published layout ----------------------------------------------------------------
def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict | None = None,
                     shard_bytes: int = 2 ** 31, metadata: dict | None = None) -> list[str]:
    """Write ``tensors`` (already in checkpoint naming) as published: shards ``model-0000i-of-0000n.safetensors``
    of at most ``shard_bytes`` each (key order kept), ``model.safetensors.index.json`` and ``config.json``.
    Returns the shard file names."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t.detach().to("cpu").contiguous().clone()
        size += nb
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(d / name), metadata={"format": "pt", **(metadata or {})})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if config is not None:
        (d / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return names


def rename(key: str, rules: Iterable[tuple[str, str]]) -> str:
    """Apply the first matching (prefix, replacement) rule to a key (a building block for key maps)."""
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# ---- run settings every full-scale victim shares ----------------------------------------------------------
def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """(device, dtype) names: 'auto' device is accelerate's (cuda when present, else cpu); 'auto'
    dtype is bfloat16 where the device supports it, float32 on CPU. A device this machine does not
    have is refused here, when the spec is made, not when the first stage moves weights onto it."""
    if device == "auto":
        from accelerate import PartialState
        device = str(PartialState().device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise BenchError(f"model arg device {device!r} is not a torch device (e.g. auto, cpu, cuda, cuda:0)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise BenchError(f"model arg device {device!r}: this machine has {n} CUDA device(s)")
    elif dev.type != "cpu":
        raise BenchError(f"model arg device {device!r}: only cpu and cuda devices are supported")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise BenchError(f"model arg dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
    return str(dev), dtype


def base_info(model) -> dict:
    """The base stage at full scale trains nothing: the published checkpoint is the base model."""
    return {"trained": "nothing: the published checkpoint is the base model", **model.weights_report.to_dict()}


# ---- what a full-scale stage stores -------------------------------------------------------------------------
class FullStages:
    """Stages of a full-scale victim (mixed in before the model class; the model has ``cfg.checkpoint``).

    A stage stores the parameters the fine-tunes trained since the published weights were loaded,
    every part any ``set_trainable`` call opened (the projector by default; the LM too under
    ``projector+lm``; everything under ``all``), plus the checkpoint's hash; never a copy of the
    untouched published weights. A reload is the published checkpoint plus those tensors, and a stage
    trained on other weights is refused."""

    trained: frozenset = frozenset()

    def set_trainable(self, parts: str) -> None:
        """Freeze everything, open ``parts`` as the model class defines them, and remember what opened."""
        self.requires_grad_(False)
        super().set_trainable(parts)
        self.trained = self.trained | {n for n, p in self.named_parameters() if p.requires_grad}

    def stage_state(self) -> dict:
        params = dict(self.named_parameters())
        return {"checkpoint": self.cfg.checkpoint,
                "trained": {n: params[n].detach().cpu().clone() for n in sorted(self.trained)}}

    def load_stage_state(self, state: dict) -> None:
        if state.get("checkpoint") != self.cfg.checkpoint:
            raise BenchError(f"cached stage was trained on checkpoint {str(state.get('checkpoint'))[:12]}, "
                             f"this model is {self.cfg.checkpoint[:12]}")
        stored, params = state["trained"], dict(self.named_parameters())
        unknown = sorted(n for n in stored if n not in params)
        wrong = sorted(n for n in stored if n in params and tuple(stored[n].shape) != tuple(params[n].shape))
        stale = sorted(self.trained - set(stored))      # trained here, and the stage would not overwrite them
        for what, names in (("parameters this model lacks", unknown), ("other shapes", wrong),
                            ("fewer parts than this model has trained", stale)):
            if names:
                raise BenchError(f"cached stage does not fit this model: {what} ({', '.join(names[:SHOW])})")
        with torch.no_grad():
            for n, t in stored.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        self.trained = frozenset(stored)
