"""Bootstrap CIs, rates and caption scores."""
from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from bench import metrics
from core.errors import BenchError

REFS = {
    "a": ["A dog runs on the green grass.", "a brown dog running in a park"],
    "b": ["two people ride bikes down a busy street"],
    "c": ["a cat sleeps on a red sofa"],
    "d": ["a man is cooking food in a small kitchen"],
    "e": ["children play football on a sunny beach"],
}


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    x = np.random.default_rng(1).normal(3.0, 1.0, size=200)
    lo, hi = metrics.bootstrap_ci(x, seed=5)
    assert lo < x.mean() < hi
    assert (lo, hi) == metrics.bootstrap_ci(x, seed=5)
    assert (lo, hi) != metrics.bootstrap_ci(x, seed=6)
    assert metrics.bootstrap_ci([2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])


def test_rate() -> None:
    r = metrics.rate([True] * 3 + [False])
    assert r["value"] == 75.0
    assert 0.0 <= r["ci"][0] <= 75.0 <= r["ci"][1] <= 100.0
    assert metrics.rate([]) == {"value": None, "ci": None}


def test_caption_scores_identical_vs_unrelated(capsys: pytest.CaptureFixture) -> None:
    same = metrics.caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    unrelated = metrics.caption_scores({k: "an airplane flies over snowy mountains" for k in REFS}, REFS)
    assert capsys.readouterr().out == ""  # pycocoevalcap's prints are suppressed
    assert same["bleu4"]["value"] > 0.9 and unrelated["bleu4"]["value"] < 0.05
    assert same["cider"]["value"] > 5 * max(unrelated["cider"]["value"], 0.1)
    for m in same.values():
        assert m["ci"][0] <= m["value"] <= m["ci"][1] + 1e-9


def test_caption_bleu_matches_pycocoevalcap_and_ci_brackets_it() -> None:
    outs = {"a": "a dog runs on grass", "b": "people ride a bike", "c": "a cat on a sofa",
            "d": "a woman in a kitchen", "e": "kids on a beach"}
    got = metrics.caption_scores(outs, REFS)
    gts = {k: [metrics.normalize_caption(r) for r in v] for k, v in REFS.items()}
    res = {k: [metrics.normalize_caption(v)] for k, v in outs.items()}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert got["bleu4"]["value"] == pytest.approx(score[3])
    stats = metrics._bleu_stats(res, gts)
    assert metrics._corpus_bleu(stats.sum(axis=0, keepdims=True))[0] == pytest.approx(score[3], rel=1e-9)
    lo, hi = got["bleu4"]["ci"]
    assert lo <= score[3] <= hi


def test_caption_scores_edge_cases() -> None:
    assert metrics.caption_scores({}, REFS)["cider"] == {"value": None, "ci": None}
    with pytest.raises(BenchError, match="no reference"):
        metrics.caption_scores({"zzz": "a dog"}, REFS)
    assert metrics.normalize_caption("A Dog, running!  Fast.") == "a dog running fast"


def test_paired_delta_uses_the_pairing():
    from bench.metrics import paired_delta
    before = [True, False] * 100
    after = [not b for b in before]                 # every item flips: -0 on average, but paired it is huge
    d = paired_delta(after, before)
    assert d["value"] == 0.0 and d["ci"][0] < -5 and d["ci"][1] > 5
    same = paired_delta(before, before)
    assert same == {"value": 0.0, "ci": [0.0, 0.0]}     # unpaired CIs would be ±7 points here
    worse = paired_delta([False] * 10 + before[10:], before)
    assert worse["value"] == -2.5 and worse["ci"][1] <= 0.0
    with pytest.raises(ValueError):
        paired_delta([True], [True, False])
