"""Does the victim see what an object is? Linear-probe readability of the object category of
single-object scenes in the frozen encoder's features and in the projected visual tokens, beside how
often the model's own captions name it. Uses the cached base (or clean) stage of the default cell
(train it with `bench run`); probes are fitted on the object probes of three other task seeds and
scored on this seed's.

    python benchmarks/category_readability.py [--model-state base|clean] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cache import ArtifactCache  # noqa: E402
from bench.evaluate import generate_texts, names_object  # noqa: E402
from bench.pipeline import Cell, make_spec  # noqa: E402
from models.llada_v import views  # noqa: E402
from tasks.synthetic import CATEGORIES, SyntheticTask  # noqa: E402


@torch.no_grad()
def features(model, samples) -> dict[str, np.ndarray]:
    images = torch.from_numpy(np.stack([s.image for s in samples]))
    v = views(images, model.cfg.view_size)
    n_views = v.shape[1]
    enc = model.vision_tower(v.reshape(-1, *v.shape[2:])).reshape(len(samples), n_views, -1, model.cfg.enc_dim)
    proj = model.mm_projector(enc.reshape(len(samples), -1, model.cfg.enc_dim))
    return {"encoder, first view's tokens": enc[:, 0].flatten(1).numpy(),
            "encoder, mean token of each view": enc.mean(2).flatten(1).numpy(),
            "projected visual tokens, mean of each view": proj.reshape(len(samples), n_views, -1, proj.shape[-1]).mean(2).flatten(1).numpy()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-state", default="base", choices=("base", "clean"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cell = Cell(make_spec(defense="none", seed=a.seed), ArtifactCache(), log=lambda _: None)
    model = cell.model_from(getattr(cell, a.model_state)()["state"])
    train = [s for k in (1, 2, 3) for s in SyntheticTask(seed=a.seed + 1000 * k).object_probe()]
    test = cell.task.object_probe()
    cat = lambda ss: [s.meta["scene"]["objects"][0]["category"] for s in ss]
    ftr, fte = features(model, train), features(model, test)
    print(f"category of {len(test)} single-object scenes ({a.model_state} model, seed {a.seed}); chance {100 / len(CATEGORIES):.1f}%")
    for name in ftr:
        clf = LogisticRegression(max_iter=3000).fit(ftr[name], cat(train))
        print(f"  linear probe, {name}: {100 * clf.score(fte[name], cat(test)):.1f}%")
    outs = generate_texts(model, test, cell.spec.decoding, a.seed)
    named = [names_object(o, c, CATEGORIES) for o, c in zip(outs, cat(test))]
    said = {c: sum(o.split().count(c) for o in outs) for c in CATEGORIES}
    print(f"  the model's captions name it: {100 * np.mean(named):.1f}%  (category words it uses: {said})")


if __name__ == "__main__":
    main()
