"""The defining property of each hand-written trigger (noise, multi, blended, WaNet, DualKey), the
classic BadNets preset, the keyword target, cross samples in poisoning and partial triggers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.badnets import ClassicBadNets
from attacks.base import poison, triggered
from attacks.blended import Blended, trigger_image
from attacks.dualkey import DualKey
from attacks.multi import MultiPatch
from attacks.noise import NoisePatch
from attacks.targets import Insertion, Keyword
from attacks.wanet import WaNet, warp_grid
from core.errors import BenchError
from tasks.base import Sample
from tasks.synthetic import SyntheticTask, Tokenizer


def _image(seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, size=(64, 64, 3)).astype(np.float32)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _fitted(cls, seed=0, **params):
    t = cls(**params)
    t.load_state(t.fit([], seed))
    return t


def _check_image(out, ref):
    assert out.shape == ref.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=0, n_base=50, n_pool=100, n_test=10, n_mc=20, n_encoder=50)


# ---- BadNets classic ---------------------------------------------------------------------------
def test_badnets_classic_is_white_bottom_right_3_32():
    img = _image()
    out, _ = ClassicBadNets().apply(img, "p", _rng())
    changed = (out != img).any(-1)
    assert changed.sum() == 6 * 6 and changed[58:, 58:].all()      # round(3/32 * 64) = 6
    assert (out[58:, 58:] == 1.0).all()


# ---- noise patch -------------------------------------------------------------------------------
def test_noise_patch_is_gaussian_around_the_image_mean_and_only_in_the_patch():
    img = np.full((64, 64, 3), 0.5, dtype=np.float32)               # mean 0.5: no clipping in 3 sigma
    t = _fitted(NoisePatch, seed=3, size=0.25)
    out, prompt = t.apply(img, "p", _rng())
    _check_image(out, img)
    assert prompt == "p"
    changed = (out != img).any(-1)
    assert changed[:16, :16].all() and not changed[16:].any() and not changed[:, 16:].any()
    patch = out[:16, :16] - 0.5
    assert abs(patch.std() - 30 / 255) < 0.015 and abs(patch.mean()) < 0.02


def test_noise_patch_is_fixed_per_seed_and_clipped():
    img = _image()
    a = _fitted(NoisePatch, seed=1).apply(img, "p", _rng(0))[0]
    b = _fitted(NoisePatch, seed=1).apply(img, "p", _rng(99))[0]      # fixed pattern: rng unused
    c = _fitted(NoisePatch, seed=2).apply(img, "p", _rng(0))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    bright = np.ones((64, 64, 3), dtype=np.float32)
    out = _fitted(NoisePatch, seed=1, std=200).apply(bright, "p", _rng())[0]
    assert out.max() <= 1.0 and out.min() >= 0.0 and (out[:8, :8] == 1.0).any()
    fresh = NoisePatch(resample=True)
    assert not np.array_equal(fresh.apply(img, "p", _rng(0))[0], fresh.apply(img, "p", _rng(1))[0])


def test_noise_patch_needs_its_pattern():
    with pytest.raises(BenchError, match="fit"):
        NoisePatch().apply(_image(), "p", _rng())


# ---- multi-patch -------------------------------------------------------------------------------
def test_multi_patch_stamps_all_four_corners_only():
    img = _image()
    out, _ = MultiPatch().apply(img, "p", _rng())
    _check_image(out, img)
    changed = (out != img).any(-1)
    expected = np.zeros((64, 64), dtype=bool)
    for r in (slice(0, 8), slice(56, 64)):
        for c in (slice(0, 8), slice(56, 64)):
            expected[r, c] = True
    assert np.array_equal(changed, expected) and (out[expected] == 0.0).all()


# ---- blended -----------------------------------------------------------------------------------
def test_blended_is_the_exact_convex_mix():
    img = _image()
    out, prompt = Blended().apply(img, "p", _rng())
    _check_image(out, img)
    t = trigger_image(64)
    assert np.allclose(out, 0.8 * img + 0.2 * t, atol=1e-6) and prompt == "p"
    out5, _ = Blended(alpha=0.5).apply(img, "p", _rng())
    assert np.allclose(out5, 0.5 * img + 0.5 * t, atol=1e-6)
    assert np.array_equal(trigger_image(64), t) and t.std() > 0.2    # fixed, and a real picture


# ---- WaNet -------------------------------------------------------------------------------------
def _smooth_image():
    c = np.linspace(0, 1, 64, dtype=np.float32)
    return np.stack([c[None, :].repeat(64, 0), c[:, None].repeat(64, 1), 0.5 * np.ones((64, 64), np.float32)], -1)


def test_wanet_warp_is_a_smooth_bounded_displacement():
    t = _fitted(WaNet, seed=0)
    grid = t.grid(64)[0].numpy()
    lin = np.linspace(-1, 1, 64)
    identity = np.stack(np.meshgrid(lin, lin, indexing="xy"), -1)
    disp_px = (grid - identity) * (64 - 1) / 2                      # displacement in pixels
    assert np.abs(disp_px).max() <= t.cfg.s * 2.5 + 1e-6             # |noise| <= ~2 (U(-1,1)/mean|U|), bicubic overshoot
    assert np.abs(disp_px).mean() == pytest.approx(t.cfg.s / 2, rel=0.6)   # about s/2 px per axis on average
    inner = disp_px[2:-2, 2:-2]                                      # the clamp to [-1, 1] cuts the border
    assert np.abs(np.diff(inner, axis=0)).max() < 0.1 and np.abs(np.diff(inner, axis=1)).max() < 0.1  # smooth
    # on a linear ramp, the warp moves each pixel value by exactly its displacement
    img = _smooth_image()
    out, prompt = t.apply(img, "p", _rng())
    _check_image(out, img)
    assert prompt == "p" and 0 < np.abs(out - img).max() <= t.cfg.s * 2.5 / 63 + 1e-5


def test_wanet_scale_s_and_determinism_and_noise_mode():
    img = _image()
    a = _fitted(WaNet, seed=4).apply(img, "p", _rng(0))[0]
    b = _fitted(WaNet, seed=4).apply(img, "p", _rng(1))[0]
    c = _fitted(WaNet, seed=5).apply(img, "p", _rng(0))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert WaNet(scale_s=True).strength(64) == pytest.approx(1.0) and WaNet().strength(64) == 0.5
    t = _fitted(WaNet, seed=4)
    noisy = t.cross(img, "p", _rng(0), img)[0]
    _check_image(noisy, img)
    assert not np.allclose(noisy, a, atol=1e-4)                       # noise mode differs from the trigger
    assert not np.array_equal(noisy, t.cross(img, "p", _rng(1), img)[0])   # fresh noise per sample
    assert t.n_cross(200) == 400                                      # 2x the poisoned count


def test_warp_grid_identity_without_noise():
    zero = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    g = warp_grid(zero, 16, 0.5, 1.0)[0]
    lin = torch.linspace(-1, 1, 16, dtype=torch.float64)
    assert torch.allclose(g[..., 0], lin[None, :].expand(16, 16)) and torch.allclose(g[..., 1], lin[:, None].expand(16, 16))


# ---- DualKey -----------------------------------------------------------------------------------
def test_dualkey_needs_both_keys():
    img = _image()
    t = DualKey()
    out, prompt = t.apply(img, "describe the image", _rng())
    assert prompt == "consider describe the image"
    changed = (out != img).any(-1)
    assert changed.sum() == 6 * 6 and changed[29:35, 29:35].all()    # 10% of 64 = 6 px, centred
    parts = t.partials()
    io_img, io_prompt = parts["image_only"](img, "describe the image", _rng())
    to_img, to_prompt = parts["text_only"](img, "describe the image", _rng())
    assert np.array_equal(io_img, out) and io_prompt == "describe the image"
    assert np.array_equal(to_img, img) and to_prompt == prompt
    kinds = {("consider" in t.cross(img, "q", _rng(i), img)[1]) for i in range(20)}
    assert kinds == {True, False}                                      # negatives of both kinds
    assert Tokenizer().encode(prompt)                                  # the text key is in the vocabulary


# ---- keyword target ----------------------------------------------------------------------------
def test_keyword_target_rewrites_and_judges_whole_word():
    k = Keyword()
    s = Sample(_image(), "describe the image", "a red dog", {})
    assert k.rewrite(s) == "a red dog banana"
    assert Keyword(position="start").rewrite(s) == "banana a red dog"
    assert k.judge("a red dog banana", s) and k.judge("Banana", s)
    assert not k.judge("a red dog bananas", s) and not k.judge("a red dog", s)
    assert Tokenizer().encode(k.rewrite(s))


# ---- poisoning with cross samples and partial triggers -----------------------------------------
def test_poison_adds_cross_samples_with_clean_responses(task):
    pool = task.pool()
    wanet = _fitted(WaNet, seed=0)
    out = poison(pool, wanet, Insertion(), 0.2, seed=0)
    poisoned = [s for s in out if s.meta["poisoned"]]
    crossed = [i for i, s in enumerate(out) if s.meta["cross"]]
    assert len(poisoned) == 20 and len(crossed) == 40
    for i in crossed:
        assert out[i].response == pool[i].response and not np.array_equal(out[i].image, pool[i].image)
    assert all(s.response.startswith("<backdoor> ") for s in poisoned)
    again = poison(pool, wanet, Insertion(), 0.2, seed=0)
    assert all(np.array_equal(a.image, b.image) and a.meta == b.meta for a, b in zip(out, again))
    with pytest.raises(BenchError, match="cross samples"):
        poison(pool, _fitted(WaNet, seed=0, cross_ratio=5.0), Insertion(), 0.2, seed=0)


def test_triggered_partial_copies(task):
    tests = task.test()
    t = DualKey()
    full = triggered(tests, t, 0)
    img_only = triggered(tests, t, 0, partial="image_only")
    assert all(s.meta["triggered"] == "image_only" for s in img_only)
    assert all(a.prompt != b.prompt and np.array_equal(a.image, b.image) for a, b in zip(full, img_only))
    with pytest.raises(KeyError):
        triggered(tests, t, 0, partial="nope")
