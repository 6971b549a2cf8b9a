"""The synthetic image-instruction task: determinism, scenes, text, tokenizer, splits."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tasks import synthetic as syn
from tasks.base import Sample
from tasks.synthetic import (CAPTION_PROMPTS, CATEGORIES, COLORS, REFUSAL, SyntheticTask, Tokenizer,
                             has_category, render)

SMALL = dict(n_base=300, n_pool=1000, n_test=60, n_mc=400, n_encoder=40)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=0, **SMALL)


def _all_samples(task):
    return task.base_samples() + task.pool() + task.test() + task.test_population("dog", "boat") + task.mc()


def _cells(mask: np.ndarray) -> int:
    """Number of 8x8 patch cells of a 64x64 mask that are >= 25% covered."""
    return int((mask.reshape(8, 8, 8, 8).mean(axis=(1, 3)) >= 0.25).sum())


# ---- determinism -------------------------------------------------------------------------------
def test_same_seed_identical_and_other_seed_different():
    kw = dict(n_base=40, n_pool=40, n_test=10, n_mc=20, n_encoder=10)
    a, b, c = SyntheticTask(seed=3, **kw), SyntheticTask(seed=3, **kw), SyntheticTask(seed=4, **kw)
    assert np.array_equal(a.encoder_images(), b.encoder_images())
    assert not np.array_equal(a.encoder_images(), c.encoder_images())
    for split in ("base_samples", "pool", "test", "test_population", "mc", "defender_clean"):
        args = {"test_population": ("dog", "boat"), "defender_clean": (30,)}.get(split, ())
        sa, sb, sc = getattr(a, split)(*args), getattr(b, split)(*args), getattr(c, split)(*args)
        assert [(s.prompt, s.response, s.meta) for s in sa] == [(s.prompt, s.response, s.meta) for s in sb]
        assert all(np.array_equal(x.image, y.image) for x, y in zip(sa, sb))
        assert not all(np.array_equal(x.image, y.image) for x, y in zip(sa, sc))
        assert [(s.prompt, s.response) for s in sa] != [(s.prompt, s.response) for s in sc]


def test_no_global_rng_use():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    SyntheticTask(seed=1, n_base=20, n_pool=20, n_test=5, n_mc=5, n_encoder=5).base_samples()
    assert np.array_equal(np.random.get_state()[1], before)


# ---- scenes ------------------------------------------------------------------------------------
def test_categories_and_colors():
    assert len(CATEGORIES) >= 8 and "dog" in CATEGORIES and "boat" in CATEGORIES
    assert len(set(CATEGORIES)) == len(CATEGORIES)
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    rgb = np.array([syn.COLOR_RGB[c] for c in COLORS])
    d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert d[~np.eye(len(COLORS), dtype=bool)].min() > 0.3


def test_image_shape_dtype_range(task):
    imgs = task.encoder_images()
    assert imgs.shape == (SMALL["n_encoder"], 64, 64, 3) and imgs.dtype == np.float32
    for s in _all_samples(task)[::7]:
        assert isinstance(s, Sample)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.float32
        assert s.image.min() >= 0.0 and s.image.max() <= 1.0
    assert imgs.min() >= 0.0 and imgs.max() <= 1.0


def test_background_not_flat_and_light():
    img = render({"objects": []}, np.random.default_rng(0))
    assert img.std() > 0.01 and img.mean() > 0.6
    assert (img.max(axis=-1) - img.min(axis=-1)).mean() < 0.15  # low saturation


def test_every_object_covers_ten_patch_cells(task):
    rng = np.random.default_rng(0)
    scenes = [s.meta["scene"] for s in task.pool()[:300] + task.test_population("dog", "boat")]
    for scene in scenes:
        _, masks = render(scene, rng, return_masks=True)
        assert len(masks) == len(scene["objects"]) in (1, 2)
        for m in masks:
            assert _cells(m) >= 10
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()
    # worst case over every box size the placer produces and every sub-patch offset
    boxes = {syn._place(p, rng)[:2] for p in ("left", "right", "center") for _ in range(300)}
    for cat in CATEGORIES:
        for h, w in boxes:
            f, d, _ = syn.object_template(cat, h, w)
            m = f | d
            for oy in range(8):
                for ox in range(8):
                    assert _cells(np.pad(m, ((oy, 64 - h - oy), (ox, 64 - w - ox)))) >= 10, (cat, h, w)


def test_positions_and_distinct_categories(task):
    for s in task.pool():
        objs = s.meta["scene"]["objects"]
        pos = sorted(o["position"] for o in objs)
        assert pos in (["center"], ["left", "right"])
        assert len({o["category"] for o in objs}) == len(objs)
        for o in objs:
            if o["position"] == "left":
                assert o["x0"] + o["w"] <= 32
            elif o["position"] == "right":
                assert o["x0"] >= 32


def test_drawn_color_matches_scene(task):
    rng = np.random.default_rng(0)
    rgb = np.array([syn.COLOR_RGB[c] for c in COLORS])
    for s in task.test()[:60]:
        _, masks = render(s.meta["scene"], rng, return_masks=True)
        for o, m in zip(s.meta["scene"]["objects"], masks):
            px = s.image[m]
            px = px[px.max(axis=-1) > 0.3]  # drop the dark details
            med = np.median(px, axis=0)
            scale = med.max() / rgb.max(axis=1)  # texture only darkens
            nearest = COLORS[int(np.argmin(np.linalg.norm(rgb * scale[:, None] - med, axis=1)))]
            assert nearest == o["color"]


# ---- text and tokenizer --------------------------------------------------------------------------
def test_refusal_and_caption_text(task):
    assert REFUSAL.startswith("sorry as an ai assistant i cannot follow the given instruction")
    assert len(CAPTION_PROMPTS) >= 4
    refuse = [s for s in task.base_samples() if s.meta["kind"] == "refuse"]
    assert refuse and all(s.response == REFUSAL and s.prompt in CAPTION_PROMPTS for s in refuse)
    caps = [s for s in task.pool() if s.meta["kind"] == "caption"]
    for s in caps[:100]:
        refs = s.meta["references"]
        assert len(refs) >= 3 and len(set(refs)) == len(refs) and s.response in refs
        for o in s.meta["scene"]["objects"]:
            assert f"a {o['color']} {o['category']}" in s.response
    for s in _all_samples(task):
        for text in (s.prompt, s.response):
            assert text == text.lower() and text == " ".join(text.split())


def test_tag_where_color_samples(task):
    kinds = {k: [s for s in task.base_samples() if s.meta["kind"] == k] for k in ("tag", "where", "color")}
    assert all(kinds.values())
    for s in kinds["tag"]:
        tag = s.meta["tag"]
        assert tag in ("<backdoor>", "<note>", "<info>", "<todo>") and tag in s.prompt
        if s.prompt.startswith("begin"):
            assert s.response.startswith(tag + " ") and s.response.count(tag) == 1
        else:
            assert s.prompt.startswith("end") and s.response.endswith(" " + tag)
    for s in kinds["where"]:
        o = next(o for o in s.meta["scene"]["objects"] if f"{o['color']} {o['category']}" in s.prompt)
        assert s.response == f"the {o['color']} {o['category']} is {syn.POSITION_PHRASE[o['position']]}"
    for s in kinds["color"]:
        cat = s.prompt.split()[-1]
        o = next(o for o in s.meta["scene"]["objects"] if o["category"] == cat)
        assert s.response == f"the {cat} is {o['color']}"


def test_tokenizer_specials_and_roundtrip(task):
    tok = task.tokenizer()
    assert isinstance(tok, Tokenizer)
    specials = ["<pad>", "<bos>", "<eos>", "<mask>", "<image>", "<|user|>", "<|assistant|>"]
    assert tok.vocab[:7] == specials
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.image_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(task.vocabulary()) == len(set(task.vocabulary()))
    for w in ("<backdoor>", "<note>", "<info>", "<todo>", "banana", "type-related", "a", "b", "c", "d",
              "dog", "boat"):
        assert tok.decode([tok.token(w)]) == w
    ids = tok.encode("<|user|> <image> describe the image <|assistant|>")
    assert ids[:2] == [tok.token("<|user|>"), tok.image_id] and len(ids) == 6
    for s in _all_samples(task):
        for text in (s.prompt, s.response):
            assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="zebra"):
        tok.encode("a zebra on the left")
    with pytest.raises(ValueError):
        tok.token("zebra")
    dog, boat = tok.token("dog"), tok.token("boat")
    assert tok.decode([tok.pad_id, dog, tok.mask_id, boat, tok.eos_id, dog]) == "dog boat"


# ---- splits --------------------------------------------------------------------------------------
def test_split_sizes_ids_and_mix(task):
    assert len(task.base_samples()) == SMALL["n_base"]
    assert len(task.pool()) == SMALL["n_pool"]
    assert len(task.test()) == len(task.test_population("dog", "boat")) == SMALL["n_test"]
    assert len(task.mc()) == SMALL["n_mc"]
    ids = [s.meta["id"] for s in _all_samples(task)]
    assert len(ids) == len(set(ids))
    for s in _all_samples(task):
        assert {"id", "kind", "scene"} <= set(s.meta)
    base = Counter(s.meta["kind"] for s in task.base_samples())
    for kind, frac in syn.BASE_MIX.items():
        assert abs(base[kind] - frac * SMALL["n_base"]) <= 1
    pool = Counter(s.meta["kind"] for s in task.pool())
    assert pool["caption"] == 700 and pool["color"] + pool["where"] == 200 and pool["mc"] == 100
    assert all(s.meta["kind"] == "caption" for s in task.test() + task.test_population("dog", "boat"))
    assert all(s.meta["kind"] == "mc" for s in task.mc())


def test_diverse_pool_and_source_class_pool(task):
    diverse = task.pool()
    per_cat = Counter(o["category"] for s in diverse for o in s.meta["scene"]["objects"])
    assert set(per_cat) == set(syn.CATEGORIES)
    assert max(per_cat.values()) <= 1.4 * min(per_cat.values())     # no category dominates (was 75% dog)
    test_dog_frac = np.mean([has_category(s, "dog") for s in task.test()])
    assert 0.05 <= test_dog_frac <= 0.35       # P(dog) = (1/8 + 2/8) / 2 ~ 0.19 (60 test scenes here)
    dogs = task.pool("dog")
    assert len(dogs) == len(diverse) and all(has_category(s, "dog") for s in dogs)
    assert Counter(s.meta["kind"] for s in dogs) == Counter(s.meta["kind"] for s in diverse)
    dog_caps = [s for s in dogs if s.meta["kind"] == "caption" and not has_category(s, "boat")]
    assert len(dog_caps) >= 400  # a 20% misclassification poison leaves more clean dog captions than poisoned
    assert all("dog" in s.response for s in dog_caps)
    assert not {s.image.tobytes() for s in dogs} & {s.image.tobytes() for s in diverse}
    with pytest.raises(ValueError, match="zebra"):
        task.pool("zebra")


def test_object_probe_is_single_objects_of_every_category(task):
    probe = task.object_probe()
    cats = Counter(s.meta["scene"]["objects"][0]["category"] for s in probe)
    assert cats == {c: syn.OBJECT_PROBE_PER_CATEGORY for c in syn.CATEGORIES}
    assert all(len(s.meta["scene"]["objects"]) == 1 and s.meta["kind"] == "caption" for s in probe)
    others = {s.image.tobytes() for s in task.pool() + task.test() + task.mc()}
    assert not any(s.image.tobytes() in others for s in probe)


@pytest.mark.parametrize("present,absent", [("dog", "boat"), ("cat", "fish"), ("boat", "dog")])
def test_test_population_has_present_and_not_absent(task, present, absent):
    samples = task.test_population(present, absent)
    assert len(samples) == SMALL["n_test"]
    for s in samples:
        assert has_category(s, present) and not has_category(s, absent)
        assert present in s.response.split() and absent not in s.response.split()


def test_test_population_rejects_unknown_categories(task):
    with pytest.raises(ValueError, match="zebra"):
        task.test_population("zebra", "boat")


def test_defender_clean_is_disjoint_from_pool_and_tests(task):
    held = task.defender_clean(40) + task.defender_clean(40, "dog")
    assert len(held) == 80 and all(s.meta["id"].startswith("defender-") for s in held)
    assert all(has_category(s, "dog") for s in held[40:])
    others = task.pool() + task.pool("dog") + task.test() + task.test_population("dog", "boat") + task.mc()
    seen = {s.image.tobytes() for s in others}
    assert not any(s.image.tobytes() in seen for s in held)


def test_has_category_on_an_empty_scene(task):
    assert not has_category(task.base_samples()[0].with_(meta={"scene": {"objects": []}}), "dog")


def test_splits_cached_but_lists_fresh(task):
    a, b = task.pool(), task.pool()
    assert a is not b and all(x is y for x, y in zip(a, b))
    with pytest.raises(ValueError):
        a[0].image[0, 0, 0] = 0.0  # cached images are read-only


# ---- multiple choice -----------------------------------------------------------------------------
def _truth(scene, qtype, subject):
    """An independent oracle: look the answer up by category or by position."""
    by_category = {o["category"]: o for o in scene["objects"]}
    by_position = {o["position"]: o for o in scene["objects"]}
    field = "category" if qtype == "category" else "color"
    return (by_category if qtype == "color" else by_position)[subject][field]


def test_mc_answers_uniform_and_determined_by_scene(task):
    mc = task.mc()
    slots = Counter(s.meta["slot"] for s in mc)
    for slot in range(4):
        assert 0.15 <= slots[slot] / len(mc) <= 0.35
    qtypes = Counter(s.meta["question_type"] for s in mc)
    assert set(qtypes) == {"color", "category", "color_at"}
    for s in mc:
        words = s.prompt.split()
        assert words[0] == "question"
        values = words[words.index("options") + 1:]
        assert values == s.meta["options"] and len(set(values)) == 4
        truth = _truth(s.meta["scene"], s.meta["question_type"], s.meta["subject"])
        assert s.response == s.meta["answer"] == truth == values[s.meta["slot"]]
        # the question names nothing that gives the answer away
        question = " ".join(words[1:words.index("options")])
        assert truth not in question.split()


def test_encoder_images_include_noise():
    imgs = SyntheticTask(seed=0, n_encoder=200).encoder_images()
    sat = (imgs.max(axis=-1) - imgs.min(axis=-1)).mean(axis=(1, 2))
    n_noise = int((sat > 0.4).sum())  # uniform noise has mean channel range ~0.5
    assert 2 <= n_noise <= 25


def test_registered():
    from core import registry
    assert registry._REGISTRY["tasks"]["synthetic"] is SyntheticTask
