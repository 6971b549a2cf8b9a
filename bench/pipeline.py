"""The staged pipeline of one cell: base -> clean -> trigger -> backdoored -> defended -> evaluated.

Every stage's artifact is content-addressed by the digest of everything that determines it (spec
fields, the stages it descends from, the transitive in-repo source of the code it runs, the torch and
numpy versions; ``stage_keys``), so a grid trains each base and backdoored model once and shares it
across defenses, and a killed run resumes at the last finished stage. Each artifact is stored with
the provenance of the process that produced it (``bench.provenance``); each record carries the chain
of stage keys it descends from with that provenance. A run first checks everything it can without
training (names, arguments, the target against the task, how many samples poisoning needs), then
computes the missing stages in dependency order with a progress line per stage, and appends all its
rows in one locked write.
"""
from __future__ import annotations

import dataclasses
import inspect
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from attacks.base import poison, poison_counts, triggered
from bench import records
from bench import responses as victim_responses
from bench.cache import ArtifactCache
from bench.evaluate import CP_PROTOCOL, evaluate
from bench.metrics import paired_delta
from bench.provenance import code_hash, provenance
from bench.spec import Decoding, Recipe, RunSpec, digest, freeze
from core.errors import BenchError
from core.params import coerce_params, resolve_config
from core.registry import get
from defenses.base import DefenderSpec, DefenseContext, defender_seed, defender_view, view_order

ROW_STAGE = {"clean": "clean", "backdoored": "backdoored"}   # row -> the stage its model comes from (else defended)
# Which stages each row's numbers descend from (the record's lineage), in run order.
LINEAGE = {"clean": ("base", "clean", "trigger"), "backdoored": ("base", "trigger", "backdoored"),
           "defended": ("base", "trigger", "backdoored", "defended"),
           "defended:objective": ("base", "trigger", "defended")}   # trained from base + poisoned set
# What the defended stage starts from, by the defense's hook (Defense.kind).
DEFENDED_DEPS = {"purify": ["backdoored", "trigger"], "guard": ["backdoored", "trigger"], "none": ["backdoored", "trigger"],
                 "filter": ["base", "backdoored", "trigger"], "objective": ["base", "trigger"]}
STAGE_LABEL = {"base": "base model (encoder MIM + LM)", "responses": "base model's answers to the pool",
               "clean": "clean fine-tune", "trigger": "trigger fit",
               "backdoored": "backdoor fine-tune", "defended": "defense"}
# Rough seconds per stage at the default tiny config on 2 cores (README "Performance"); the ETA scales
# them by how fast this machine has been so far in the run.
EXPECTED_S = {"base": 254.0, "responses": 10.0, "clean": 58.0, "trigger": 5.0, "backdoored": 59.0, "defended": 51.0, "evaluated": 11.0}


def stage_state(model) -> dict:
    """What a model stage stores: the whole state dict (tiny), or a full-scale model's trained parts plus
    its checkpoint's hash (``stage_state()``), never a copy of the published weights."""
    fn = getattr(model, "stage_state", None)
    return fn() if fn is not None else model.state_dict()


def load_state(model, state: dict) -> None:
    fn = getattr(model, "load_stage_state", None)
    fn(state) if fn is not None else model.load_state_dict(state)


def task_defaults(task_cls) -> dict:
    return {k: v.default for k, v in inspect.signature(task_cls).parameters.items()
            if k != "seed" and v.default is not inspect.Parameter.empty}


def make_spec(*, model: str = "llada-v", attack: str = "badnets", target: str = "insertion", defense: str = "disp",
              seed: int = 0, poison_rate: float | None = None, scale: str = "tiny", task: str = "synthetic",
              trainable: str | None = None,
              recipe: dict | None = None, decoding: dict | None = None, prompt_template: str | None = None,
              model_args: dict | None = None, task_args: dict | None = None, attack_args: dict | None = None,
              target_args: dict | None = None, defense_args: dict | None = None) -> RunSpec:
    """Validate every name against the registries and resolve every method's params (defaults filled).

    A model entry's ``cell_defaults`` (its paper's cell settings, e.g. LaViDa's centre trigger, DiSP mask
    ratio 0.5 and 40% misclassification poison) and ``decoding_defaults`` fill what the caller left
    unset, for the args the chosen methods have; the resolved values are what the spec records."""
    entry = get("models", model)
    cell = getattr(entry, "cell_defaults", {})
    if poison_rate is None:
        poison_rate = cell.get("poison_rate", {}).get(target, RunSpec.poison_rate)

    def with_cell(kind: str, cls, given: dict | None) -> dict:
        names = {f.name for f in dataclasses.fields(cls.Config)}
        return {**{k: v for k, v in cell.get(f"{kind}_args", {}).items() if k in names}, **(given or {})}
    attack_args = with_cell("attack", get("attacks", attack), attack_args)
    defense_args = with_cell("defense", get("defenses", defense), defense_args)
    decoding = {**getattr(entry, "decoding_defaults", {}), **(decoding or {})}
    if scale not in entry.scales:
        raise BenchError(f"unknown scale {scale!r} for {model} (valid: {', '.join(entry.scales)})")
    task_cls = get("tasks", task)
    t_args = task_defaults(task_cls)
    t_args.update(coerce_params(task_args or {}, t_args, "task"))
    if trainable is None and scale == "full":
        trainable = "projector"          # full scale's default: the projector only (the DiSP paper's recipe)
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
    if kw["recipe"].train_length is None:       # the record holds the resolved training answer window
        kw["recipe"] = dataclasses.replace(kw["recipe"], train_length=kw["decoding"].gen_length)
    if prompt_template:
        kw["prompt_template"] = prompt_template
    return RunSpec(**kw)


def stage_keys(spec: RunSpec, root: Path | None = None) -> dict[str, str]:
    """The cache key of every stage of a cell (evaluated keys: ``eval_key``). Each hashes the spec
    fields that decide the stage, the keys of the stages it descends from, and ``code_hash`` of the
    code it runs (transitive in-repo imports + torch/numpy versions). The trigger descends from the
    task only: the attacker's fit never sees the victim, so victim args do not refit it."""
    s = spec
    entry, task_cls = get("models", s.model), get("tasks", s.task)
    trig_cls, tgt_cls, def_cls = get("attacks", s.attack), get("targets", s.target), get("defenses", s.defense)
    # the task's data, without where the pool's responses come from (that is the responses stage's), so
    # the dataset and victim variants share the task, the trigger and the base
    task_args = tuple((n, v) for n, v in s.task_args if n != "responses")
    task_id = {"stage": "task", "task": s.task, "task_args": task_args, "seed": s.seed, "code": code_hash(task_cls, root=root)}
    if hasattr(task_cls, "fingerprint"):      # a real-data task: the content of its annotation files too
        task_id["data"] = task_cls.fingerprint(s.args("task"))
    k = {"task": digest(task_id)}
    # a tiny replica's base trains answers of the training window; a published checkpoint is its own base,
    # which no window decides (so its responses stage is shared across --train-length values)
    k["base"] = digest({"stage": "base", "model": s.model, "scale": s.scale, "model_args": s.model_args,
                        "task": k["task"], "template": s.prompt_template,
                        "gen_length": s.train_length if s.scale != "full" else None,
                        "code": code_hash(entry, root=root)})
    pool = tgt_cls(**s.args("target")).pool_population()   # the target's fine-tuning pool
    clean = {"stage": "clean", "base": k["base"], "recipe": s.recipe, "trainable": s.trainable,
             "pool": pool, "code": code_hash("models/train.py", root=root)}
    if response_source(s) == "victim":
        # the base model's own answers to the pool: from the base, the task, the pool and the decoding
        # only (never the attack, target or poison rate), so Clean and Backdoored rows share them
        k["responses"] = digest({"stage": "responses", "base": k["base"], "task": k["task"], "pool": pool,
                                 "decoding": s.decoding, "code": code_hash("bench/responses.py", root=root)})
        clean["responses"] = k["responses"]
    k["clean"] = digest(clean)
    k["trigger"] = digest({"stage": "trigger", "attack": s.attack, "args": s.attack_args, "seed": s.seed,
                           "task": k["task"], "code": code_hash(trig_cls, root=root)})
    k["backdoored"] = digest({"stage": "backdoored", "clean_recipe": k["clean"], "trigger": k["trigger"],
                              "target": s.target, "target_args": s.target_args, "poison_rate": s.poison_rate,
                              "code": code_hash(tgt_cls, "attacks/base.py", root=root)})
    k["defended"] = digest({"stage": "defended", "backdoored": k["backdoored"], "defense": s.defense,
                            "defense_args": s.defense_args, "decoding": s.decoding,
                            "code": code_hash(def_cls, root=root)})
    k["eval_code"] = code_hash("bench/evaluate.py", tgt_cls, root=root)
    return k


def response_source(spec: RunSpec) -> str:
    """Where the pool's training responses come from: the dataset's captions, or the base victim's own
    generations (a real task's ``responses`` arg; DiSP App. B.1)."""
    return str(spec.args("task").get("responses", "dataset"))


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Cell:
    """One cell's components and stage keys; each stage method returns its (cached) artifact."""

    def __init__(self, spec: RunSpec, cache: ArtifactCache, log: Callable[[str], None] = print):
        self.spec, self.cache, self.log = spec, cache, log
        self.task = get("tasks", spec.task)(seed=spec.seed, **spec.args("task"))
        self.tok = self.task.tokenizer()
        self.entry = get("models", spec.model)
        # the tokenizer the model reads text with: the checkpoint's at full scale, else the task's
        hook = getattr(self.entry, "text_tokenizer", None)
        self.text_tok = (hook(spec.args("model")) if hook else None) or self.tok
        self.trigger = get("attacks", spec.attack)(**spec.args("attack"))
        self.target = get("targets", spec.target)(**spec.args("target"))
        self.defense = get("defenses", spec.defense)(**spec.args("defense"))
        self._lengths_checked = False         # victim responses: checked once the responses stage is read
        self.preflight()
        self.keys = stage_keys(spec)
        self.trigger_report: dict = {}   # what a learned trigger's fit measured (fooling rate, mask density...)
        self.timings: dict[str, float] = {}   # seconds each stage computed in this run (0 if cached)
        self._memo: dict[tuple[str, str], Any] = {}
        self._plan: list[str] = []
        self._t0 = time.perf_counter()
        self._spent_expected = 0.0

    # ---- checks before any work ------------------------------------------------------------------
    def preflight(self) -> None:
        """Everything that can fail without training fails here, as one line: the victim's capabilities
        against the defense's needs, the target against the task, the words an attack adds against the
        vocabulary, and the sample counts poisoning needs."""
        if self.tok is None and self.spec.scale != "full":     # a real-data task: free text, no word vocabulary
            raise BenchError(f"task {self.spec.task} has real images and free text: run it with --scale full (a "
                             "published victim that reads text with its own tokenizer and chat template)")
        has = tuple(getattr(self.entry, "capabilities", ()))
        missing = [c for c in getattr(self.defense, "requires", ()) if c not in has]
        if missing:
            raise BenchError(f"defense {self.spec.defense} needs a {', '.join(missing)} victim; model {self.spec.model} "
                             f"({getattr(self.entry, 'family', 'model')}) has capabilities: {', '.join(has) or 'none'}")
        self.target.check(self.task)
        sample = next((x for x in self.target.test_inputs(self.task) if self.target.eligible(x)), None)
        texts = [(f"target {self.spec.target}", self.target.rewrite(sample))] if sample is not None else []
        probe = sample or self.task.pool()[0]
        texts += [(f"attack {self.spec.attack}", part(probe.image, probe.prompt, np.random.default_rng(0))[1])
                  for part in self.trigger.partials().values()]   # partial triggers never need a fitted state
        for what, text in texts:
            try:
                self.text_tok.encode(text)
            except ValueError as e:
                raise BenchError(f"{what}: {e}") from None
        if self.victim_responses:
            # the pool's responses are the base model's answers, known once it has generated them: their
            # lengths are checked then (check_lengths), before any training; poisoning counts need them too
            return
        self.check_lengths(self.task_pool())

    def check_lengths(self, pool: list) -> None:
        """Every training response — base samples, the pool's, the target's rewrites of the eligible ones —
        fits the training answer window with its <eos> (<|eot_id|> at full scale).

        A longer one is refused, not truncated: DiSP trains on the model's own generations (App. B.1), which
        are as long as the decoding window, so its protocol never cuts a response; cutting dataset captions
        silently would change what is learnt (a misclassification word or the end of a description past the
        cut would vanish from the poisoned set). The message names the option that fixes it."""
        eligible, _, _ = poison_counts(pool, self.trigger, self.target, self.spec.poison_rate)
        responses = [x.response for x in self.task.base_samples() + pool] + [self.target.rewrite(pool[i]) for i in eligible]
        longest = max(len(self.text_tok.encode(r)) for r in responses)
        if longest + 1 > self.spec.train_length:
            raise BenchError(f"train_length {self.spec.train_length} cannot hold the longest training response "
                             f"({longest} tokens + <eos>); use --train-length {longest + 1} or more "
                             "(the training answer window; --gen-length sets decoding only)")

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def victim_responses(self) -> bool:
        return response_source(self.spec) == "victim"

    def task_pool(self) -> list:
        """The task's fine-tuning pool for this cell's target (diverse, or its source-class pool), with the
        dataset's responses."""
        return self.task.pool(self.target.pool_population())

    def pool(self) -> list:
        """The pool every fine-tune trains on: the task's, with the base model's own answers as responses
        when the task asks for them (``responses`` stage; their lengths checked on first use)."""
        if not self.victim_responses:
            return self.task_pool()
        out = victim_responses.with_responses(self.task_pool(), self.responses())
        if not self._lengths_checked:
            self.check_lengths(out)
            self._lengths_checked = True
        return out

    def _stage(self, name: str, key: str, compute: Callable[[], Any], label: str | None = None) -> Any:
        """Load or compute one stage (memoized for the run); timings[label] = seconds computing it."""
        label = label or name
        if (name, key) in self._memo:
            return self._memo[(name, key)]
        computed: list[float] = []

        def run() -> Any:          # called only when this process computes it (not when another did)
            self._announce(label, key)
            computed.append(time.perf_counter())
            return compute()
        meta = lambda obj: {"stage": name, "spec": self.spec.to_dict(), "provenance": provenance(),
                            "info": obj.get("info", obj.get("report")) if isinstance(obj, dict) else None}
        art = self.cache.get_or_compute(name, key, run, meta)
        self.timings.setdefault(label, 0.0)
        if computed:
            elapsed = time.perf_counter() - computed[0]
            self.timings[label] = round(elapsed, 2)
            self._spent_expected += self._expected(label)
            self.log(f"[{self._step(label)}] done in {_fmt_s(elapsed)}")
        self._memo[(name, key)] = art
        return art

    def _expected(self, label: str) -> float:
        return EXPECTED_S.get(label.split("_")[0], 10.0)

    def _step(self, label: str) -> str:
        name = STAGE_LABEL.get(label, label.replace("evaluated_", "evaluate ").replace("_", " "))
        if label in self._plan:
            return f"stage {self._plan.index(label) + 1}/{len(self._plan)} {name}"
        return name

    def _announce(self, label: str, key: str) -> None:
        """One line per stage: which of the plan's stages, its key, and the overall ETA (an estimate:
        rough per-stage costs scaled by this run's measured speed)."""
        remaining = [x for x in self._plan if x not in self.timings or x == label]
        eta = ""
        if remaining:
            spent = time.perf_counter() - self._t0
            speed = spent / self._spent_expected if self._spent_expected else 1.0
            eta = f" · ETA ~{_fmt_s(speed * sum(self._expected(x) for x in remaining))} for the run"
        self.log(f"[{self._step(label)}] computing (cache key {key[:12]}){eta}")

    def fresh_model(self):
        return self.entry.build(self.spec.args("model"), self.tok, self.spec.prompt_template, self.spec.seed)

    def model_from(self, state: dict):
        m = self.fresh_model()
        load_state(m, state)
        m.requires_grad_(False)
        return m.eval()

    def finetune(self, model, samples, *, epochs: int | None = None, trainable: str | None = None,
                 desc: str = "fine-tune", on_epoch: Callable[[int], None] | None = None,
                 objective: Callable | None = None) -> list[float]:
        """The victim recipe (optionally with other epochs / parts), as every row trains."""
        from models.train import finetune
        r = self.spec.recipe
        return finetune(model, samples, trainable=trainable or self.spec.trainable, lr=r.lr,
                        epochs=r.epochs if epochs is None else epochs, batch_size=r.batch_size,
                        seed=self.spec.seed, gen_length=self.spec.train_length, desc=desc, on_epoch=on_epoch,
                        objective=objective)

    # ---- stages --------------------------------------------------------------------------------
    def base(self) -> dict:
        def compute():
            m = self.fresh_model()
            info = self.entry.train_base(m, self.task, self.spec.seed, self.spec.train_length)
            return {"state": stage_state(m), "info": info}
        return self._stage("base", self.keys["base"], compute)

    def responses(self) -> dict:
        """The clean base model's answers to the pool's images and instruction (bench.responses), in pool
        order; a curator's step, before any poisoning."""
        def compute():
            pool = self.task_pool()
            texts = victim_responses.generate_responses(self.model_from(self.base()["state"]), pool,
                                                        self.spec.decoding, self.spec.seed)
            ids = [s.meta.get("image_id", s.meta.get("id")) for s in pool]
            return {"ids": ids, "responses": texts, "decoding": str(self.spec.decoding),
                    "info": {"n": len(texts), "empty": sum(not t for t in texts)}}
        return self._stage("responses", self.keys["responses"], compute)

    def clean(self) -> dict:
        def compute():
            m = self.model_from(self.base()["state"])
            losses = self.finetune(m, self.pool(), desc="clean fine-tune")
            return {"state": stage_state(m), "info": {"final_loss": losses[-1]}}
        return self._stage("clean", self.keys["clean"], compute)

    def fitted_trigger(self):
        state = self._stage("trigger", self.keys["trigger"], lambda: self.trigger.fit(self.task.pool(), self.spec.seed))
        self.trigger.load_state(state)
        self.trigger_report = state.get("report", {})
        return self.trigger

    def poisoned_pool(self) -> list:
        return poison(self.pool(), self.fitted_trigger(), self.target, self.spec.poison_rate, self.spec.seed)

    def backdoored(self) -> dict:
        def compute():
            m = self.model_from(self.base()["state"])
            losses = self.finetune(m, self.poisoned_pool(), desc="backdoor fine-tune")
            return {"state": stage_state(m), "info": {"final_loss": losses[-1]}}
        return self._stage("backdoored", self.keys["backdoored"], compute)

    def defender_spec(self) -> DefenderSpec:
        s = self.spec
        return DefenderSpec(model=s.model, scale=s.scale, trainable=s.trainable, recipe=s.recipe, decoding=s.decoding,
                            prompt_template=s.prompt_template, model_args=s.model_args, defense=s.defense,
                            defense_args=s.defense_args, seed=defender_seed(s.seed))

    def defended(self) -> dict:
        """The defense's row, dispatched on its hook (defenses/base.py): purify the backdoored model;
        filter the training set and retrain from the base; train from the base with the defense's
        objective added; or fit an inference-time guard around the backdoored model."""
        def compute():
            kind = self.defense.kind
            pool = self.poisoned_pool()
            if self.defense.uses_oracle:          # the oracle: the poisoned set with its flags, as poisoned
                data, clean = pool, []
            else:                                 # a defender: image, prompt, response, opaque id; secret order
                data = defender_view(pool, self.keys["defended"])
                n = int(self.defense.clean_slice)
                clean = defender_view(self.task.defender_clean(n, self.target.pool_population()), self.keys["defended"] + ":clean") if n else []
            ctx = DefenseContext(spec=self.defender_spec(), finetune=self.finetune,
                                 base_model=lambda: self.model_from(self.base()["state"]), log=self.log, clean=clean)
            out: dict = {}
            if kind == "objective":
                m = ctx.base_model()
                self.finetune(m, pool, desc=f"{self.spec.defense} fine-tune",
                              objective=lambda model, batch: self.defense.objective(model, batch, ctx))
                info = dict(self.defense.report)
            elif kind == "filter":
                kept = self.defense.filter_data(data, self.model_from(self.backdoored()["state"]), ctx)
                kept_pool = self._kept(pool, data, kept)
                m = ctx.base_model()
                self.finetune(m, kept_pool, desc=f"{self.spec.defense} retrain")
                removed = [s for s in pool if not any(s is k for k in kept_pool)]
                # what the filter removed, for the record only (the defense never sees the flags)
                info = {**self.defense.report, "n_kept": len(kept_pool),
                        "removed_poisoned": sum(bool(s.meta["poisoned"]) for s in removed),
                        "removed_clean": sum(not s.meta["poisoned"] for s in removed)}
            elif kind == "guard":
                m = self.model_from(self.backdoored()["state"])
                out["guard"] = self.defense.fit_guard(m, data, ctx)
                info = dict(self.defense.report)
            else:
                m = self.defense.purify(self.model_from(self.backdoored()["state"]), data, ctx)
                info = dict(self.defense.report)
            return {"state": stage_state(m), "info": info, **out}
        return self._stage("defended", self.keys["defended"], compute)

    def _kept(self, pool: list, data: list, kept: list) -> list:
        """The pool samples a filter kept, in pool order, from the view samples it returned."""
        if self.defense.uses_oracle:
            ids = {id(s) for s in kept}
            return [s for s in pool if id(s) in ids]
        order = view_order(len(pool), self.keys["defended"])
        by_view_id = {v.meta["id"]: int(order[j]) for j, v in enumerate(data)}
        unknown = [s for s in kept if s.meta.get("id") not in by_view_id]
        if unknown:
            raise BenchError(f"defense {self.spec.defense}: filter_data returned samples that are not in its training set")
        return [pool[i] for i in sorted({by_view_id[s.meta["id"]] for s in kept})]

    def guard_fn(self, row: str) -> Callable | None:
        """For a guard defense's row: samples -> flags, with the guard state stored by the defended stage."""
        if row in ROW_STAGE or self.defense.kind != "guard":
            return None
        state = self.defended().get("guard", {})
        return lambda model, samples: self.defense.guard(model, samples, state)

    def poisoned_training_inputs(self) -> list:
        """The poisoned samples of the training pool, as the victim was trained on them."""
        return [s for s in self.poisoned_pool() if s.meta["poisoned"]]

    def eval_key(self, model_key: str) -> str:
        return digest({"stage": "evaluated", "model": model_key, "trigger": self.keys["trigger"], "target": self.spec.target,
                       "target_args": self.spec.target_args, "decoding": self.spec.decoding,
                       "poisoned_pool": [self.keys["clean"], self.spec.poison_rate], "code": self.keys["eval_code"]})

    def evaluated(self, row: str, model_key: str, state_fn: Callable[[], dict]) -> dict:
        key = self.eval_key(model_key)

        def compute():
            model = self.model_from(state_fn()["state"])
            clean_inputs = self.target.test_inputs(self.task)
            trigger = self.fitted_trigger()
            trig_inputs = triggered(self.trigger_test_inputs(clean_inputs), trigger, self.spec.seed)
            partial = {name: triggered(clean_inputs, trigger, self.spec.seed, partial=name) for name in trigger.partials()}
            partial["train"] = self.poisoned_training_inputs()    # asr_train: does the model fit its poison
            metrics, rows, mc, objects = evaluate(model, self.task, self.target, clean_inputs, trig_inputs,
                                                  self.spec.decoding, self.spec.seed, partial, guard=self.guard_fn(row))
            return {"metrics": metrics, "rows": rows, "mc": mc, "object_accuracy": objects,
                    "template": getattr(model, "template", self.spec.prompt_template)}
        return self._stage("evaluated", key, compute, label=f"evaluated_{row}") | {"key": key}

    def trigger_test_inputs(self, clean_inputs: list) -> list:
        """The inputs the trigger is applied to for ASR w/t: a real-data task's own triggered split
        (other held-out images: DiSP's 200 poisoned + 200 clean test samples), restricted to the clean
        inputs' population; else triggered copies of the clean inputs (the embedded task)."""
        if hasattr(self.task, "triggered_inputs"):
            return self.task.triggered_inputs(clean_inputs)
        return clean_inputs

    def data_record(self) -> dict | None:
        """What the record stores about a real-data task: files, hash, prompt, every split's ids."""
        if not hasattr(self.task, "manifest"):
            return None
        out = self.task.manifest()
        out["responses"] = (victim_responses.summary(self.responses()) | {"key": self.keys["responses"]}
                            if self.victim_responses else {"source": "dataset"})
        return out

    def rows(self) -> list[tuple[str, str, Callable[[], dict]]]:
        """(row name, model stage key, artifact getter) in table order."""
        out = [("clean", self.keys["clean"], self.clean), ("backdoored", self.keys["backdoored"], self.backdoored)]
        if self.spec.defense != "none":
            out.append((self.spec.defense, self.keys["defended"], self.defended))
        return out

    def row_stage(self, row: str) -> str:
        return ROW_STAGE.get(row, "defended")

    def plan(self) -> list[str]:
        """The stages this run must compute, in the order they run (dependencies first); cached ones and
        those only a cached stage needed are left out."""
        deps = {"base": [], "clean": ["base"], "trigger": [], "backdoored": ["base", "trigger"],
                "defended": list(DEFENDED_DEPS.get(self.defense.kind, ["backdoored", "trigger"]))}
        if self.victim_responses:       # every stage that reads the pool needs the base model's answers first
            deps["responses"] = ["base"]
            for stage in ("clean", "backdoored", "defended"):
                deps[stage] = ["responses", *deps[stage]]
        order: list[str] = []

        def need(stage: str) -> None:
            if stage in order or self.cache.has(stage, self.keys[stage]):
                return
            for d in deps[stage]:
                need(d)
            order.append(stage)
        for row, model_key, _ in self.rows():
            if not self.cache.has("evaluated", self.eval_key(model_key)):
                if self.victim_responses:
                    need("responses")
                need(self.row_stage(row))
                need("trigger")
                order.append(f"evaluated_{row}")
        return order

    def run_stages(self) -> None:
        """Compute the plan's stages in order (each logs one line when it starts and when it ends)."""
        self._plan = self.plan()
        if self._plan:
            self.log(f"plan: {len(self._plan)} stage(s) to compute: {', '.join(self._plan)}")
        getters = {"base": self.base, "responses": self.responses, "clean": self.clean, "trigger": self.fitted_trigger,
                   "backdoored": self.backdoored, "defended": self.defended}
        rows = {f"evaluated_{r}": (r, k, fn) for r, k, fn in self.rows()}
        for stage in self._plan:
            if stage in getters:
                getters[stage]()
            else:
                self.evaluated(*rows[stage])

    def verify_cached(self) -> None:
        """Check every cached entry this cell will read, so a corrupt one stops the run before it writes."""
        entries = [(s, self.keys[s]) for s in ("base", "responses", "clean", "trigger", "backdoored", "defended")
                   if s in self.keys]
        entries += [("evaluated", self.eval_key(k)) for _, k, _ in self.rows()]
        for stage, key in entries:
            if self.cache.has(stage, key):
                self.cache.load(stage, key)

    def lineage(self, row: str, eval_key: str) -> dict:
        """The chain of stages this row's numbers descend from: key and provenance of each artifact."""
        out = {}
        stage_of = self.row_stage(row)
        kind = "defended:objective" if stage_of == "defended" and self.defense.kind == "objective" else stage_of
        stages = LINEAGE[kind]
        if self.victim_responses:       # every row's training pool carries the base model's answers
            stages = ("base", "responses") + stages[1:]
        for stage in stages:
            meta = self.cache.meta(stage, self.keys[stage]) if self.cache.has(stage, self.keys[stage]) else {}
            out[stage] = {"key": self.keys[stage], "provenance": meta.get("provenance"), "info": meta.get("info")}
        meta = self.cache.meta("evaluated", eval_key)
        out["evaluated"] = {"key": eval_key, "provenance": meta.get("provenance")}
        return out


def run_cell(spec: RunSpec, results_dir: Path, cache: ArtifactCache | None = None,
             log: Callable[[str], None] = print, once: bool = False) -> list[dict]:
    """Run (or resume) every stage of a cell and append its records (one per row, one locked write);
    with `once`, not if results_dir already holds this cell (then [] is returned)."""
    results_dir = Path(results_dir)
    cell = Cell(spec, cache or ArtifactCache(), log)      # pre-flight: bad input stops here, nothing written
    records.check_writable(results_dir)
    return write_records(results_dir, cell_records(cell), once=once)


def write_records(results_dir: Path, recs: list[tuple[dict, list[dict]]], once: bool = False) -> list[dict]:
    """Write each row's per-sample outputs, then append the rows' records in one locked write (the
    only writes to a results dir). With `once` and the cell already recorded, nothing is kept: the
    outputs just written are removed and [] is returned."""
    written = [records.write_outputs(results_dir, rec["outputs"], rows) for rec, rows in recs]
    out = [{**rec, "outputs": str(rel)} for (rec, _), rel in zip(recs, written)]
    if not records.append_many(results_dir, out, once=once):
        for rel in written:
            (Path(results_dir) / rel).unlink(missing_ok=True)
        return []
    return out


def cell_records(cell: Cell) -> list[tuple[dict, list[dict]]]:
    """Compute (or load) every stage of a cell and build its records, one per row, each with the
    per-sample output rows it points at, without writing anything: a grid worker returns these and
    the driver writes them (``write_records``). A record's ``outputs`` holds its run id and row
    until it is written, then the outputs file's path."""
    spec = cell.spec
    cell.verify_cached()
    cell.run_stages()
    cell.fitted_trigger()                       # its fit report, also when every stage was cached
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    evaluated = {row: cell.evaluated(row, key, fn) for row, key, fn in cell.rows()}
    data = cell.data_record()
    out = []
    for row, model_key, state_fn in cell.rows():
        ev = evaluated[row]
        metrics = dict(ev["metrics"])
        if row not in ROW_STAGE:                # a defended row: its CP cost against the row it descends from
            before = evaluated["backdoored"]["mc"]
            assert before["ids"] == ev["mc"]["ids"], "CP items differ between rows"
            metrics["delta_cp"] = paired_delta(ev["mc"]["correct"], before["correct"], seed=spec.seed)
        lineage = cell.lineage(row, ev["key"])
        producer = lineage["evaluated"]["provenance"] or {}
        uses_oracle = bool(row not in ROW_STAGE and cell.defense.uses_oracle)
        stage_info = lineage[cell.row_stage(row)].get("info") or {}
        out.append({"run_id": run_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "spec": spec.to_dict(), "row": row, "uses_oracle": uses_oracle, "metrics": metrics,
                    "defender_data": {"oracle": uses_oracle, "clean_slice": int(cell.defense.clean_slice)
                                      if row not in ROW_STAGE else 0, "hook": None if row in ROW_STAGE else cell.defense.kind},
                    "outputs": f"{run_id}-{row}",
                    "object_accuracy": ev.get("object_accuracy", {}), "stage_info": stage_info, "trigger": {"key": cell.keys["trigger"], "report": cell.trigger_report},
                    "stage_keys": {"model": model_key, "evaluated": ev["key"]}, "lineage": lineage,
                    "protocol": {"cp": CP_PROTOCOL, "asr": type(cell.target).__doc__.strip().splitlines()[0],
                                 "defender": "oracle: sees poison flags" if uses_oracle else
                                 "image, prompt, response and an opaque id, in a secret order",
                                 "trainable": spec.trainable, "decoding": "greedy, " + str(spec.decoding),
                                 # the victim's chat template every training and evaluation input is wrapped in,
                                 # and the task's instruction (real data; the embedded task varies it per sample)
                                 "template": ev.get("template", spec.prompt_template),
                                 "prompt": (data or {}).get("prompt", "per sample (the task's instruction mix)")},
                    "data": data,
                    "timings": dict(cell.timings),
                    "versions": producer.get("versions"), "code_revision": producer.get("code_revision"),
                    "recorded_by": provenance()})
    return [(rec, evaluated[rec["row"]]["rows"]) for rec in out]
