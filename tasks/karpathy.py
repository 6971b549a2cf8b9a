"""Captioning sets in Karpathy's split files (COCO 2014 and Flickr30k), the cross-view paper's clean
test sets (its §4.1: "the official test sets of these two datasets as clean test sets"; BLEU@4 and
CIDEr). Shared by ``tasks/coco_captions.py`` and ``tasks/flickr30k.py``.

Published layout (Karpathy's ``caption_datasets.zip``, used by neuraltalk2 and the captioning repos
since): ``dataset_<name>.json`` = ``{"dataset": ..., "images": [{"filename", "split": train | restval |
val | test, "sentences": [{"raw": ...}, ...], "imgid", "filepath" (COCO only: train2014 / val2014),
"cocoid" (COCO only)}]}``; the images sit in the folders the dataset's own archives unpack to.

Splits: pool from train (+ restval), clean test = the test split (``n_test`` 0: all of it, as the
paper), triggered test from the val split (other images than the clean test). Test captions are scored
with pycocoevalcap's PTB tokenizer, which needs Java: the task refuses to start without it.
"""
from __future__ import annotations

from pathlib import Path

from tasks.real import COCO_CATEGORIES, Item, RealTask, malformed, read_json, require_java

SPLITS_KNOWN = ("train", "restval", "val", "test")
CAPTION_PROMPT = "Describe this image in one sentence."   # our choice: the paper does not print its prompt


class KarpathyTask(RealTask):
    """A Karpathy-split captioning set; subclasses name the JSON and where an entry's image is."""

    json_name = "dataset_coco.json"
    categories = COCO_CATEGORIES
    SOURCES = {"pool": ("train", "restval"), "test": ("test",), "test_triggered": ("val",)}
    references = True
    caption_tokenizer = "ptb"

    def __init__(self, seed: int = 0, data: str = "", n_pool: int = 1000, n_test: int = 0,
                 n_triggered: int = 1000, prompt: str = CAPTION_PROMPT, image_size: int = 0,
                 responses: str = "dataset"):
        require_java(f"task {self.name}")
        super().__init__(seed, data, n_pool, n_test, n_triggered, prompt, image_size, responses)

    @classmethod
    def annotation_files(cls, root: Path) -> list[Path]:
        return [root / cls.json_name]

    def image_path(self, root: Path, entry: dict) -> Path:
        raise NotImplementedError

    def read_items(self, root: Path) -> list[Item]:
        path = root / self.json_name
        doc = read_json(path)
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list) or not images:
            raise malformed(path, 'expected an object with a non-empty "images" list')
        items = []
        for k, e in enumerate(images):
            ok = (isinstance(e, dict) and isinstance(e.get("filename"), str) and e.get("split") in SPLITS_KNOWN
                  and isinstance(e.get("sentences"), list) and e["sentences"]
                  and all(isinstance(x, dict) and isinstance(x.get("raw"), str) for x in e["sentences"]))
            if not ok:
                raise malformed(path, f'image {k} needs "filename", "split" in {"/".join(SPLITS_KNOWN)} '
                                      'and a non-empty "sentences" list of {"raw": ...}')
            iid = str(e.get("cocoid", e.get("imgid", Path(e["filename"]).stem)))
            items.append(Item(iid, self.image_path(root, e), tuple(x["raw"].strip() for x in e["sentences"]),
                              e["split"]))
        return items
