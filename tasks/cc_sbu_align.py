"""CC-SBU-Align: MiniGPT-4's 3.4 k aligned image-description pairs, DiSP's pool for content insertion and
targeted refusal (DiSP §4.1: 1,000 sampled examples poisoned at 20%; 200 poisoned + 200 clean held-out
test samples).

Published layout (read in Vision-CAIR/MiniGPT-4: ``minigpt4/datasets/builders/image_text_pair_builder.py``
``CCSBUAlignBuilder`` — annotations ``<storage>/filter_cap.json``, images ``<storage>/image``;
``datasets/datasets/cc_sbu_dataset.py`` ``CCSBUAlignDataset`` — image file ``{image_id}.jpg``;
``datasets/datasets/base_dataset.py`` — the JSON is an object whose ``"annotations"`` list holds the
items)::

    DIR/filter_cap.json    {"annotations": [{"image_id": "2", "caption": "The image shows ..."}, ...]}
    DIR/image/2.jpg ...

Every sample is the instruction ``prompt`` (DiSP's "Describe this image in detail.") answered by the
pair's description. The pool, the clean test and the triggered test are disjoint draws from all pairs.
"""
from __future__ import annotations

from pathlib import Path

from core.errors import BenchError
from core.registry import register
from tasks.real import DISP_PROMPT, Item, RealTask, malformed, read_json

ANNOTATIONS = "filter_cap.json"
IMAGES = "image"


@register("tasks", "cc-sbu-align")
class CCSBUAlign(RealTask):
    """CC-SBU-Align (MiniGPT-4) from DIR/filter_cap.json + DIR/image/: DiSP's insertion / refusal pool."""

    name = "cc-sbu-align"
    expected = f"{ANNOTATIONS} and {IMAGES}/ (MiniGPT-4's cc_sbu_align release)"

    def __init__(self, seed: int = 0, data: str = "", n_pool: int = 1000, n_test: int = 200,
                 n_triggered: int = 200, prompt: str = DISP_PROMPT, image_size: int = 0,
                 responses: str = "dataset"):
        super().__init__(seed, data, n_pool, n_test, n_triggered, prompt, image_size, responses)

    @classmethod
    def annotation_files(cls, root: Path) -> list[Path]:
        return [root / ANNOTATIONS]

    def read_items(self, root: Path) -> list[Item]:
        path = root / ANNOTATIONS
        doc = read_json(path)
        anns = doc.get("annotations") if isinstance(doc, dict) else None
        if not isinstance(anns, list) or not anns:
            raise malformed(path, 'expected an object with a non-empty "annotations" list')
        images = root / IMAGES
        if not images.is_dir():
            raise BenchError(f"missing image folder {images}")
        items = []
        for k, a in enumerate(anns):
            if not isinstance(a, dict) or not isinstance(a.get("image_id"), (str, int)) \
                    or not isinstance(a.get("caption"), str) or not a["caption"].strip():
                raise malformed(path, f'annotation {k} needs a string "image_id" and a non-empty "caption"')
            iid = str(a["image_id"])
            items.append(Item(iid, images / f"{iid}.jpg", (a["caption"].strip(),)))
        return items
