"""The protocol's guarantees, on the real pipeline at a reduced size: what a defender is handed carries
nothing that separates poisoned from clean samples; an oracle row is marked; warm runs carry the
provenance and fit report of the artifacts they used; cache keys cover every module a stage imports."""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from attacks.base import Trigger
from bench import records, tables
from bench.cache import ArtifactCache
from bench.pipeline import Cell, make_spec, run_cell, stage_keys
from core import registry
from defenses.base import Defense, DefenderSpec
from tasks.synthetic import SyntheticTask

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

SMALL_MODEL = dict(enc_dim=32, enc_layers=2, enc_heads=2, d_model=48, n_layers=2, n_heads=2, mlp_hidden=96,
                   mim_epochs=1, base_epochs=1)
SMALL_TASK = dict(n_base=100, n_pool=400, n_test=8, n_mc=16, n_encoder=100)
SMALL = dict(model_args=SMALL_MODEL, task_args=SMALL_TASK, recipe={"epochs": 1}, decoding={"steps": 4})
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def extra_registry(monkeypatch):
    """A registry copy this test may add entries to."""
    registry.load_all()
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    return registry


# ---- the adversarial defense -----------------------------------------------------------------------
def _image_key(image) -> bytes:
    return np.ascontiguousarray(image, dtype=np.float32).tobytes()


def cheat_scores(data, spec, task_args: dict) -> dict[str, np.ndarray]:
    """Every route a cheating defense could take to find the poisoned samples without looking at what a
    real defender has; one suspicion score per sample and route (higher = more suspect)."""
    n = len(data)
    scores = {"meta_keys": np.array([len(s.meta) for s in data], dtype=float),
              "meta_values": np.array([sum(bool(v) for k, v in s.meta.items() if k != "id") for s in data], float),
              "id": np.array([int(str(s.meta.get("id", "0")).encode().hex()[-8:], 16) for s in data], float),
              "order": np.arange(n, dtype=float),
              # a response that is none of the sample's own reference captions / not its MC answer
              "own_references": np.array([s.response not in s.meta.get("references", [s.response]) or
                                          s.response != s.meta.get("answer", s.response) for s in data], float)}
    # regenerate the task from the seed the defender is handed: samples whose image is not in the clean
    # pool would be the poisoned ones (responses are no route: an unusual response is what a real
    # defender may legitimately notice, and templated captions repeat across seeds anyway)
    pool = SyntheticTask(seed=spec.seed, **task_args).pool()
    clean_images = {_image_key(s.image) for s in pool}
    scores["regenerated_images"] = np.array([_image_key(s.image) not in clean_images for s in data], float)
    scores["spec_fields"] = np.full(n, float(len(set(dataclasses.asdict(spec)) & FORBIDDEN)))
    return scores


FORBIDDEN = {"attack", "attack_args", "target", "target_args", "poison_rate", "task", "task_args"}


@dataclass(frozen=True)
class _NoConfig:
    pass


class Cheater(Defense):
    """Tries every route (test-only)."""

    Config = _NoConfig
    clean_slice = 12
    seen: dict = {}

    def purify(self, model, data, ctx):
        Cheater.seen = {"data": list(data), "spec": ctx.spec, "clean": list(ctx.clean),
                        "scores": cheat_scores(data, ctx.spec, SMALL_TASK)}
        self.report = {"n_train": len(data)}
        return model


class Oracle(Defense):
    """Sees the poison flags (test-only)."""

    Config = _NoConfig
    uses_oracle = True
    saw_flags = None

    def purify(self, model, data, ctx):
        Oracle.saw_flags = sum(bool(s.meta.get("poisoned")) for s in data)
        return model


def test_a_defender_finds_nothing_but_images_prompts_and_responses(tmp_path, cache, extra_registry):
    extra_registry.register("defenses", "cheater")(Cheater)
    spec = make_spec(defense="cheater", seed=3, **SMALL)
    run_cell(spec, tmp_path / "res", cache, log=lambda _: None)
    seen = Cheater.seen
    data, dspec = seen["data"], seen["spec"]
    assert isinstance(dspec, DefenderSpec) and not set(dataclasses.asdict(dspec)) & FORBIDDEN
    assert dspec.seed != spec.seed
    assert all(set(s.meta) == {"id"} for s in data + seen["clean"])
    assert len(seen["clean"]) == Cheater.clean_slice

    # the truth, matched by image (which a defender legitimately sees)
    poisoned = Cell(spec, cache, log=lambda _: None).poisoned_pool()
    truth = {_image_key(s.image): bool(s.meta["poisoned"]) for s in poisoned}
    y = np.array([truth[_image_key(s.image)] for s in data])
    assert y.sum() == 80 and len(y) == 400
    for route, score in seen["scores"].items():
        auc = roc_auc_score(y, score) if len(set(score)) > 1 else 0.5
        assert abs(auc - 0.5) < 0.15, f"route {route!r} separates poisoned samples (AUC {auc:.2f})"

    # the same routes on what the pipeline used to hand a defender (the poisoned pool minus its flags)
    # do find the poison: the test can fail
    leaky = [s.with_(meta={k: v for k, v in s.meta.items() if k not in ("poisoned", "cross")}) for s in poisoned]
    leaked = cheat_scores(leaky, dataclasses.replace(dspec, seed=spec.seed), SMALL_TASK)
    y_leaky = np.array([s.meta["poisoned"] for s in poisoned])
    assert roc_auc_score(y_leaky, leaked["regenerated_images"]) == 1.0
    assert roc_auc_score(y_leaky, leaked["own_references"]) > 0.85   # captions and MC items: 80% of the pool

    # the held-out clean slice is disjoint from the pool and the test inputs
    task = SyntheticTask(seed=3, **SMALL_TASK)
    used = {_image_key(s.image) for s in task.pool() + task.test() + task.mc()}
    assert not any(_image_key(s.image) in used for s in seen["clean"])


def test_an_oracle_row_is_marked_in_records_and_tables(tmp_path, cache, extra_registry):
    extra_registry.register("defenses", "oracle-test")(Oracle)
    recs = run_cell(make_spec(defense="oracle-test", seed=3, **SMALL), tmp_path / "res", cache, log=lambda _: None)
    assert Oracle.saw_flags == 80
    assert [r["uses_oracle"] for r in recs] == [False, False, True]
    assert "oracle" in recs[-1]["protocol"]["defender"]
    table = tables.to_markdown(tables.table1(recs, "llada-v", "badnets", ["insertion"]))
    assert "oracle-test (oracle)" in table


# ---- provenance on warm runs --------------------------------------------------------------------------
@dataclass(frozen=True)
class _FitConfig:
    size: int = 8


class FittedPatch(Trigger):
    """A patch whose value is 'fitted' (test-only learned trigger with a fit report)."""

    Config = _FitConfig

    def fit(self, samples, seed):
        return {"value": 0.0, "report": {"fitted_on": len(samples)}}

    def load_state(self, state):
        self.value = state["value"]

    def apply(self, image, prompt, rng):
        out = np.array(image)
        out[:self.cfg.size, :self.cfg.size] = self.value
        return out, prompt


def test_a_warm_run_carries_the_provenance_and_fit_report_of_what_it_used(tmp_path, cache, extra_registry):
    extra_registry.register("attacks", "fitted-patch")(FittedPatch)
    spec = make_spec(attack="fitted-patch", defense="none", seed=3, **SMALL)
    cold = run_cell(spec, tmp_path / "res", cache, log=lambda _: None)
    warm = run_cell(spec, tmp_path / "res", cache, log=lambda _: None)
    assert all(v == 0.0 for r in warm for v in r["timings"].values())      # nothing recomputed
    for c, w in zip(cold, warm):
        assert w["trigger"]["report"] == {"fitted_on": 400} == c["trigger"]["report"]
        assert w["lineage"] == c["lineage"]                                   # same artifacts, same producers
        assert w["versions"] == c["versions"] and w["code_revision"] == c["code_revision"]
        for stage, entry in w["lineage"].items():
            prov = entry["provenance"]
            assert prov["versions"]["torch_threads"] >= 1 and prov["code_revision"] and prov["produced"]
            assert entry["key"] == cache.meta(stage, entry["key"])["key"]
    assert set(warm[0]["lineage"]) == {"base", "clean", "trigger", "evaluated"}
    assert set(warm[1]["lineage"]) == {"base", "trigger", "backdoored", "evaluated"}
    assert warm[0]["run_id"] == warm[1]["run_id"] != cold[0]["run_id"]     # one run, one id
    # one truth per cell: the rerun does not double anything in a table
    recs = records.load(tmp_path / "res")
    assert len(recs) == 4
    assert len(tables.table1(recs, "llada-v", "fitted-patch", ["insertion"])) == 2


# ---- cache keys cover the code a stage imports -------------------------------------------------------
def _copy_repo(dest: Path) -> Path:
    for pkg in ("core", "tasks", "attacks", "models", "defenses", "bench"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


ATTACKS = ("badnets", "badnets-classic", "noise", "multi", "blended", "lowfreq", "wanet", "inputaware", "dualkey")


def _all_keys(root: Path, **kw) -> dict[str, dict[str, str]]:
    return {a: stage_keys(make_spec(attack=a, **kw), root=root) for a in ATTACKS}


@pytest.mark.parametrize("helper, dependents", [
    ("attacks/badnets.py", {"badnets", "badnets-classic", "noise", "multi", "dualkey"}),
    ("attacks/surrogate.py", {"lowfreq", "inputaware"}),
])
def test_editing_a_helper_moves_every_dependent_key_and_no_other(tmp_path, helper, dependents):
    root = _copy_repo(tmp_path)
    before = _all_keys(root)
    with open(root / helper, "a") as f:
        f.write("\n_AN_EDIT = 1\n")
    after = _all_keys(root)
    for a in ATTACKS:
        for stage in ("task", "base", "clean"):
            assert after[a][stage] == before[a][stage], (a, stage)
        moved = a in dependents
        for stage in ("trigger", "backdoored", "defended"):
            assert (after[a][stage] != before[a][stage]) == moved, (a, stage, helper)


def test_editing_the_training_loop_moves_base_and_clean_not_the_trigger(tmp_path):
    root = _copy_repo(tmp_path)
    before = stage_keys(make_spec(attack="lowfreq"), root=root)
    with open(root / "models/train.py", "a") as f:
        f.write("\n_AN_EDIT = 1\n")
    after = stage_keys(make_spec(attack="lowfreq"), root=root)
    assert after["base"] != before["base"] and after["clean"] != before["clean"]
    assert after["trigger"] == before["trigger"] and after["task"] == before["task"]


def test_the_training_window_defaults_to_gen_length_and_keys_what_it_trains():
    """--train-length unset means --gen-length (recorded resolved): the same keys as giving it explicitly;
    another window moves the tiny base and every fine-tune, not the task or the trigger."""
    plain = make_spec(attack="lowfreq")
    assert plain.recipe.train_length == plain.decoding.gen_length == plain.train_length == 32
    assert stage_keys(plain) == stage_keys(make_spec(attack="lowfreq", recipe={"train_length": 32}))
    wide = make_spec(attack="lowfreq", recipe={"train_length": 40})
    assert (wide.train_length, wide.decoding.gen_length) == (40, 32)
    a, b = stage_keys(plain), stage_keys(wide)
    assert a["task"] == b["task"] and a["trigger"] == b["trigger"]
    for stage in ("base", "clean", "backdoored", "defended"):
        assert a[stage] != b[stage], stage
    assert "responses" not in a                # the embedded task has no responses stage


def test_editing_comments_and_docstrings_moves_no_key(tmp_path):
    root = _copy_repo(tmp_path)
    before = _all_keys(root)
    path = root / "attacks/badnets.py"
    text = path.read_text()
    first = text.index('"""', 3) + 3             # the end of the module docstring
    path.write_text('"""Reworded."""' + text[first:] + "\n# a comment\n")
    assert _all_keys(root) == before


def test_the_trigger_does_not_depend_on_the_victim():
    a = stage_keys(make_spec(attack="lowfreq"))
    b = stage_keys(make_spec(attack="lowfreq", model_args={"d_model": 128}))
    assert a["trigger"] == b["trigger"] and a["base"] != b["base"]
