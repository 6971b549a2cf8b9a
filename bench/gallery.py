"""`bench triggers`: what every attack does to an image (the DiSP paper's Figure 5, for all attacks).

Writes triggers.png (one clean test image, its triggered copy under each attack, and the amplified
difference for the subtle triggers) and trigger_stats.{csv,md}: mean L-inf / L2 distance between
clean and triggered test images per attack, the numbers that say a subtle trigger stayed subtle.
Learned triggers are fitted through the same cached `trigger` stage a run uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from attacks.base import triggered
from bench.cache import ArtifactCache
from bench.pipeline import Cell, make_spec

SUBTLE = ("lowfreq", "wanet", "inputaware")   # attacks whose difference image is shown amplified


def fitted_triggers(attacks: Sequence[str], seed: int, cache: ArtifactCache, log: Callable[[str], None] = print):
    """(cell, fitted trigger) per attack, on the default task and model (nothing but the trigger is trained)."""
    out = {}
    for name in attacks:
        cell = Cell(make_spec(attack=name, defense="none", seed=seed), cache, log)
        out[name] = (cell, cell.fitted_trigger())
    return out


def distances(clean: Sequence, trig: Sequence) -> dict:
    """Mean per-image L-inf and L2 (pixels in [0, 1], over H x W x 3) and the mean |delta| per pixel."""
    d = np.stack([t.image - c.image for c, t in zip(clean, trig)]).reshape(len(clean), -1)
    return {"linf": float(np.abs(d).max(1).mean()), "l2": float(np.linalg.norm(d, axis=1).mean()),
            "mean_abs": float(np.abs(d).mean())}


def trigger_gallery(attacks: Sequence[str], out_dir: Path, seed: int = 0, cache: ArtifactCache | None = None,
                    image_index: int = 0, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write the gallery PNG and the distance table; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = fitted_triggers(attacks, seed, cache or ArtifactCache(), log)
    rows, shown = [], {}
    for name, (cell, trig) in cells.items():
        clean = cell.target.test_inputs(cell.task)
        trig_inputs = triggered(clean, trig, seed)
        rows.append({"attack": name, **distances(clean, trig_inputs),
                     "prompt_changed": float(np.mean([c.prompt != t.prompt for c, t in zip(clean, trig_inputs)]))})
        shown[name] = (clean[image_index], trig_inputs[image_index])
    stats = pd.DataFrame(rows).set_index("attack")
    stats.to_csv(out_dir / "trigger_stats.csv", float_format="%.4f")
    (out_dir / "trigger_stats.md").write_text(
        stats.rename(columns={"linf": "mean L∞", "l2": "mean L2", "mean_abs": "mean |δ|",
                              "prompt_changed": "prompt changed"}).to_markdown(floatfmt=".3f") + "\n")

    n = len(shown)
    fig = Figure(figsize=(1.9 * (n + 1), 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n + 1, squeeze=False)
    first = next(iter(shown.values()))[0]
    axes[0, 0].imshow(np.clip(first.image, 0, 1), interpolation="nearest")
    axes[0, 0].set_title("clean", fontsize=9)
    axes[0, 0].set_xlabel(first.prompt, fontsize=6)
    for j, (name, (c, t)) in enumerate(shown.items(), start=1):
        axes[0, j].imshow(np.clip(t.image, 0, 1), interpolation="nearest")
        axes[0, j].set_title(name, fontsize=9)
        axes[0, j].set_xlabel(t.prompt if t.prompt != c.prompt else "", fontsize=6)
        diff = np.abs(t.image - c.image).max(-1)
        if name in SUBTLE and diff.max() > 0:
            axes[1, j].imshow(diff / diff.max(), cmap="magma", interpolation="nearest")
            axes[1, j].set_title(f"|Δ| ×{1 / diff.max():.0f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    fig.suptitle(f"triggers on one clean test image (seed {seed}); bottom: amplified difference of the subtle ones",
                 fontsize=9)
    fig.tight_layout()
    png = out_dir / "triggers.png"
    fig.savefig(png, dpi=130)
    return {"png": png, "csv": out_dir / "trigger_stats.csv", "md": out_dir / "trigger_stats.md"}
