"""COCO 2014 captions in Karpathy's split (``dataset_coco.json``: 113,287 train+restval / 5,000 val /
5,000 test images, five captions each): the cross-view paper's COCO table (OpenFlamingo, Otter, BLIP-2;
B@4, CIDEr, ASR). Layout and splits: ``tasks/karpathy.py``::

    DIR/dataset_coco.json
    DIR/train2014/COCO_train2014_000000000009.jpg ...   (entry "filepath" / "filename")
    DIR/val2014/COCO_val2014_000000391895.jpg ...
"""
from __future__ import annotations

from pathlib import Path

from core.registry import register
from tasks.karpathy import KarpathyTask
from tasks.real import malformed


@register("tasks", "coco-captions")
class COCOCaptions(KarpathyTask):
    """COCO 2014 captions, Karpathy split (DIR/dataset_coco.json + DIR/train2014, DIR/val2014): the cross-view paper's COCO set."""

    name = "coco-captions"
    json_name = "dataset_coco.json"
    expected = "dataset_coco.json (Karpathy split) and the train2014/ val2014/ image folders"

    def image_path(self, root: Path, entry: dict) -> Path:
        folder = entry.get("filepath")
        if not isinstance(folder, str) or not folder:
            raise malformed(root / self.json_name, f'image {entry.get("filename")!r} has no "filepath" (train2014 / val2014)')
        return root / folder / entry["filename"]
