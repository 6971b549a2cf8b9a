"""The lmms-eval bridge: clean performance of any of our victims (clean, backdoored or defended, loaded
straight from the artifact cache) through the field's own harness, from local parquet files.

lmms-eval (0.7.3) takes third-party models through the entry-point group ``lmms_eval.models`` whose
payload is a ``ModelManifest`` (lmms_eval/models/registry_v2.py; docs/datasets.md): our
``pyproject.toml`` declares ``vl-backdoor-bench = "bench.lmms:manifest"``, naming ``BenchVictim``, a
``lmms_eval.api.model.lmms`` subclass (``is_simple = True``) that answers ``generate_until`` with the
victim's own sampler and chat template. Tasks run offline from local files: ``local_task`` writes a
task YAML that ``include:``s the stock task (its prompts, parser and metric unchanged) with
``dataset_path: parquet`` and absolute ``data_files`` — the DiSP paper's CP is ``mmmu_val``.

``score`` runs one (cell, row) and appends a record to ``<results>/lmms_eval.jsonl`` holding the
lmms-eval version, the resolved task config, the data files' sha256, every seed lmms-eval draws with
(MMMU's answer parser picks a random option when it finds no letter) and the result.

What the victim sees: the first image of a request (MMMU items with several images are answered from
their first; ``<image k>`` tags are removed from the text) and the request's text as the instruction.
A tiny replica reads only the words of its synthetic vocabulary, so for it the text is reduced to the
words it knows (its scores are a plumbing check, not a capability measurement). A guard defense's
flagged inputs abstain (empty answer), as in our own evaluation.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core.errors import BenchError
from core.files import file_sha256

MODEL_ID = "vl-backdoor-bench"
RESULTS_FILE = "lmms_eval.jsonl"
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
_IMAGE_TAG = re.compile(r"<image\s*\d*>")


def _lmms_eval():
    try:
        import lmms_eval
        from lmms_eval.api.model import lmms
    except ImportError as e:
        raise BenchError(f"the lmms-eval bridge needs the optional extra: pip install --no-deps lmms-eval==0.7.3 "
                         f"then pip install -e '.[lmms]' (docs/datasets.md) — import failed: {e}") from None
    return lmms_eval, lmms


def manifest():
    """The ``lmms_eval.models`` entry point's payload (a zero-arg callable returning a ModelManifest)."""
    _lmms_eval()
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path="bench.lmms.BenchVictim")


# --------------------------------------------------------------------------------------------
# Our victims from the cache
# --------------------------------------------------------------------------------------------
def spec_from_dict(d: dict):
    """A RunSpec from a record's ``spec`` dict (its ``*_args`` as dicts)."""
    from bench.spec import Decoding, Recipe, RunSpec, freeze
    names = {f.name for f in fields(RunSpec)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise BenchError(f"spec has unknown fields {unknown}")
    kw = {k: (freeze(v) if k.endswith("_args") else v) for k, v in d.items()}
    try:
        kw["recipe"] = Recipe(**d.get("recipe", {}))
        kw["decoding"] = Decoding(**d.get("decoding", {}))
        return RunSpec(**kw)
    except TypeError as e:
        raise BenchError(f"bad spec: {e}") from None


def load_victim(spec, row: str, cache_root: str | Path | None = None) -> tuple[Any, Callable | None, str, Any]:
    """(model, guard or None, the model's stage key, the cell) of one row of a cell, from the cache
    only: a row whose stage is not cached is a BenchError (run ``bench run`` first), never a training."""
    from bench.cache import ArtifactCache
    from bench.pipeline import Cell

    cell = Cell(spec, ArtifactCache(Path(cache_root) if cache_root else None), log=lambda m: None)
    rows = {r: (k, fn) for r, k, fn in cell.rows()}
    if row not in rows:
        raise BenchError(f"row {row!r} is not a row of this cell (valid: {', '.join(rows)})")
    key, getter = rows[row]
    stage = cell.row_stage(row)
    if not cell.cache.has(stage, key):
        raise BenchError(f"the {row} row's model is not in the cache {cell.cache.root} ({stage} {key[:12]}): "
                         "run `bench run` for this cell first")
    model = cell.model_from(getter()["state"])
    return model, cell.guard_fn(row), key, cell


def _words_known(tok, text: str) -> str:
    """The text as the tokenizer can read it: unchanged for a subword tokenizer, reduced to the words of
    its vocabulary for the tiny replicas' word-level one (lowercased, punctuation dropped)."""
    try:
        tok.encode(text)
        return text
    except ValueError:
        words = re.sub(r"[^\w<>|'-]+", " ", text.lower()).split()
        known = []
        for w in words:
            try:
                tok.token(w)
                known.append(w)
            except ValueError:
                pass
        return " ".join(known)


def _as_array(visual, size: int) -> np.ndarray:
    """A PIL image (or None) as the float32 (H, W, 3) [0, 1] array our victims read; ``size`` > 0 resizes
    it square (a tiny replica's fixed input size), 0 keeps it as given."""
    from PIL import Image
    im = visual.convert("RGB") if visual is not None else Image.new("RGB", (max(size, 8),) * 2, (127, 127, 127))
    if size:
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------
# The lmms-eval model
# --------------------------------------------------------------------------------------------
try:                                    # the optional extra; without it score() says how to install it
    from lmms_eval.api.model import lmms as _LMMS
except ImportError:                     # pragma: no cover - exercised only without the extra
    _LMMS = object


class BenchVictim(_LMMS):
    """One row of one of our cells as an lmms-eval model. ``model_args``: ``spec`` (path to a JSON file
    holding a record's spec), ``row`` (clean | backdoored | the defense's name), ``cache`` (artifact cache
    dir; default $BENCH_CACHE), optional ``gen_length`` / ``steps`` / ``block_length`` (decoding for these
    requests; default the spec's), ``image_size`` (square resize; default the tiny replica's own size, 0
    at full scale) and ``batch_size``."""

    is_simple = True

    def __init__(self, spec: str = "", row: str = "clean", cache: str = "", gen_length: int | None = None,
                 steps: int | None = None, block_length: int | None = None, image_size: int | None = None,
                 batch_size: int | str | None = 8, device: str | None = None, max_batch_size: int | None = None,
                 **_ignored) -> None:
        super().__init__()
        from bench.spec import Decoding
        path = Path(spec)
        if not spec or not path.is_file():
            raise BenchError(f"model_args spec={spec!r}: expected the path of a JSON file holding a record's spec")
        try:
            spec_dict = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchError(f"malformed file {path}: {e}") from None
        self.spec = spec_from_dict(spec_dict)
        self.row = row
        self.model, self.guard, self.model_key, self.cell = load_victim(self.spec, row, cache or None)
        d = self.spec.decoding
        self.decoding = Decoding(steps=int(steps or d.steps), gen_length=int(gen_length or d.gen_length),
                                 block_length=int(block_length or d.block_length), remasking=d.remasking)
        size = image_size if image_size is not None else dict(self.spec.model_args).get("image_size", 0)
        self.image_size = int(size) if self.spec.scale == "tiny" or image_size is not None else 0
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8

    def _samples(self, requests) -> list:
        from tasks.base import Sample
        out = []
        for req in requests:
            context, _, doc_to_visual, doc_id, task, split = req.args[:6]
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            visuals = [v for v in (visuals or []) if v is not None]
            text = " ".join(_IMAGE_TAG.sub(" ", context).split())
            out.append(Sample(_as_array(visuals[0] if visuals else None, self.image_size),
                              _words_known(self.model.tok, text), "", {"id": f"{task}-{doc_id}"}))
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy answers with the victim's own sampler and template (the spec's decoding unless overridden)."""
        import torch

        from bench.evaluate import ABSTAIN, generate_texts
        samples = self._samples(requests)
        outs = generate_texts(self.model, samples, self.decoding, self.spec.seed, batch_size=self.batch_size_per_gpu,
                              desc="lmms-eval generate")
        if self.guard is not None:
            with torch.no_grad():
                flags = [bool(f) for f in self.guard(self.model, samples)]
            outs = [ABSTAIN if f else o for o, f in zip(outs, flags)]
        for req, o in zip(requests, outs):
            self.cache_hook.add_partial("generate_until", req.args, o)
        return outs

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of a one-token continuation at the first answer position with the whole answer
        masked (our CP's option scoring, bench/evaluate.py); longer continuations are refused."""
        import torch
        samples = self._samples(requests)
        out = []
        for req, s in zip(requests, samples):
            target = req.args[1]
            cont = target(self.task_dict[req.args[4]][req.args[5]][req.args[3]]) if callable(target) else target
            ids = self.model.tok.encode(_words_known(self.model.tok, str(cont)).strip())
            if len(ids) != 1:
                raise BenchError(f"loglikelihood: continuation {cont!r} is {len(ids)} tokens for this victim; "
                                 "the bridge scores one-token continuations only (use a generate_until task)")
            with torch.no_grad():
                logits = self.model.first_answer_logits(self.model.collate([s], with_response=False),
                                                        gen_length=self.decoding.gen_length)[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append((float(logp[ids[0]]), bool(int(logits.argmax()) == ids[0])))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vl-backdoor-bench victims answer single-turn requests only")


# --------------------------------------------------------------------------------------------
# Local tasks and the runner
# --------------------------------------------------------------------------------------------
def stock_task_yaml(task: str) -> Path:
    """The stock lmms-eval YAML that defines ``task`` (found by its ``task:`` line)."""
    lmms_eval, _ = _lmms_eval()
    root = Path(lmms_eval.__file__).parent / "tasks"
    pat = re.compile(rf"^task:\s*[\"']?{re.escape(task)}[\"']?\s*$", re.M)
    for path in sorted(root.rglob("*.yaml")):
        try:
            if pat.search(path.read_text(encoding="utf-8", errors="replace")):
                return path
        except OSError:
            continue
    raise BenchError(f"lmms-eval {lmms_eval.__version__ if hasattr(lmms_eval, '__version__') else ''} has no task {task!r}")




def local_task(task: str, parquet: Sequence[str | Path], out_dir: Path) -> tuple[str, Path, str]:
    """Write ``<out_dir>/<task>_local.yaml``: the stock task read from local parquet files (its test split
    mapped to them). Returns (local task name, yaml path, the stock task's test split). Missing files are
    a BenchError naming them."""
    files = [Path(p).expanduser().resolve() for p in parquet]
    if not files:
        raise BenchError(f"lmms-eval task {task}: give the local parquet file(s) (--parquet)")
    for f in files:
        if not f.is_file():
            raise BenchError(f"missing file {f}")
    stock = stock_task_yaml(task)
    m = re.search(r"^test_split:\s*(\S+)\s*$", stock.read_text(encoding="utf-8"), re.M)
    split = m.group(1).strip("\"'") if m else "test"
    name = f"{task}_local"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    lines = [f"include: {stock}", f"task: {name}", "dataset_path: parquet", "dataset_kwargs:", "  data_files:",
             f"    {split}:"] + [f"      - {f}" for f in files]
    path.write_text("\n".join(lines) + "\n")
    return name, path, split


def _register_if_absent() -> None:
    """Our manifest in lmms-eval's registry: loaded from the entry point when the package is installed
    with it; registered directly otherwise (an editable install made before the entry point existed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    if MODEL_ID not in MODEL_REGISTRY_V2.list_model_names():
        MODEL_REGISTRY_V2.register_manifest(manifest())


def _plain(obj: Any) -> Any:
    """A task config as plain JSON: functions (``!function`` hooks) by their qualified name."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _append(results_dir: Path, rec: dict) -> Path:
    from filelock import FileLock

    from bench.records import _dumps
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / RESULTS_FILE
    line = _dumps(rec)
    with FileLock(str(path) + ".lock"):
        with open(path, "ab") as f:
            f.write(line)
    return path


def score(spec, row: str, task: str, parquet: Sequence[str | Path], results_dir: str | Path,
          cache_root: str | Path | None = None, limit: int | None = None, model_args: dict | None = None,
          seeds: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """Score one row of a cell on an lmms-eval task from local parquet files; append and return the record."""
    import os

    from bench import records
    from bench.provenance import provenance

    results_dir = Path(results_dir)
    _, _, model_key, _ = load_victim(spec, row, cache_root)   # fails here, in one line, before lmms-eval starts
    records.check_writable(results_dir)
    lmms_eval, _ = _lmms_eval()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    work = results_dir / "lmms_eval_tasks"
    name, yaml_path, split = local_task(task, parquet, work)
    spec_path = work / f"spec-{hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]}.json"
    spec_path.write_text(json.dumps(spec.to_dict(), sort_keys=True, default=str))
    _register_if_absent()
    args = {"spec": str(spec_path), "row": row, "cache": str(cache_root or ""), **(model_args or {})}
    seeds = {**SEEDS, **(seeds or {})}
    log(f"lmms-eval {_version()}: {task} from {len(parquet)} local parquet file(s) · {spec.model} {row}")
    res = simple_evaluate(model=MODEL_ID, model_args=",".join(f"{k}={v}" for k, v in args.items()),
                          tasks=[name], task_manager=TaskManager(include_path=str(work), include_defaults=False),
                          batch_size=int((model_args or {}).get("batch_size", 8)), device="cpu", limit=limit,
                          log_samples=True, **seeds)
    if res is None or name not in res.get("results", {}):
        raise BenchError(f"lmms-eval returned no result for {name}")
    result = res["results"][name]
    primary = next((k for k in result if k.endswith(",none") and "stderr" not in k
                    and isinstance(result[k], (int, float))), None)
    rec = {"kind": "lmms-eval", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "spec": spec.to_dict(), "row": row, "stage_keys": {"model": model_key},
           "lmms_eval": {"version": _version(), "task": task, "local_task": name, "split": split,
                         "task_config": _plain(res.get("configs", {}).get(name)), "task_yaml": yaml_path.read_text(),
                         "data_files": {str(Path(p).resolve()): file_sha256(Path(p)) for p in parquet},
                         "seeds": seeds, "limit": limit, "model_args": {k: v for k, v in args.items() if k != "spec"},
                         "n_samples": res.get("n-samples", {}).get(name)},
           "results": _plain(result),
           "metrics": {"cp": {"value": None if primary is None else 100.0 * float(result[primary]), "ci": None,
                              "metric": primary}},
           "outputs": [{"doc_id": s.get("doc_id"), "target": s.get("target"), "output": (s.get("filtered_resps") or [None])[0]}
                       for s in (res.get("samples") or {}).get(name, [])],
           "recorded_by": provenance()}
    _append(results_dir, rec)
    return rec


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lmms_eval")
    except PackageNotFoundError:
        return "unknown"
