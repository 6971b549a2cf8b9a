"""Flickr30k captions in Karpathy's split (``dataset_flickr30k.json``: 29,000 train / 1,014 val /
1,000 test images, five captions each): the cross-view paper's Flickr30k table. Layout and splits:
``tasks/karpathy.py``::

    DIR/dataset_flickr30k.json
    DIR/flickr30k-images/1000092795.jpg ...   (the folder the Flickr30k image archive unpacks to)
"""
from __future__ import annotations

from pathlib import Path

from core.registry import register
from tasks.karpathy import KarpathyTask

IMAGES = "flickr30k-images"


@register("tasks", "flickr30k")
class Flickr30k(KarpathyTask):
    """Flickr30k captions, Karpathy split (DIR/dataset_flickr30k.json + DIR/flickr30k-images/): the cross-view paper's Flickr30k set."""

    name = "flickr30k"
    json_name = "dataset_flickr30k.json"
    expected = f"dataset_flickr30k.json (Karpathy split) and {IMAGES}/"

    def image_path(self, root: Path, entry: dict) -> Path:
        return root / IMAGES / entry["filename"]
