"""The staged pipeline of one cell: base -> clean -> backdoored -> defended -> evaluated.

Every stage's artifact is content-addressed by the digest of everything that determines it (spec
fields, the stage before it, and the source of the code it runs), so a grid trains each base and
backdoored model once and shares it across defenses, and a killed run resumes at the last finished
stage. Records are appended only after a row is fully evaluated.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import platform
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import bench
from attacks.base import poison, triggered
from bench import records
from bench.cache import ArtifactCache
from core.errors import BenchError
from bench.evaluate import CP_PROTOCOL, evaluate
from core.registry import get
from bench.spec import Decoding, Recipe, RunSpec, digest, freeze
from core.params import coerce_params, resolve_config
from defenses.base import DefenseContext

ROOT = Path(__file__).resolve().parent.parent


def source_hash(*objs: Any) -> str:
    """sha256 over the source files of modules/classes/dirs: a stage's code version."""
    h = hashlib.sha256()
    paths: list[Path] = []
    for o in objs:
        if isinstance(o, (str, Path)):
            p = ROOT / o
            paths += sorted(p.glob("*.py")) if p.is_dir() else [p]
        else:
            paths.append(Path(inspect.getsourcefile(o)))
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def task_defaults(task_cls) -> dict:
    return {k: v.default for k, v in inspect.signature(task_cls).parameters.items()
            if k != "seed" and v.default is not inspect.Parameter.empty}


def make_spec(*, model: str = "llada-v", attack: str = "badnets", target: str = "insertion", defense: str = "disp",
              seed: int = 0, poison_rate: float = 0.2, scale: str = "tiny", task: str = "synthetic",
              trainable: str | None = None,
              recipe: dict | None = None, decoding: dict | None = None, prompt_template: str | None = None,
              model_args: dict | None = None, task_args: dict | None = None, attack_args: dict | None = None,
              target_args: dict | None = None, defense_args: dict | None = None) -> RunSpec:
    """Validate every name against the registries and resolve every method's params (defaults filled)."""
    entry = get("models", model)
    if scale not in entry.scales:
        raise BenchError(f"unknown scale {scale!r} for {model} (valid: {', '.join(entry.scales)})")
    task_cls = get("tasks", task)
    t_args = task_defaults(task_cls)
    t_args.update(coerce_params(task_args or {}, t_args, "task"))
    kw = dict(model=model, scale=scale, trainable=trainable or RunSpec.trainable, task=task, attack=attack, target=target, poison_rate=poison_rate,
              defense=defense, seed=seed,
              model_args=freeze(entry.resolve(scale, model_args or {})), task_args=freeze(t_args),
              attack_args=freeze(resolve_config(get("attacks", attack).Config, attack_args or {}, f"attack {attack}")),
              target_args=freeze(resolve_config(get("targets", target).Config, target_args or {}, f"target {target}")),
              defense_args=freeze(resolve_config(get("defenses", defense).Config, defense_args or {}, f"defense {defense}")))
    try:
        kw["recipe"] = Recipe(**{**Recipe().__dict__, **(recipe or {})})
        kw["decoding"] = Decoding(**{**Decoding().__dict__, **(decoding or {})})
    except TypeError as e:
        raise BenchError(f"bad recipe/decoding setting: {e}") from None
    if prompt_template:
        kw["prompt_template"] = prompt_template
    return RunSpec(**kw)


def code_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"unknown (package {bench.__version__})"


def versions() -> dict:
    """Software and the torch thread count: CPU float reductions depend on it, so a run with another
    BENCH_THREADS can differ in the last sample or two (measured: DiSP CP 57.0 at 1 thread, 56.0 at 2)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "vl-backdoor-bench": bench.__version__, "platform": platform.platform(),
            "torch_threads": torch.get_num_threads()}


class Cell:
    """One cell's components and stage keys; each stage method returns its (cached) artifact."""

    def __init__(self, spec: RunSpec, cache: ArtifactCache, log: Callable[[str], None] = print):
        self.spec, self.cache, self.log = spec, cache, log
        self.task = get("tasks", spec.task)(seed=spec.seed, **spec.args("task"))
        self.tok = self.task.tokenizer()
        self.entry = get("models", spec.model)
        self.trigger = get("attacks", spec.attack)(**spec.args("attack"))
        self.target = get("targets", spec.target)(**spec.args("target"))
        self.defense = get("defenses", spec.defense)(**spec.args("defense"))
        self._check_vocabulary()
        self.trigger_report: dict = {}   # what a learned trigger's fit measured (fooling rate, mask density...)
        self.timings: dict[str, float] = {}   # seconds each stage computed in this run, exclusive of nested stages
        self._inner = 0.0
        s = spec
        self.keys = {"base": digest({"stage": "base", "model": s.model, "scale": s.scale, "task": s.task,
                                     "seed": s.seed, "model_args": s.model_args, "task_args": s.task_args,
                                     "template": s.prompt_template, "gen_length": s.decoding.gen_length,
                                     "code": source_hash("models", "tasks", self.entry, type(self.task))})}
        self.keys["clean"] = digest({"stage": "clean", "base": self.keys["base"], "recipe": s.recipe, "trainable": s.trainable,
                                     "code": source_hash("models/train.py")})
        self.keys["trigger"] = digest({"stage": "trigger", "attack": s.attack, "args": s.attack_args, "seed": s.seed,
                                       "task": self.keys["base"], "code": source_hash("attacks/base.py", type(self.trigger))})
        self.keys["backdoored"] = digest({"stage": "backdoored", "clean_recipe": self.keys["clean"],
                                          "trigger": self.keys["trigger"], "target": s.target, "target_args": s.target_args,
                                          "poison_rate": s.poison_rate, "code": source_hash(type(self.target))})
        self.keys["defended"] = digest({"stage": "defended", "backdoored": self.keys["backdoored"], "defense": s.defense,
                                        "defense_args": s.defense_args, "decoding": s.decoding,
                                        "code": source_hash("defenses/base.py", type(self.defense))})

    def _check_vocabulary(self) -> None:
        """Words an attack adds (target response, text keys) must be in the task's vocabulary: a one-line
        error now rather than a tokenizer failure after the base model has trained."""
        sample = next((x for x in self.target.test_inputs(self.task) if self.target.eligible(x)), None)
        if sample is None:
            return
        texts = [(f"target {self.spec.target}", self.target.rewrite(sample))]
        texts += [(f"attack {self.spec.attack}", part(sample.image, sample.prompt, np.random.default_rng(0))[1])
                  for part in self.trigger.partials().values()]   # partial triggers never need a fitted state
        for what, text in texts:
            try:
                self.tok.encode(text)
            except ValueError as e:
                raise BenchError(f"{what}: {e}") from None

    # ---- helpers -------------------------------------------------------------------------------
    def _stage(self, name: str, key: str, compute: Callable[[], Any], label: str | None = None) -> Any:
        """Load or compute one stage; timings[label] = seconds spent computing it in this run (0 if cached)."""
        label = label or name
        t0, inner0 = time.perf_counter(), self._inner
        hit = self.cache.has(name, key)
        if not hit:
            self.log(f"[{label}] computing (cache key {key[:12]})")
        art = self.cache.get_or_compute(name, key, compute, {"stage": name, "spec": self.spec.to_dict()})
        elapsed = time.perf_counter() - t0
        own = elapsed - (self._inner - inner0)      # exclusive of stages computed inside this one
        self._inner = inner0 + elapsed
        if not hit or label not in self.timings:  # a later cache hit must not erase the compute time
            self.timings[label] = 0.0 if hit else round(own, 2)
        return art

    def fresh_model(self):
        return self.entry.build(self.spec.args("model"), self.tok, self.spec.prompt_template, self.spec.seed)

    def model_from(self, state: dict):
        m = self.fresh_model()
        m.load_state_dict(state)
        m.requires_grad_(False)
        return m.eval()

    def finetune(self, model, samples, *, epochs: int | None = None, trainable: str | None = None,
                 desc: str = "fine-tune") -> list[float]:
        """The victim recipe (optionally with other epochs / parts), as every row trains."""
        from models.train import finetune
        r = self.spec.recipe
        return finetune(model, samples, trainable=trainable or self.spec.trainable, lr=r.lr, epochs=epochs or r.epochs,
                        batch_size=r.batch_size, seed=self.spec.seed, gen_length=self.spec.decoding.gen_length, desc=desc)

    # ---- stages --------------------------------------------------------------------------------
    def base(self) -> dict:
        def compute():
            m = self.fresh_model()
            info = self.entry.train_base(m, self.task, self.spec.seed, self.spec.decoding.gen_length)
            return {"state": m.state_dict(), "info": info}
        return self._stage("base", self.keys["base"], compute)

    def clean(self) -> dict:
        def compute():
            m = self.model_from(self.base()["state"])
            losses = self.finetune(m, self.task.pool(), desc="clean fine-tune")
            return {"state": m.state_dict(), "info": {"final_loss": losses[-1]}}
        return self._stage("clean", self.keys["clean"], compute)

    def fitted_trigger(self):
        state = self._stage("trigger", self.keys["trigger"], lambda: self.trigger.fit(self.task.pool(), self.spec.seed))
        self.trigger.load_state(state)
        self.trigger_report = state.get("report", {})
        return self.trigger

    def poisoned_pool(self) -> list:
        return poison(self.task.pool(), self.fitted_trigger(), self.target, self.spec.poison_rate, self.spec.seed)

    def backdoored(self) -> dict:
        def compute():
            m = self.model_from(self.base()["state"])
            losses = self.finetune(m, self.poisoned_pool(), desc="backdoor fine-tune")
            return {"state": m.state_dict(), "info": {"final_loss": losses[-1]}}
        return self._stage("backdoored", self.keys["backdoored"], compute)

    def defended(self) -> dict:
        def compute():
            m = self.model_from(self.backdoored()["state"])
            # the defender sees the training set without its poison flags
            data = [s.with_(meta={k: v for k, v in s.meta.items() if k not in ("poisoned", "cross")}) for s in self.poisoned_pool()] \
                if not self.defense.uses_oracle else self.poisoned_pool()
            ctx = DefenseContext(spec=self.spec, finetune=self.finetune,
                                 base_model=lambda: self.model_from(self.base()["state"]), log=self.log)
            m = self.defense.purify(m, data, ctx)
            return {"state": m.state_dict(), "info": self.defense.report}
        return self._stage("defended", self.keys["defended"], compute)

    def eval_key(self, model_key: str) -> str:
        return digest({"stage": "evaluated", "model": model_key, "trigger": self.keys["trigger"], "target": self.spec.target,
                       "target_args": self.spec.target_args, "decoding": self.spec.decoding,
                       "code": source_hash("bench/evaluate.py", "bench/metrics.py", type(self.target))})

    def evaluated(self, row: str, model_key: str, state_fn: Callable[[], dict]) -> dict:
        key = self.eval_key(model_key)

        def compute():
            model = self.model_from(state_fn()["state"])
            clean_inputs = self.target.test_inputs(self.task)
            trigger = self.fitted_trigger()
            trig_inputs = triggered(clean_inputs, trigger, self.spec.seed)
            partial = {name: triggered(clean_inputs, trigger, self.spec.seed, partial=name) for name in trigger.partials()}
            metrics, rows = evaluate(model, self.task, self.target, clean_inputs, trig_inputs, self.spec.decoding,
                                     self.spec.seed, partial)
            return {"metrics": metrics, "rows": rows}
        return self._stage("evaluated", key, compute, label=f"evaluated_{row}") | {"key": key}

    def verify_cached(self) -> None:
        """Check every cached entry this cell will read, so a corrupt one stops the run before it writes."""
        entries = list(self.keys.items()) + [("evaluated", self.eval_key(k)) for _, k, _ in self.rows()]
        for stage, key in entries:
            if self.cache.has(stage, key):
                self.cache.load(stage, key)

    def rows(self) -> list[tuple[str, str, Callable[[], dict]]]:
        """(row name, model stage key, artifact getter) in table order."""
        out = [("clean", self.keys["clean"], self.clean), ("backdoored", self.keys["backdoored"], self.backdoored)]
        if self.spec.defense != "none":
            out.append((self.spec.defense, self.keys["defended"], self.defended))
        return out


def run_cell(spec: RunSpec, results_dir: Path, cache: ArtifactCache | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) every stage of a cell and append one record per row; returns the records."""
    results_dir = Path(results_dir)
    records.check_writable(results_dir)
    cell = Cell(spec, cache or ArtifactCache(), log)
    cell.verify_cached()
    done = []
    for row, model_key, state_fn in cell.rows():  # every stage first: records only once all rows are evaluated
        done.append((row, model_key, state_fn().get("info", {}), cell.evaluated(row, model_key, state_fn),
                     dict(cell.timings)))
    out = []
    for row, model_key, info, ev, timings in done:
        run_id = f"{ev['key'][:16]}-{uuid.uuid4().hex[:6]}"
        rec = {"run_id": run_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "spec": spec.to_dict(), "row": row, "metrics": ev["metrics"],
               "outputs": str(records.write_outputs(results_dir, run_id, ev["rows"])),
               "stage_info": info, "trigger": {"key": cell.keys["trigger"], "report": cell.trigger_report},
               "stage_keys": {"model": model_key, "evaluated": ev["key"]},
               "protocol": {"cp": CP_PROTOCOL, "asr": type(cell.target).__doc__.strip().splitlines()[0],
                            "trainable": spec.trainable, "decoding": "greedy, " + str(spec.decoding)},
               "timings": timings, "versions": versions(), "code_revision": code_revision()}
        records.append(results_dir, rec)
        out.append(rec)
    return out
