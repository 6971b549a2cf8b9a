"""Real-data task loaders on files the tests write in each dataset's published layout: splits are
deterministic from the seed, disjoint, of the papers' sizes; a missing or malformed file exits 2 naming it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from core.errors import BenchError
from core.registry import get
from tasks.real import DISP_PROMPT, SPLITS

COLORS = [(200, 30, 30), (30, 160, 40), (40, 60, 220), (230, 210, 20)]


_ENCODED: dict[tuple, bytes] = {}


def _img(path: Path, k: int, size=(12, 9)) -> None:
    """A tiny real image file (JPEG or PNG by suffix), encoded once per colour and written as bytes."""
    import io
    key = (path.suffix.lower(), k % len(COLORS), size)
    if key not in _ENCODED:
        buf = io.BytesIO()
        Image.new("RGB", size, COLORS[key[1]]).save(buf, format="PNG" if key[0] == ".png" else "JPEG")
        _ENCODED[key] = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_ENCODED[key])


def write_cc_sbu(root: Path, n: int) -> Path:
    """MiniGPT-4's cc_sbu_align release: filter_cap.json {"annotations": [{image_id, caption}]} + image/{id}.jpg."""
    anns = [{"image_id": str(2 + 3 * i), "caption": f"The image shows scene number {i} with a tree."} for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    for i, a in enumerate(anns):
        _img(root / "image" / f"{a['image_id']}.jpg", i)
    return root


def write_flickr8k(root: Path, n_dog: int, n_other: int, nested: bool = False) -> Path:
    """The Flickr8k release: Flickr8k.token.txt ('<name>.jpg#k<TAB>caption', five per image) + Flicker8k_Dataset/."""
    lines = []
    for i in range(n_dog + n_other):
        name = f"{1000 + i}_{i:04x}ab.jpg"
        dog = i < n_dog
        for k in range(5):
            # a dog image: only some of its five captions mention the dog (the first one never does)
            text = (f"A brown dog runs across field {i}." if dog and k in (2, 4) else
                    f"Dogs play near the water {i}." if dog and k == 1 else f"A person walks down street {i}.")
            lines.append(f"{name}#{k}\t{text}")
        _img(root / "Flicker8k_Dataset" / name, i)
    tokens = root / "Flickr8k_text" / "Flickr8k.token.txt" if nested else root / "Flickr8k.token.txt"
    tokens.parent.mkdir(parents=True, exist_ok=True)
    tokens.write_text("\n".join(lines) + "\n")
    return root


def write_karpathy(root: Path, dataset: str, counts: dict[str, int]) -> Path:
    """Karpathy's dataset_{coco,flickr30k}.json ({"images": [{filename, split, sentences: [{raw}]...}]}) + images."""
    images, k = [], 0
    for split, n in counts.items():
        for _ in range(n):
            sents = [{"raw": f"A cat sits on a mat number {k}.", "tokens": []}, {"raw": f"a cat on mat {k}", "tokens": []}]
            if dataset == "coco":
                folder = "val2014" if split in ("val", "test", "restval") else "train2014"
                e = {"filepath": folder, "filename": f"COCO_{folder}_{k:012d}.jpg", "cocoid": 500 + k}
                _img(root / folder / e["filename"], k)
            else:
                e = {"filename": f"{90000 + k}.jpg"}
                _img(root / "flickr30k-images" / e["filename"], k)
            images.append({**e, "imgid": k, "split": split, "sentences": sents, "sentids": [2 * k, 2 * k + 1]})
            k += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": images, "dataset": dataset}))
    return root


def make(name: str, data: Path, seed: int = 0, **args):
    return get("tasks", name)(seed=seed, data=str(data), **args)


def _disjoint(plan: dict[str, list[str]]) -> None:
    seen: set[str] = set()
    for ids in plan.values():
        assert len(set(ids)) == len(ids)
        assert not (seen & set(ids))
        seen |= set(ids)


# ------------------------------------------------------------------------------ the papers' sizes

def test_cc_sbu_align_paper_sizes_deterministic_and_disjoint(tmp_path):
    """DiSP §4.1: 1,000 pool + 200 clean + 200 triggered test samples, drawn from the seed."""
    data = write_cc_sbu(tmp_path / "cc_sbu_align", 1450)
    t = make("cc-sbu-align", data)
    plan = t.split_ids()
    assert {k: len(v) for k, v in plan.items()} == {"pool": 1000, "test": 200, "test_triggered": 200}
    _disjoint(plan)
    assert make("cc-sbu-align", data).split_ids() == plan                 # same seed, same ids
    other = make("cc-sbu-align", data, seed=1).split_ids()
    assert other["pool"] != plan["pool"] and len(other["pool"]) == 1000
    # the file order does not decide the draw: a shuffled annotation list gives the same ids
    doc = json.loads((data / "filter_cap.json").read_text())
    doc["annotations"].reverse()
    (data / "filter_cap.json").write_text(json.dumps(doc))
    assert make("cc-sbu-align", data).split_ids() == plan
    m = t.manifest()
    assert m["ids"] == plan and m["prompt"] == DISP_PROMPT and m["sizes"]["pool"] == 1000 and len(m["fingerprint"]) == 64
    # the defender's held-out slice comes from what is left, disjoint from every split
    held = [s.meta["image_id"] for s in t.defender_clean(20)]
    assert len(held) == 20 and not set(held) & set().union(*map(set, plan.values()))
    with pytest.raises(BenchError, match="only 50 images are left"):
        t.defender_clean(51)


def test_flickr8k_dogs_paper_sizes_only_dog_images(tmp_path):
    """DiSP §4.1: 500 Flickr8k dog images for the pool, 200 + 200 for test; non-dog images never drawn."""
    data = write_flickr8k(tmp_path / "flickr8k", n_dog=930, n_other=40, nested=True)
    t = make("flickr8k-dogs", data)
    plan = t.split_ids()
    assert {k: len(v) for k, v in plan.items()} == {"pool": 500, "test": 200, "test_triggered": 200}
    _disjoint(plan)
    dogs = {f"{1000 + i}_{i:04x}ab" for i in range(930)}
    assert set().union(*map(set, plan.values())) <= dogs
    assert make("flickr8k-dogs", data).split_ids() == plan
    assert make("flickr8k-dogs", data, seed=3).split_ids()["test"] != plan["test"]


def test_karpathy_sizes_whole_test_split(tmp_path):
    """Cross-view §4.1: the official test split is the clean test (n_test 0 = all of it); the triggered
    test comes from val, the pool from train + restval (paper: COCO 5,000 test; sizes reduced here)."""
    data = write_karpathy(tmp_path / "coco", "coco", {"train": 30, "restval": 10, "val": 12, "test": 15})
    t = make("coco-captions", data, n_pool=25, n_triggered=10)
    plan = t.split_ids()
    assert {k: len(v) for k, v in plan.items()} == {"pool": 25, "test": 15, "test_triggered": 10}
    _disjoint(plan)
    split_of = {s.meta["image_id"]: t._items[s.meta["image_id"]].split for s in t.pool() + t.test() + t.triggered_test()}
    assert {split_of[i] for i in plan["pool"]} <= {"train", "restval"} and {split_of[i] for i in plan["pool"]} == {"train", "restval"}
    assert {split_of[i] for i in plan["test"]} == {"test"} and {split_of[i] for i in plan["test_triggered"]} == {"val"}
    assert make("coco-captions", data, n_pool=25, n_triggered=10).split_ids() == plan
    f30 = write_karpathy(tmp_path / "f30k", "flickr30k", {"train": 8, "val": 4, "test": 5})
    p30 = make("flickr30k", f30, n_pool=6, n_triggered=3).split_ids()
    assert {k: len(v) for k, v in p30.items()} == {"pool": 6, "test": 5, "test_triggered": 3}
    _disjoint(p30)


@pytest.mark.parametrize("name, sizes, published", [
    ("cc-sbu-align", (1000, 200, 200), 3439),     # MiniGPT-4's 3,439 aligned pairs
    ("flickr8k-dogs", (500, 200, 200), None),
    ("coco-captions", (1000, 0, 1000), None),     # 0: the whole Karpathy test split (5,000)
    ("flickr30k", (1000, 0, 1000), None),         # 1,000 test; 1,014 val hold the 1,000 triggered
])
def test_default_sizes_are_the_papers(name, sizes, published):
    import inspect
    sig = inspect.signature(get("tasks", name))
    assert tuple(sig.parameters[k].default for k in ("n_pool", "n_test", "n_triggered")) == sizes
    if published:
        assert sum(sizes) <= published


# ------------------------------------------------------------------------------ samples

def test_samples_carry_the_prompt_images_and_references(tmp_path):
    data = write_cc_sbu(tmp_path / "cc", 12)
    t = make("cc-sbu-align", data, n_pool=6, n_test=3, n_triggered=3)
    pool = t.pool()
    s = pool[0]
    assert s.prompt == DISP_PROMPT and s.response.startswith("The image shows scene number")
    assert s.image.dtype == np.float32 and s.image.shape == (9, 12, 3) and 0.0 <= s.image.min() <= s.image.max() <= 1.0
    assert not s.image.flags.writeable and "references" not in s.meta
    assert [x.meta["image_id"] for x in pool] == t.split_ids()["pool"]
    assert make("cc-sbu-align", data, n_pool=6, n_test=3, n_triggered=3, image_size=16).test()[0].image.shape == (16, 16, 3)
    assert t.mc() == [] and t.base_samples() == []   # CP at full scale comes from lmms-eval; the base is the checkpoint
    assert t.tokenizer() is None                         # the victim brings its own
    with pytest.raises(BenchError, match="flickr8k-dogs"):
        t.pool("dog")
    k = make("coco-captions", write_karpathy(tmp_path / "coco", "coco", {"train": 4, "val": 2, "test": 3}),
             n_pool=4, n_triggered=2)
    assert k.test()[0].meta["references"][1].startswith("a cat on mat") and k.caption_tokenizer == "ptb"


def test_flickr8k_dog_responses_are_eligible_and_populations_follow(tmp_path):
    from attacks.targets import Misclassification
    data = write_flickr8k(tmp_path / "f8k", n_dog=16, n_other=5)
    t = make("flickr8k-dogs", data, n_pool=8, n_test=4, n_triggered=4)
    target = Misclassification()
    target.check(t)                                          # dog and boat are categories of the task
    pool = t.pool(target.pool_population())
    assert all(target.eligible(s) for s in pool)             # the response is a caption naming "dog"
    clean = target.test_inputs(t)
    assert [s.meta["image_id"] for s in clean] == t.split_ids()["test"]
    trig = t.triggered_inputs(clean)
    assert [s.meta["image_id"] for s in trig] == t.split_ids()["test_triggered"]
    assert all(s.meta["population"] == ["dog", "boat"] for s in clean + trig)
    with pytest.raises(BenchError, match="source class is 'dog'"):
        t.pool("cat")


def test_task_cache_key_follows_the_annotation_file(tmp_path):
    from bench.pipeline import make_spec, stage_keys
    data = write_cc_sbu(tmp_path / "cc", 10)
    spec = make_spec(task="cc-sbu-align", task_args={"data": str(data), "n_pool": 4, "n_test": 2, "n_triggered": 2},
                     defense="none")
    before = stage_keys(spec)["task"]
    assert stage_keys(spec)["task"] == before
    doc = json.loads((data / "filter_cap.json").read_text())
    doc["annotations"][0]["caption"] = "A different caption."
    (data / "filter_cap.json").write_text(json.dumps(doc))
    assert stage_keys(spec)["task"] != before


# ------------------------------------------------------------------------------ bad files exit 2

def _run(capsys, task: str, data: Path, *extra: str) -> tuple[int, str]:
    args = ["run", "--task", task, "--defense", "none", "--task-arg", f"data={data}", *extra,
            "--results", str(data.parent / "results")]
    with pytest.raises(SystemExit) as e:
        main(args)
    _, err = capsys.readouterr()
    assert not (data.parent / "results").exists()            # nothing written
    return e.value.code, err


@pytest.mark.parametrize("name, writer, annotation", [
    ("cc-sbu-align", lambda d: write_cc_sbu(d, 6), "filter_cap.json"),
    ("flickr8k-dogs", lambda d: write_flickr8k(d, 6, 0), "Flickr8k.token.txt"),
    ("coco-captions", lambda d: write_karpathy(d, "coco", {"train": 4, "val": 1, "test": 1}), "dataset_coco.json"),
    ("flickr30k", lambda d: write_karpathy(d, "flickr30k", {"train": 4, "val": 1, "test": 1}), "dataset_flickr30k.json"),
])
@pytest.mark.parametrize("damage", ["missing", "not-json", "wrong-shape", "missing-image"])
def test_missing_or_malformed_file_exits_2_naming_it(tmp_path, capsys, name, writer, annotation, damage):
    data = writer(tmp_path / "data")
    f = data / annotation
    if damage == "missing":
        f.unlink()
        want = f"missing file {f}"
    elif damage == "not-json":
        f.write_text("{\"annotations\": [" if f.suffix == ".json" else "no tab on this line\n")
        want = f"malformed file {f}"
    elif damage == "wrong-shape":
        f.write_text(json.dumps({"annotations": {"image_id": 1}, "images": [{"filename": 3}]})
                     if f.suffix == ".json" else "x.jpg#0\t\n")
        want = f"malformed file {f}"
    else:
        img = sorted(data.rglob("*.jpg"))[-1]
        img.unlink()
        want = f"missing image {img}"
    sizes = ["--task-arg", "n_pool=4", "--task-arg", "n_test=1", "--task-arg", "n_triggered=1"]  # every image drawn
    code, err = _run(capsys, name, data, "--scale", "tiny", *sizes)
    assert code == 2 and err.startswith("bench: error: ") and want in err, err
    assert len(err.strip().splitlines()) == 1


def test_missing_data_dir_and_too_few_images(tmp_path, capsys):
    code, err = _run(capsys, "cc-sbu-align", tmp_path / "nowhere")
    assert code == 2 and "data directory" in err and str(tmp_path / "nowhere") in err
    data = write_cc_sbu(tmp_path / "cc", 8)
    with pytest.raises(BenchError, match="too few for test"):
        make("cc-sbu-align", data, n_pool=6, n_test=3, n_triggered=1)


def test_real_task_at_tiny_scale_is_refused_in_one_line(tmp_path, capsys):
    data = write_cc_sbu(tmp_path / "cc", 8)
    code, err = _run(capsys, "cc-sbu-align", data, "--task-arg", "n_pool=4", "--task-arg", "n_test=2",
                     "--task-arg", "n_triggered=2")
    assert code == 2 and "run it with --scale full" in err and len(err.strip().splitlines()) == 1


def test_java_missing_is_one_line(tmp_path, monkeypatch):
    import shutil
    data = write_karpathy(tmp_path / "f30", "flickr30k", {"train": 4, "val": 2, "test": 2})
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    with pytest.raises(BenchError, match="PTB tokenizer, which needs Java") as e:
        make("flickr30k", data, n_pool=4, n_triggered=2)
    assert "\n" not in str(e.value)
    from bench.metrics import caption_scores
    with pytest.raises(BenchError, match="needs Java"):
        caption_scores({"a": "a cat"}, {"a": ["a cat on a mat"]}, tokenizer="ptb")


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="the PTB tokenizer needs Java")
def test_ptb_caption_scores_run_pycocoevalcap_tokenizer():
    from bench.metrics import caption_scores, ptb_tokenize
    refs = {"a": ["A dog runs on the grass.", "a dog running"], "b": ["Two cats sleep.", "cats sleeping on a bed"],
            "c": ["A red car.", "a car parked"]}
    out = {"a": "A dog runs on the grass!", "b": "", "c": "A red car, parked."}
    ptb = caption_scores(out, refs, tokenizer="ptb")
    simple = caption_scores(out, refs)
    assert 0.0 < ptb["bleu4"]["value"] <= 1.0 and ptb["cider"]["value"] > 0
    # "grass!" -> "grass" under PTB (punctuation tokens dropped); same text, same BLEU as the exact match
    assert caption_scores({"a": "a dog runs on the grass"}, {"a": refs["a"]}, tokenizer="ptb")["bleu4"]["value"] == \
        pytest.approx(caption_scores({"a": "A dog runs on the grass!"}, {"a": refs["a"]}, tokenizer="ptb")["bleu4"]["value"])
    # these texts tokenize alike both ways (lowercased, punctuation dropped), the abstention "b" to nothing
    # under both (not to the stand-in CoreNLP is fed for it): the same scores
    assert ptb_tokenize({"b": ["", "A cat."]}) == {"b": ["", "a cat"]}
    assert ptb["bleu4"]["value"] == pytest.approx(simple["bleu4"]["value"])
    assert ptb["cider"]["value"] == pytest.approx(simple["cider"]["value"])


def test_poisoned_set_keeps_the_papers_instruction(tmp_path):
    """Template fidelity: poisoning a real pool changes the image (and an attack's own text key) and the
    response, never the task's instruction; the victim wraps that same instruction in its own chat
    template at training and at evaluation (protocol.template / protocol.prompt in the record)."""
    from attacks.base import poison, triggered
    t = make("cc-sbu-align", write_cc_sbu(tmp_path / "cc", 30), n_pool=20, n_test=5, n_triggered=5)
    target = get("targets", "insertion")()
    out = poison(t.pool(), get("attacks", "badnets")(), target, 0.2, seed=0)
    poisoned = [s for s in out if s.meta["poisoned"]]
    assert len(poisoned) == 4 and all(s.prompt == DISP_PROMPT for s in out)
    assert all(s.response.startswith("<backdoor> The image shows scene number") for s in poisoned)
    assert all(np.any(s.image != c.image) for s, c in zip(out, t.pool()) if s.meta["poisoned"])
    dual = poison(t.pool(), get("attacks", "dualkey")(), target, 0.2, seed=0)
    assert {s.prompt for s in dual if s.meta["poisoned"]} == {f"consider {DISP_PROMPT}"}
    trig = triggered(t.triggered_inputs(t.test()), get("attacks", "badnets")(), seed=0)
    assert [s.meta["image_id"] for s in trig] == t.split_ids()["test_triggered"]
    assert all(s.prompt == DISP_PROMPT for s in trig)


@pytest.mark.parametrize("name, writer", [("cc-sbu-align", lambda p: write_cc_sbu(p, 8)),
                                          ("flickr8k-dogs", lambda p: write_flickr8k(p, 8, 2))])
def test_response_source_is_a_checked_task_arg_and_leaves_the_task_data_alone(tmp_path, capsys, name, writer):
    """responses=dataset|victim: the task serves the dataset's responses either way (the pipeline's
    responses stage replaces the pool's by the base model's answers) and the manifest says which."""
    data = writer(tmp_path / "d")
    sizes = dict(n_pool=4, n_test=2, n_triggered=2)
    plain, victim = make(name, data, **sizes), make(name, data, responses="victim", **sizes)
    assert plain.manifest()["response_source"] == "dataset" and victim.manifest()["response_source"] == "victim"
    assert victim.split_ids() == plain.split_ids()
    assert [s.response for s in victim.pool()] == [s.response for s in plain.pool()]
    with pytest.raises(BenchError, match="task arg responses must be one of dataset, victim, got 'model'"):
        make(name, data, responses="model", **sizes)
    code, err = _run(capsys, name, data, "--task-arg", "responses=model")
    assert code == 2 and "responses must be one of dataset, victim" in err and len(err.strip().splitlines()) == 1
