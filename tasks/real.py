"""What every real-data task shares: reading published files strictly, a fixed seed-drawn split plan
recorded by ids, and the task interface the pipeline reads (pool / test / triggered test / defender slice).

A real task reads local files in the layout its dataset is published in (nothing is downloaded); a
missing or malformed file is a ``BenchError`` naming the file (exit 2, nothing written). Its splits are
drawn once from the seed: the candidate ids of each source (sorted, so the file order does not matter)
are permuted by ``split_rng(seed, "<task>-<source>")`` and sliced in a fixed order — pool, clean test,
triggered test, then the defender's held-out slice from what is left — so the splits are disjoint,
reproducible, and listed by id in every record (``manifest``).

Text is free text: these tasks have no word-level tokenizer, they run on a victim that reads text with
its own tokenizer and chat template (``--scale full``). Samples carry the instruction only (DiSP's ASR
runs: "Describe this image in detail."); each victim wraps it in its own chat template when it collates,
and the record stores both (``bench.pipeline``: protocol.template).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from core.errors import BenchError
from core.files import file_sha256
from tasks.base import Sample
from tasks.synthetic import split_rng

DISP_PROMPT = "Describe this image in detail."   # DiSP §4.1 / App. B: the instruction of its ASR runs
SPLITS = ("pool", "test", "test_triggered")
# Where the pool's training responses come from: the dataset's own captions, or the clean base victim's
# generations for each pool image and the task's prompt (DiSP App. B.1; the pipeline's responses stage).
RESPONSE_SOURCES = ("dataset", "victim")
# The 80 COCO object categories (COCO 2014 instances annotations): the nouns a real task can name as a
# misclassification source or target (DiSP: dog -> boat).
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush")


@dataclass(frozen=True)
class Item:
    """One published image with its texts: ``id`` (the dataset's own), the image file, its captions
    (the first is the training response) and the published split it belongs to ("all" if none)."""

    id: str
    path: Path
    captions: tuple[str, ...]
    split: str = "all"


# --------------------------------------------------------------------------------------------
# Strict file reading
# --------------------------------------------------------------------------------------------
def data_dir(data: str, task: str, expected: str) -> Path:
    """The task's ``data`` arg as an existing directory, or a BenchError saying what belongs there."""
    if not data:
        raise BenchError(f"task {task} reads local files: pass --task-arg data=DIR with {expected} "
                         f"(docs/datasets.md)")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise BenchError(f"task {task}: data directory {root} does not exist (expected {expected})")
    return root


def read_json(path: Path) -> Any:
    """A JSON file, or a BenchError naming it (missing, unreadable or not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BenchError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"malformed file {path}: {e}") from None


def read_text(path: Path) -> str:
    """A UTF-8 text file, or a BenchError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchError(f"missing file {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"malformed file {path}: {e}") from None


def malformed(path: Path, what: str) -> BenchError:
    return BenchError(f"malformed file {path}: {what}")




def load_image(path: Path, size: int = 0) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [0, 1] (RGB); ``size`` > 0 resizes it to size x size
    (bicubic, for reduced victims), 0 keeps the published resolution (DiSP's 20 px patch is placed on
    the raw image). A missing or undecodable file is a BenchError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise BenchError(f"missing image {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BenchError(f"malformed image {path}: {e}") from None
    arr.setflags(write=False)
    return arr


def require_java(what: str) -> None:
    """pycocoevalcap's PTB tokenizer runs Stanford CoreNLP (a jar): one line and exit 2 without Java."""
    if shutil.which("java") is None:
        raise BenchError(f"{what} scores captions with pycocoevalcap's PTB tokenizer, which needs Java: "
                         "no `java` on PATH (install a JRE, e.g. apt-get install default-jre-headless)")


def has_word(text: str, word: str) -> bool:
    """Whole-word, case-insensitive match (the same rule as the misclassification judge)."""
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", text.lower()) is not None


# --------------------------------------------------------------------------------------------
# The shared task
# --------------------------------------------------------------------------------------------
class RealTask:
    """A published image-text dataset read from ``data``; subclasses say where the files are
    (``read_items``) and which published splits each of our splits draws from (``SOURCES``).

    Split sizes are task args (defaults: the paper's); ``n_test`` / ``n_triggered`` 0 means every
    candidate of the source. ``image_size`` 0 keeps the published resolution. ``prompt`` is the
    instruction of every sample (recorded in spec.task_args). ``responses`` = "victim" asks the pipeline
    to replace the pool's responses by the base model's own answers before poisoning (DiSP App. B.1:
    "we replace the original responses with model-generated outputs from LLaDA-V"); the task itself
    always serves the dataset's, the test splits' references stay the dataset's captions."""

    name = "real"
    categories: tuple[str, ...] = ()
    expected = "the dataset's published files"
    # our split -> the published splits it draws from; splits sharing sources are disjoint slices of
    # one permutation, in SPLITS order
    SOURCES: dict[str, tuple[str, ...]] = {"pool": ("all",), "test": ("all",), "test_triggered": ("all",)}
    references = False          # test samples carry meta["references"] (captions scored by BLEU-4 / CIDEr)
    caption_tokenizer = "simple"

    def __init__(self, seed: int = 0, data: str = "", n_pool: int = 1000, n_test: int = 200,
                 n_triggered: int = 200, prompt: str = DISP_PROMPT, image_size: int = 0, responses: str = "dataset"):
        self.seed, self.data, self.prompt = int(seed), str(data), str(prompt)
        if responses not in RESPONSE_SOURCES:
            raise BenchError(f"task arg responses must be one of {', '.join(RESPONSE_SOURCES)}, got {responses!r}")
        self.responses = str(responses)
        self.n_pool, self.n_test, self.n_triggered, self.image_size = int(n_pool), int(n_test), int(n_triggered), int(image_size)
        if self.n_pool < 1:
            raise BenchError(f"task arg n_pool must be >= 1, got {self.n_pool}")
        for name in ("n_test", "n_triggered", "image_size"):
            if getattr(self, name) < 0:
                raise BenchError(f"task arg {name} must be >= 0, got {getattr(self, name)}")
        if not self.prompt.strip():
            raise BenchError("task arg prompt must not be empty")
        self.root = data_dir(self.data, self.name, self.expected)
        items = self.read_items(self.root)
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
            raise BenchError(f"task {self.name}: duplicate image ids in {self.root}, e.g. {dup}")
        self._items = {it.id: it for it in items}
        self._plan = self._draw()
        for split, ids in self._plan.items():       # every drawn image must be there before any work
            for i in ids:
                if not self._items[i].path.is_file():
                    raise BenchError(f"missing image {self._items[i].path} (task {self.name}, {split} split)")
        self._cache: dict[str, list[Sample]] = {}

    # ---- what subclasses provide ----------------------------------------------------------------
    def read_items(self, root: Path) -> list[Item]:
        raise NotImplementedError

    @classmethod
    def annotation_files(cls, root: Path) -> list[Path]:
        """The files whose content decides the items (hashed into the task's cache key)."""
        raise NotImplementedError

    def eligible(self, item: Item) -> bool:
        """Which items may enter any split (flickr8k-dogs: captions that mention a dog)."""
        return True

    @classmethod
    def fingerprint(cls, task_args: dict) -> str | None:
        """sha256 over the annotation files a run with these args reads (None when they are absent:
        the run then stops at the task's own check)."""
        try:
            root = Path(task_args.get("data", "")).expanduser()
            files = cls.annotation_files(root) if task_args.get("data") else []
            if not files or not all(f.is_file() for f in files):
                return None
            return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
        except OSError:
            return None

    # ---- the split plan -------------------------------------------------------------------------
    def _wanted(self, split: str) -> int:
        return {"pool": self.n_pool, "test": self.n_test, "test_triggered": self.n_triggered}[split]

    def _draw(self) -> dict[str, list[str]]:
        plan: dict[str, list[str]] = {}
        self._left: dict[tuple[str, ...], list[str]] = {}
        for source in dict.fromkeys(self.SOURCES.values()):
            cands = sorted(i for i, it in self._items.items() if (it.split in source or "all" in source)
                           and self.eligible(it))
            order = [cands[j] for j in split_rng(self.seed, f"{self.name}-{'+'.join(source)}").permutation(len(cands))]
            at = 0
            for split in SPLITS:
                if self.SOURCES[split] != source:
                    continue
                want = self._wanted(split)
                n = (len(order) - at) if want == 0 else want
                if n <= 0 or at + n > len(order):
                    need = sum(self._wanted(s) for s in SPLITS if self.SOURCES[s] == source)
                    raise BenchError(f"task {self.name}: {self.root} has {len(cands)} usable images in "
                                     f"{'+'.join(source)}, too few for {split} ({n}) after the splits before it "
                                     f"(the sizes asked add up to {need}); lower n_pool / n_test / n_triggered")
                plan[split] = order[at:at + n]
                at += n
            self._left[source] = order[at:]
        return plan

    def split_ids(self) -> dict[str, list[str]]:
        """The fixed ids of every split (copies)."""
        return {k: list(v) for k, v in self._plan.items()}

    def manifest(self) -> dict:
        """What a record stores about the data: where it was read, the annotation files' hash, the
        prompt, the split sizes and every split's ids."""
        return {"task": self.name, "data": str(self.root), "fingerprint": self.fingerprint({"data": self.data}),
                "prompt": self.prompt, "image_size": self.image_size, "seed": self.seed,
                "response_source": self.responses,
                "sizes": {k: len(v) for k, v in self._plan.items()}, "ids": self.split_ids()}

    # ---- samples --------------------------------------------------------------------------------
    def sample(self, item_id: str, split: str) -> Sample:
        it = self._items[item_id]
        meta = {"id": f"{self.name}-{it.id}", "image_id": it.id, "kind": "caption", "split": split,
                "file": str(it.path)}
        if self.references and split != "pool":
            meta["references"] = list(it.captions)
        return Sample(load_image(it.path, self.image_size), self.prompt, self.response(it), meta)

    def response(self, item: Item) -> str:
        """The training response of an item: its first caption."""
        return item.captions[0]

    def _samples(self, split: str, ids: Iterable[str]) -> list[Sample]:
        if split not in self._cache:
            self._cache[split] = [self.sample(i, split) for i in ids]
        return list(self._cache[split])

    def pool(self, present: str | None = None) -> list[Sample]:
        """The fine-tuning pool (its fixed ids); ``present`` names a category every pool image must show,
        which only a source-class task (flickr8k-dogs) has."""
        if present is not None:
            self._check_present(present)
        return self._samples("pool", self._plan["pool"])

    def _check_present(self, present: str) -> None:
        raise BenchError(f"task {self.name} has no {present!r} pool (a misclassification target's source-class "
                         "pool: use --task flickr8k-dogs)")

    def test(self) -> list[Sample]:
        """The clean held-out test inputs (ASR w/o, caption scores)."""
        return self._samples("test", self._plan["test"])

    def triggered_test(self) -> list[Sample]:
        """The held-out inputs the trigger is applied to (ASR w/t): other images than the clean test."""
        return self._samples("test_triggered", self._plan["test_triggered"])

    def test_population(self, present: str, absent: str) -> list[Sample]:
        """Clean test inputs whose captions mention ``present`` and not ``absent`` (misclassification);
        each carries meta["population"] so ``triggered_inputs`` filters its split the same way."""
        self._check_present(present)
        return [s.with_(meta={**s.meta, "population": [present, absent]}) for s in self.test()
                if self._shows(s, present, absent)]

    def triggered_inputs(self, clean_inputs: list[Sample]) -> list[Sample]:
        """The inputs the trigger is applied to, for these clean test inputs: the triggered split (other
        images than the clean test: DiSP's 200 poisoned + 200 clean held-out samples), restricted to the
        clean inputs' population when they have one."""
        pops = {tuple(s.meta["population"]) for s in clean_inputs if "population" in s.meta}
        if len(pops) > 1:
            raise BenchError(f"task {self.name}: clean inputs from several populations {sorted(pops)}")
        out = self.triggered_test()
        if pops:
            present, absent = pops.pop()
            out = [s.with_(meta={**s.meta, "population": [present, absent]}) for s in out
                   if self._shows(s, present, absent)]
        return out

    def _shows(self, s: Sample, present: str, absent: str) -> bool:
        caps = self._items[s.meta["image_id"]].captions
        return any(has_word(c, present) for c in caps) and not any(has_word(c, absent) for c in caps)

    def defender_clean(self, n: int, present: str | None = None) -> list[Sample]:
        """A held-out clean slice for defenses that ask for one: the first ``n`` ids left over after the
        pool's source was split (disjoint from every split)."""
        if present is not None:
            self._check_present(present)
        left = self._left[self.SOURCES["pool"]]
        if n > len(left):
            raise BenchError(f"task {self.name}: the defense asks for {n} held-out clean samples, "
                             f"only {len(left)} images are left after the splits")
        key = f"defender:{n}"
        if key not in self._cache:
            self._cache[key] = [self.sample(i, "defender") for i in left[:n]]
        return list(self._cache[key])

    def mc(self) -> list[Sample]:
        """No in-task multiple choice: a real task's CP is lmms-eval's (bench.lmms: mmmu_val)."""
        return []

    def base_samples(self) -> list[Sample]:
        """None to add: a real task runs on a published (pretrained) victim, whose base is its checkpoint."""
        return []

    def encoder_images(self) -> np.ndarray:
        raise BenchError(f"task {self.name} has real images and free text: it runs on a pretrained victim "
                         "(--scale full), not on a tiny replica trained from scratch")

    def tokenizer(self) -> None:
        """None: real text is read by the victim's own tokenizer and chat template (a full-scale model
        brings them; the pipeline refuses a real task at tiny scale)."""
        return None
