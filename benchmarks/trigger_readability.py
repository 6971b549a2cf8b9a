"""Where does each trigger get lost? Linear-probe readability of clean vs triggered test images
(5-fold CV logistic regression) in (a) the projected visual tokens and (b) the LM's hidden state at
answer position 0 with the answer fully masked, plus (c) p(first target token at position 0) on clean
and triggered inputs. Uses the cached stages of the default cell (train them with `bench run`).

    python benchmarks/trigger_readability.py --model-state base --attack noise --attack blended
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from attacks.base import triggered
from bench.cache import ArtifactCache
from bench.pipeline import Cell, make_spec


@torch.no_grad()
def features(model, inputs) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(flattened projected visual tokens, LM hidden state at answer position 0, answer-0 probs)."""
    grab = {}
    hook = model.lm.norm.register_forward_pre_hook(lambda mod, inp: grab.__setitem__("x", inp[0]))
    try:
        batch = model.collate(inputs, with_response=False)
        vis = model.visual_embeds(batch.images)
        pe = model.prompt_embeds(batch)
        answer = torch.full((len(inputs), 32), model.mask_id, dtype=torch.long)
        probs = model.answer_logits(pe, batch.key_mask, answer)[:, 0].softmax(-1)
    finally:
        hook.remove()
    return vis.flatten(1).numpy(), grab["x"][:, pe.shape[1]].numpy(), probs


def probe(x: np.ndarray, y: np.ndarray) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(clf, x, y, cv=5).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", action="append", required=True)
    ap.add_argument("--model-state", choices=("base", "backdoored"), default="base")
    ap.add_argument("--target", default="insertion")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache = ArtifactCache()
    print("attack | visual tokens | LM answer pos 0 | p(target@0) clean | p(target@0) triggered")
    for attack in args.attack:
        cell = Cell(make_spec(attack=attack, target=args.target, defense="none", seed=args.seed), cache,
                    log=lambda m: None)
        model = cell.model_from((cell.base() if args.model_state == "base" else cell.backdoored())["state"])
        clean = cell.target.test_inputs(cell.task)
        trig = triggered(clean, cell.fitted_trigger(), args.seed)
        (v0, h0, p0), (v1, h1, p1) = features(model, clean), features(model, trig)
        first = model.tok.encode(cell.target.rewrite(clean[0]))[0]
        y = np.r_[np.zeros(len(clean)), np.ones(len(trig))]
        print(f"{attack} | {probe(np.concatenate([v0, v1]), y):.3f} | {probe(np.concatenate([h0, h1]), y):.3f} | "
              f"{float(p0[:, first].mean()):.3f} | {float(p1[:, first].mean()):.3f}")


if __name__ == "__main__":
    main()
