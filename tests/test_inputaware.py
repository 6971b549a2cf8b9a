"""InputAware trigger: config validation, a reduced real fit (report, criterion, state round trip),
determinism, input-specific patterns and masks, the apply / cross formulas."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from attacks.inputaware import InputAware, InputAwareConfig
from attacks.surrogate import to_tensor
from core.errors import BenchError
from tasks.synthetic import SyntheticTask

# A reduced fit: 16-px fit resolution, 300 images, the default 300 mask steps, few joint epochs. The
# ASR criterion is off (a few epochs do not install a backdoor); the density criterion is real, with
# the band x/÷ 3 ([0.0107, 0.096]) as before: one thread, float32, seeds 0-5 measured 0.028-0.041,
# float64 seeds 0 / 3 0.027 / 0.025, but two threads seed 0 0.075, outside the default x/÷ 2.
SMALL = dict(size=16, mask_steps=300, epochs=4, batch_size=32, mask_batch_size=32, min_asr=0.0, density_factor=3.0)
TINY = dict(size=16, mask_steps=2, epochs=1, batch_size=32, mask_batch_size=16, min_asr=0.0, density_factor=1000.0)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def pool():
    return SyntheticTask(seed=0, n_base=10, n_pool=300, n_test=10, n_mc=10, n_encoder=10).pool()


@pytest.fixture(scope="module")
def fitted(pool):
    trig = InputAware(**SMALL)
    state = trig.fit(pool, seed=0)
    return trig, state


def _rng():
    return np.random.default_rng(0)


# ---- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    {"target_class": "zebra"}, {"size": 20}, {"size": 4}, {"mask_density": 0.0}, {"mask_density": 1.5},
    {"lambda_norm": -1.0}, {"lambda_div": -0.1}, {"mask_steps": 0}, {"mask_steps": 2.5}, {"epochs": 0}, {"lr": 0.0},
    {"surrogate_lr": -1e-3}, {"p_attack": 0.0}, {"p_cross": -0.1}, {"p_attack": 0.6, "p_cross": 0.5},
    {"p_attack": 0.01, "batch_size": 32}, {"cross_ratio": -1.0}, {"holdout": 0.0}, {"holdout": 0.9},
    {"min_asr": 1.5}, {"density_factor": 1.0}, {"batch_size": 2}, {"mask_batch_size": 0},
])
def test_invalid_config_raises(bad):
    with pytest.raises(BenchError, match="inputaware"):
        InputAware(**bad)


def test_defaults_follow_the_spec():
    cfg = InputAwareConfig()
    assert (cfg.target_class, cfg.size, cfg.mask_density, cfg.lambda_norm, cfg.lambda_div, cfg.lr) == \
        ("boat", 32, 0.032, 100.0, 1.0, 0.01)
    assert cfg.p_attack == 0.1 and cfg.cross_ratio == 1.0


def test_n_cross_follows_cross_ratio():
    assert InputAware().n_cross(200) == 200
    assert InputAware(cross_ratio=0.5).n_cross(200) == 100
    assert InputAware(cross_ratio=0.0).n_cross(200) == 0


def test_apply_and_cross_before_fit_raise(pool):
    trig = InputAware(**TINY)
    img = pool[0].image
    with pytest.raises(BenchError, match="fit first"):
        trig.apply(img, "p", _rng())
    with pytest.raises(BenchError, match="fit first"):
        trig.cross(img, "p", _rng(), pool[1].image)


def test_fit_rejects_too_few_samples(pool):
    with pytest.raises(BenchError, match="samples"):
        InputAware(**TINY).fit(pool[:20], seed=0)


# ---- a reduced real fit ---------------------------------------------------------------------------
def test_fit_report_and_state_round_trip(pool, fitted):
    trig, state = fitted
    assert set(state) == {"G", "M", "report"}
    rep = state["report"]
    for key in ("mask_loss", "generator_loss", "diversity_loss", "mask_density", "surrogate_clean_acc",
                "surrogate_asr", "surrogate_cross_acc"):
        assert isinstance(rep[key], float) and np.isfinite(rep[key]), key
    assert rep["reached"] is True
    for key in ("surrogate_clean_acc", "surrogate_asr", "surrogate_cross_acc"):
        assert 0.0 <= rep[key] <= 1.0
    # the density criterion is enforced by fit: the reported density is inside the band
    cfg = trig.cfg
    assert cfg.mask_density / cfg.density_factor <= rep["mask_density"] <= cfg.mask_density * cfg.density_factor

    # through torch.save / torch.load, as the pipeline caches it, into a fresh instance
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = InputAware(**SMALL)
    fresh.load_state(torch.load(buf))
    img = pool[3].image
    keep = img.copy()
    out, prompt = fresh.apply(img, "describe the image", _rng())
    assert prompt == "describe the image"
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(img, keep)                     # input untouched (pool images are read-only)
    assert not np.array_equal(out, img)                  # the trigger changed something
    assert np.array_equal(out, trig.apply(img, "describe the image", _rng())[0])
    # no rng dependence: another generator gives the same output
    assert np.array_equal(out, fresh.apply(img, "x", np.random.default_rng(123))[0])


def test_mask_density_on_pool_images(pool, fitted):
    trig, _ = fitted
    _, masks = trig.pattern_and_mask(to_tensor([s.image for s in pool[:64]]))
    d = float(masks.mean())
    cfg = trig.cfg
    assert cfg.mask_density / cfg.density_factor <= d <= cfg.mask_density * cfg.density_factor
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0


def test_load_state_rejects_a_bad_state():
    with pytest.raises(BenchError, match="state"):
        InputAware(**TINY).load_state({"G": {}, "M": {}})


def test_fit_is_deterministic_for_a_seed(pool):
    a = InputAware(**TINY).fit(pool, seed=3)
    b = InputAware(**TINY).fit(pool, seed=3)
    c = InputAware(**TINY).fit(pool, seed=4)
    for net in ("G", "M"):
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])
        assert not all(torch.equal(a[net][k], c[net][k]) for k in a[net] if a[net][k].is_floating_point())
    assert a["report"] == b["report"]


# ---- input-aware triggers -------------------------------------------------------------------------
def test_pattern_and_mask_differ_between_inputs(pool, fitted):
    trig, _ = fitted
    x = to_tensor([pool[0].image, pool[1].image])
    assert not torch.equal(x[0], x[1])
    patterns, masks = trig.pattern_and_mask(x)
    assert patterns.shape == (2, 3, 64, 64) and masks.shape == (2, 1, 64, 64)
    assert float((patterns[0] - patterns[1]).abs().mean()) > 1e-3
    assert float((masks[0] - masks[1]).abs().mean()) > 1e-3
    # and so do the changes the trigger makes to each image
    d0 = trig.apply(pool[0].image, "p", _rng())[0] - pool[0].image
    d1 = trig.apply(pool[1].image, "p", _rng())[0] - pool[1].image
    assert not np.allclose(d0, d1)


def test_apply_is_x_plus_pattern_minus_x_times_mask(pool, fitted):
    trig, _ = fitted
    x = pool[5].image
    p, m = trig.pattern_and_mask(to_tensor([x]))
    p, m = p[0].permute(1, 2, 0).numpy(), m[0].permute(1, 2, 0).numpy()
    expected = np.clip(x + (p - x) * m, 0, 1)
    np.testing.assert_allclose(trig.apply(x, "p", _rng())[0], expected, atol=1e-6)


def test_cross_uses_the_partners_pattern_and_mask(pool, fitted):
    trig, _ = fitted
    x1, x2 = pool[6].image, pool[7].image
    p2, m2 = trig.pattern_and_mask(to_tensor([x2]))
    p2, m2 = p2[0].permute(1, 2, 0).numpy(), m2[0].permute(1, 2, 0).numpy()
    out, prompt = trig.cross(x1, "describe the image", _rng(), x2)
    assert prompt == "describe the image"
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out, np.clip(x1 + (p2 - x1) * m2, 0, 1), atol=1e-6)
    assert not np.allclose(out, trig.apply(x1, "describe the image", _rng())[0])
    # crossing an image with itself is the trigger itself
    np.testing.assert_array_equal(trig.cross(x1, "p", _rng(), x1)[0], trig.apply(x1, "p", _rng())[0])


# ---- the criterion --------------------------------------------------------------------------------
def test_unreachable_mask_density_raises(pool):
    # a band the fit cannot land in after one mask step (density 0.032 +/- 5%; one lr-0.01 step from the
    # sparse initialisation lands at 0.055 on this pool, seed 0): the fit must refuse, naming the numbers
    trig = InputAware(**{**TINY, "mask_steps": 1, "density_factor": 1.05})
    with pytest.raises(BenchError, match=r"mask density 0\.0\d+ not in \[0\.0305, 0\.0336\]"):
        trig.fit(pool, seed=0)


def test_missed_asr_raises(pool, monkeypatch):
    trig = InputAware(**{**TINY, "min_asr": 0.9})
    real = InputAware._evaluate

    def weak(self, *args):
        return {**real(self, *args), "surrogate_asr": 0.5}

    monkeypatch.setattr(InputAware, "_evaluate", weak)
    with pytest.raises(BenchError, match=r"surrogate ASR 0\.500 < min_asr 0\.9"):
        trig.fit(pool, seed=0)
    with pytest.raises(BenchError, match="fit first"):     # a failed fit leaves no trigger behind
        trig.apply(pool[0].image, "p", _rng())
