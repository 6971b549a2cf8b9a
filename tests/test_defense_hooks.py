"""The four defense hooks the pipeline dispatches (defenses/base.py), end to end on the reduced config:
purify (magnitude pruning), filter (random drop, the oracle), objective (a training-time term) and
guard (STRIP) — each row's model, key and lineage follow from its hook."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from bench.cache import ArtifactCache
from bench.pipeline import Cell, make_spec, run_cell
from core import registry
from defenses.base import Defense
from defenses.pruning import prune_matrix

SMALL_MODEL = dict(enc_dim=32, enc_layers=2, enc_heads=2, d_model=48, n_layers=2, n_heads=2, mlp_hidden=96,
                   mim_epochs=1, base_epochs=2)
SMALL_TASK = dict(n_base=200, n_pool=100, n_test=16, n_mc=24, n_encoder=200)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArtifactCache(tmp_path_factory.mktemp("cache"))


def spec(defense: str, **kw):
    return make_spec(defense=defense, model_args=SMALL_MODEL, task_args=SMALL_TASK, recipe={"epochs": 2},
                     decoding={"steps": 4}, **kw)


def run(defense, cache, tmp_path, **kw):
    recs = run_cell(spec(defense, **kw), tmp_path, cache, log=lambda _: None)
    return {r["row"]: r for r in recs}


def test_filter_retrains_from_the_base_on_what_it_keeps(cache, tmp_path):
    recs = run("random-drop", cache, tmp_path)
    info = recs["random-drop"]["stage_info"]
    assert info["dropped"] == 20 and info["n_kept"] == 80
    assert info["removed_poisoned"] + info["removed_clean"] == 20 and info["removed_poisoned"] <= 20
    lineage = recs["random-drop"]["lineage"]
    assert {"base", "trigger", "backdoored", "defended"} <= set(lineage)
    cell = Cell(spec("random-drop"), cache, log=lambda _: None)
    assert not torch.equal(cell.defended()["state"]["lm.lm_head.weight"], cell.backdoored()["state"]["lm.lm_head.weight"])


def test_oracle_removes_exactly_the_poison_and_is_marked(cache, tmp_path):
    recs = run("oracle-filter", cache, tmp_path)
    info = recs["oracle-filter"]["stage_info"]
    assert info["removed_poisoned"] == 20 and info["removed_clean"] == 0 and info["n_kept"] == 80
    assert recs["oracle-filter"]["uses_oracle"] is True and recs["backdoored"]["uses_oracle"] is False


def test_pruning_zeroes_the_smallest_weights_of_the_trained_parts(cache, tmp_path):
    w = torch.tensor([[0.5, -0.1, 2.0], [0.05, -3.0, 0.2]])
    assert prune_matrix(w, 0.5) == 3 and torch.equal(w == 0, torch.tensor([[False, True, False], [True, False, True]]))
    recs = run("pruning", cache, tmp_path)
    info = recs["pruning"]["stage_info"]
    assert info["parts"] == "projector+lm" and info["pruned"] == pytest.approx(0.3 * info["weights"], abs=50)
    state = Cell(spec("pruning"), cache, log=lambda _: None).defended()["state"]
    q = state["lm.layers.0.self_attn.q_proj.weight"]
    assert (q == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert (state["vision_tower.layers.0.mlp.0.weight"] == 0).sum() == 0         # the frozen encoder is untouched


def test_objective_trains_from_the_base_with_the_term_added(cache, tmp_path, monkeypatch):
    calls = []

    @dataclass(frozen=True)
    class NoArgs:
        weight: float = 0.0

    class Probe(Defense):
        """Adds weight x (mean visual embedding)^2 to the implant loss (a test objective)."""
        Config, kind = NoArgs, "objective"

        def objective(self, model, batch, ctx):
            calls.append(len(batch))
            return self.cfg.weight * model.visual_embeds(batch.images).pow(2).mean()

    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    registry.register("defenses", "probe-objective")(Probe)
    recs = run("probe-objective", cache, tmp_path)
    assert calls and sum(calls) == 2 * 100                       # every sample of both epochs went through it
    assert set(recs["probe-objective"]["lineage"]) == {"base", "trigger", "defended", "evaluated"}
    cell = Cell(spec("probe-objective"), cache, log=lambda _: None)
    assert cell.plan() == [] and "backdoored" not in [s for s in cell.plan()]
    # weight 0 adds nothing: the row's model is the backdoored model, retrained from the base the same way
    assert torch.equal(cell.defended()["state"]["lm.lm_head.weight"], cell.backdoored()["state"]["lm.lm_head.weight"])


def test_guard_abstains_and_reports_abstention_rates(cache, tmp_path):
    recs = run("strip", cache, tmp_path, defense_args={"n_overlay": 8})
    m = recs["strip"]["metrics"]
    for key in ("abstain_wo", "abstain_wt", "abstain_mc"):
        assert 0 <= m[key]["value"] <= 100
    assert "abstain_wo" not in recs["backdoored"]["metrics"]
    info = recs["strip"]["stage_info"]
    assert info["n_overlay"] == 8 and "threshold" in info
    rows = [json.loads(x) for x in (tmp_path / recs["strip"]["outputs"]).read_text().splitlines()]
    flagged = [r for r in rows if r.get("abstained")]
    assert all(r["output"] == "" and not r["verdicts"]["asr"] for r in flagged)
    n_clean = sum(1 for r in rows if r["triggered"] is False)
    assert m["abstain_wo"]["value"] == pytest.approx(100 * sum(1 for r in flagged if r["triggered"] is False) / n_clean)
    # the guarded model is the backdoored model itself
    cell = Cell(spec("strip", defense_args={"n_overlay": 8}), cache, log=lambda _: None)
    assert torch.equal(cell.defended()["state"]["lm.lm_head.weight"], cell.backdoored()["state"]["lm.lm_head.weight"])


# ---- cross-view regularization --------------------------------------------------------------------
def test_second_view_perturbs_one_small_patch():
    from defenses.crossview import OPS, perturb_patch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 64, 64, 3)
    y, boxes = perturb_patch(x, g)
    assert {op for *_, op in boxes} == set(OPS)
    for b, (r, c, side, op) in enumerate(boxes):
        assert round((0.01 * 64 * 64) ** 0.5) <= side <= round((0.05 * 64 * 64) ** 0.5)   # 1-5% of the area
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[r:r + side, c:c + side] = False
        assert torch.equal(y[b][outside], x[b][outside])
        inside = y[b, r:r + side, c:c + side]
        if op == "mask":
            assert (inside == 0).all()
        elif op == "shuffle":
            assert torch.equal(inside.reshape(-1, 3).sort(0).values, x[b, r:r + side, c:c + side].reshape(-1, 3).sort(0).values)


def test_crossview_terms_and_gradients(cache):
    from defenses.crossview import crossview_terms
    cell = Cell(spec("none"), cache, log=lambda _: None)
    model = cell.model_from(cell.base()["state"])
    model.set_trainable("projector+lm")
    batch = model.collate(cell.pool()[:6], gen_length=32)
    g = torch.Generator().manual_seed(0)
    same = crossview_terms(model, batch, batch.images, g, h0=0.5)
    assert same["patch"].item() == pytest.approx(0.0, abs=1e-8) and same["cv_dis"].item() == pytest.approx(1.0, abs=1e-5)
    other = crossview_terms(model, batch, torch.rand_like(batch.images), g, h0=0.5)
    assert other["patch"].item() > 0 and 0 <= other["cv_dis"].item() < 1 and other["ent"].item() >= 0
    (other["patch"] + other["cv_dis"] + other["ent"]).backward()
    assert model.mm_projector[0].weight.grad is not None and model.mm_projector[0].weight.grad.abs().sum() > 0


def test_crossview_row_trains_from_the_base(cache, tmp_path):
    recs = run("crossview", cache, tmp_path)
    info = recs["crossview"]["stage_info"]
    assert info["steps"] == 2 * 4 and all(k in info for k in ("mean_patch", "mean_cv_dis", "mean_ent"))
    assert set(recs["crossview"]["lineage"]) == {"base", "trigger", "defended", "evaluated"}
    assert recs["crossview"]["spec"]["defense_args"]["lambda2"] == 1.0


def test_entropy_filter_guard_fits_on_the_training_set(cache, tmp_path):
    recs = run("entropy-filter", cache, tmp_path)
    info = recs["entropy-filter"]["stage_info"]
    assert len(info["means"]) == 2 and isinstance(info["bimodal"], bool)
    assert "abstain_wt" in recs["entropy-filter"]["metrics"]
    if not info["bimodal"]:
        assert recs["entropy-filter"]["metrics"]["abstain_wo"]["value"] == 0.0


def test_fine_pruning_prunes_while_clean_accuracy_holds(cache, tmp_path):
    from defenses.fine_pruning import prune_neurons
    recs = run("fine-pruning", cache, tmp_path, defense_args={"clean_size": 20, "epochs": 1})
    info = recs["fine-pruning"]["stage_info"]
    assert 0 <= info["pruned_neurons"] <= info["layer_neurons"] == 96
    assert info["clean_acc_end"] >= 0
    state = Cell(spec("fine-pruning", defense_args={"clean_size": 20, "epochs": 1}), cache, log=lambda _: None).defended()["state"]
    down = state["lm.layers.1.mlp.down_proj.weight"]
    assert int((down.abs().sum(0) == 0).sum()) >= info["pruned_neurons"]      # pruned columns stay zero


def test_entropy_filter_flags_the_low_entropy_mode(monkeypatch):
    import numpy as np

    import defenses.entropy_filter as ef
    from defenses.base import DefenseContext
    rng = np.random.default_rng(0)
    scores = {"train": np.r_[rng.normal(3.0, 0.2, 80), rng.normal(0.3, 0.05, 20)],
              "test": np.array([3.1, 0.25, 2.8, 0.35])}
    monkeypatch.setattr(ef, "answer_entropy", lambda model, samples, gen, bs=200: scores[samples])
    ctx = DefenseContext(spec=Cell(spec("entropy-filter"), ArtifactCache("/nonexistent"), log=lambda _: None).defender_spec(),
                         finetune=None, base_model=None)
    d = ef.EntropyFilter()
    state = d.fit_guard(None, "train", ctx)
    assert state["bimodal"] and d.report["train_flagged"] == pytest.approx(0.2)
    assert d.guard(None, "test", state) == [False, True, False, True]
    scores["train"] = rng.normal(3.0, 0.2, 100)          # one mode: nothing is flagged
    state = d.fit_guard(None, "train", ctx)
    assert not state["bimodal"] and d.guard(None, "test", state) == [False] * 4


def test_image_attention_is_a_distribution_over_the_visual_tokens(cache):
    cell = Cell(spec("none"), cache, log=lambda _: None)
    model = cell.model_from(cell.base()["state"])
    batch = model.collate(cell.pool()[:3], with_response=False)
    a = model.image_attention(batch)
    assert a.shape == (3, 2, model.n_visual) and torch.allclose(a.sum(-1), torch.ones(3, 2), atol=1e-5)
    assert (a >= 0).all()


def test_bye_drops_the_low_entropy_cluster_of_sensitive_layers(monkeypatch, cache, tmp_path):
    import numpy as np

    import defenses.bye as bye
    from defenses.base import DefenseContext
    rng = np.random.default_rng(0)
    n, T = 50, 8
    # layer 0: uninformative; layer 1: ten samples attend to one token (low entropy)
    flat = np.full(T, 1.0 / T)
    peaked = np.r_[0.93, np.full(T - 1, 0.01)]
    att = np.stack([np.stack([flat + rng.normal(0, 1e-3, T), (peaked if i < 10 else flat) + rng.normal(0, 1e-3, T)])
                    for i in range(n)]).clip(1e-6)
    att /= att.sum(-1, keepdims=True)

    class Fake:
        def collate(self, samples, with_response=False):
            return samples

        def image_attention(self, batch, gen_length=32):
            return torch.tensor(att[batch[0]:batch[0] + len(batch)], dtype=torch.float32)
    ctx = DefenseContext(spec=Cell(spec("bye"), cache, log=lambda _: None).defender_spec(), finetune=None, base_model=None)
    d = bye.BYE()
    kept = d.filter_data(list(range(n)), Fake(), ctx)
    assert d.report["sensitive_layers"] == [1] and kept == list(range(10, n)) and d.report["dropped"] == 10
    recs = run("bye", cache, tmp_path)                        # end to end on the reduced config
    info = recs["bye"]["stage_info"]
    assert info["n_kept"] == 100 - info["dropped"] and info["removed_poisoned"] + info["removed_clean"] == info["dropped"]


def test_crossview_terms_by_hand():
    import math

    from defenses.crossview import l_cv_dis, l_ent, l_patch
    phi = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    phi2 = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert l_patch(phi, phi2).item() == pytest.approx((4.0 + 25.0) / 2)                 # (||(0,2)||^2 + ||(3,4)||^2) / B
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    p2 = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    omega = torch.tensor([[True, True]])
    assert l_cv_dis(p, p2, omega).item() == pytest.approx((0.0 + 1.0) / 2)              # orthogonal, identical
    assert l_cv_dis(p, p2, torch.tensor([[True, False]])).item() == pytest.approx(0.0)   # only Omega counts
    # H = 0 and ln 2 = 0.693; with H0 = 0.5 the hinge is 0.5 and 0
    assert l_ent(p, omega, 0.5).item() == pytest.approx(0.5 / 2, abs=1e-6)
    assert l_ent(p, omega, 1.0).item() == pytest.approx((1.0 + 1.0 - math.log(2)) / 2, abs=1e-6)


def test_strip_threshold_flags_the_stated_share_of_clean_inputs(monkeypatch):
    import numpy as np

    import defenses.strip as strip
    from defenses.base import DefenseContext
    from tasks.base import Sample
    clean = [Sample(np.full((4, 4, 3), i / 200, np.float32), "p", "r", {"id": str(i)}) for i in range(200)]
    # the entropy of clean input i under blending: i / 100 nats (so the 1% quantile sits near 0.02)
    monkeypatch.setattr(strip, "strip_entropy",
                        lambda model, samples, overlays, alpha, gen, bs=400: np.array([s.image[0, 0, 0] * 2 for s in samples]))
    ctx = DefenseContext(spec=Cell(spec("strip"), ArtifactCache("/nonexistent"), log=lambda _: None).defender_spec(),
                         finetune=None, base_model=None, clean=clean)
    d = strip.STRIP(n_overlay=200, frr=0.01)
    state = d.fit_guard(None, [], ctx)
    assert state["threshold"] == pytest.approx(np.quantile(np.arange(200) / 100, 0.01))
    flags = d.guard(None, clean, state)
    assert sum(flags) == 2                                     # 1% of 200 clean inputs fall below it
    assert d.guard(None, [Sample(np.zeros((4, 4, 3), np.float32), "p", "r", {})], state) == [True]
