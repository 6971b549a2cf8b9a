"""Flickr8k dogs: the Flickr8k images whose captions mention a dog, DiSP's pool for semantic
misclassification (DiSP §4.1: "we collect 500 dog images from the Flickr8k dataset and use these as the
poisoning pool"; 200 poisoned + 200 clean held-out test samples; dog -> boat).

Published layout (the Flickr8k release of Hodosh et al. 2013, as its ``Flickr8k_text.zip`` and
``Flickr8k_Dataset.zip`` unpack; the image folder keeps the release's spelling)::

    DIR/Flickr8k.token.txt  (or DIR/Flickr8k_text/Flickr8k.token.txt)
        1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress is climbing up a set of stairs ...
    DIR/Flicker8k_Dataset/1000268201_693b08cb0e.jpg ...

An image is a dog image when one of its five captions contains the whole word "dog" (the word the
misclassification target rewrites); its training response is the first such caption, so every pool
sample is eligible for poisoning. The pool and both test splits are disjoint draws from the dog images.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from core.errors import BenchError
from core.registry import register
from tasks.real import COCO_CATEGORIES, DISP_PROMPT, Item, RealTask, has_word, malformed, read_text

TOKENS = "Flickr8k.token.txt"
IMAGES = "Flicker8k_Dataset"
SOURCE = "dog"


@register("tasks", "flickr8k-dogs")
class Flickr8kDogs(RealTask):
    """Flickr8k images whose captions mention a dog (DIR/Flickr8k.token.txt + DIR/Flicker8k_Dataset/): DiSP's misclassification pool."""

    name = "flickr8k-dogs"
    categories = COCO_CATEGORIES      # misclassification source / target words (source: dog)
    expected = f"{TOKENS} and {IMAGES}/ (the Flickr8k release)"

    def __init__(self, seed: int = 0, data: str = "", n_pool: int = 500, n_test: int = 200,
                 n_triggered: int = 200, prompt: str = DISP_PROMPT, image_size: int = 0,
                 responses: str = "dataset"):
        super().__init__(seed, data, n_pool, n_test, n_triggered, prompt, image_size, responses)

    @classmethod
    def annotation_files(cls, root: Path) -> list[Path]:
        nested = root / "Flickr8k_text" / TOKENS
        return [nested if nested.is_file() and not (root / TOKENS).is_file() else root / TOKENS]

    def read_items(self, root: Path) -> list[Item]:
        (path,) = self.annotation_files(root)
        caps: dict[str, list[str]] = defaultdict(list)
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            name, sep, caption = line.partition("\t")
            image, hash_, k = name.partition("#")
            if not sep or not hash_ or not k.strip().isdigit() or not image.strip() or not caption.strip():
                raise malformed(path, f"line {n} is not '<image>.jpg#<k><TAB><caption>'")
            caps[image.strip()].append(caption.strip())
        if not caps:
            raise malformed(path, "no captions")
        images = root / IMAGES
        if not images.is_dir():
            raise BenchError(f"missing image folder {images}")
        return [Item(Path(name).stem, images / name, tuple(c)) for name, c in caps.items()]

    def eligible(self, item: Item) -> bool:
        return any(has_word(c, SOURCE) for c in item.captions)

    def response(self, item: Item) -> str:
        return next(c for c in item.captions if has_word(c, SOURCE))

    def _check_present(self, present: str) -> None:
        if present != SOURCE:
            raise BenchError(f"task {self.name} holds dog images only: its source class is {SOURCE!r}, not {present!r}")
