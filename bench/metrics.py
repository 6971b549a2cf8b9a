"""Metric aggregation with percentile-bootstrap confidence intervals: rates (CP accuracy, ASR) and
caption scores (BLEU-4, CIDEr via pycocoevalcap's pure-Python scorers; texts tokenized by our Java-free
normalizer on the embedded task, by pycocoevalcap's PTB tokenizer — Java — on real captioning sets).

Every metric is reported as ``{"value": v, "ci": [lo, hi]}``. Scales: rates are percent (0-100);
BLEU-4 is in 0-1 and CIDEr roughly 0-10, exactly as pycocoevalcap returns them.
"""
from __future__ import annotations

import contextlib
import io
import re
import string
from typing import Iterator, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider

from core.errors import BenchError

# Resample at most this many numbers at once, so a large eval set doesn't need n_boot * n memory.
_CHUNK = 2_000_000


def _boot_indices(rng: np.random.Generator, n: int, n_boot: int, width: int = 1) -> Iterator[np.ndarray]:
    """Yield (rows, n) index matrices of bootstrap resamples, chunked so rows * n * width stays bounded."""
    rows = max(1, _CHUNK // max(n * width, 1))
    done = 0
    while done < n_boot:
        b = min(rows, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) CI of the mean; deterministic for a given seed."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d sequence")
    if not 0.0 < alpha < 1.0 or n_boot < 1:
        raise ValueError("need 0 < alpha < 1 and n_boot >= 1")
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[idx].mean(axis=1) for idx in _boot_indices(rng, x.size, n_boot)])
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _metric(value: float | None, ci: tuple[float, float] | None) -> dict:
    """The record's metric shape."""
    return {"value": None if value is None else float(value), "ci": None if ci is None else [float(ci[0]), float(ci[1])]}


def point(value: float) -> dict:
    """A metric with no interval (e.g. a minimum over categories)."""
    return _metric(value, None)


def paired_delta(after: Sequence[bool], before: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict:
    """Difference of two accuracies on the same items (after - before, in percentage points) with a
    paired bootstrap CI: each resample draws item indices once and scores both models on them."""
    a = np.asarray(list(after), dtype=np.float64)
    b = np.asarray(list(before), dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_delta needs two equal-length 1-d sequences, got {a.shape} and {b.shape}")
    if a.size == 0:
        return _metric(None, None)
    d = 100.0 * (a - b)
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    return _metric(d.mean(), (lo, hi))


def rate(flags: Sequence[bool], n_boot: int = 1000, seed: int = 0) -> dict:
    """Percentage of True flags (0-100) with a bootstrap CI; value/ci None for no samples."""
    x = np.asarray(list(flags), dtype=np.float64)
    if x.size == 0:
        return _metric(None, None)
    lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return _metric(100.0 * x.mean(), (100.0 * lo, 100.0 * hi))


_PUNCT = re.compile("[" + re.escape(string.punctuation.replace("'", "")) + "]")


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace-tokenize: our Java-free stand-in for PTB tokenizing."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def ptb_tokenize(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1: lowercased, punctuation tokens dropped), the
    tokenization every COCO-style caption score uses; needs Java (a BenchError naming it otherwise)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from tasks.real import require_java
    require_java("caption scoring")
    keys = list(texts)
    # empty texts (abstentions) would shift CoreNLP's line-per-caption output: tokenize a stand-in
    blank = "<empty>"
    out = PTBTokenizer().tokenize({k: [{"caption": t if t.strip() else blank} for t in texts[k]] for k in keys})
    return {k: ["" if not t.strip() else tok for t, tok in zip(texts[k], out.get(k, [""] * len(texts[k])))] for k in keys}


def _quiet(fn, *args, **kwargs):
    """Call a pycocoevalcap scorer with its stdout chatter suppressed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _bleu_stats(res: dict[str, list[str]], gts: dict[str, list[str]], n: int = 4) -> np.ndarray:
    """Per-image BLEU sufficient statistics (testlen, closest reflen, guess[1..n], correct[1..n]),
    cooked by pycocoevalcap's BleuScorer so they match what ``Bleu.compute_score`` sums."""
    scorer = BleuScorer(n=n)
    for k in res:
        scorer += (res[k][0], gts[k])
    rows = []
    for comps in scorer.ctest:
        testlen = comps["testlen"]
        # the 'closest' effective reference length, as BleuScorer._single_reflen computes it
        reflen = min((abs(r - testlen), r) for r in comps["reflen"])[1]
        rows.append([testlen, reflen, *comps["guess"], *comps["correct"]])
    return np.asarray(rows, dtype=np.float64)


def _corpus_bleu(totals: np.ndarray, n: int = 4) -> np.ndarray:
    """Corpus BLEU-n from summed statistics (one row per bootstrap replicate), pycocoevalcap's formula."""
    small, tiny = 1e-9, 1e-15
    testlen, reflen = totals[:, 0], totals[:, 1]
    guess, correct = totals[:, 2:2 + n], totals[:, 2 + n:2 + 2 * n]
    bleu = np.prod((correct + tiny) / (guess + small), axis=1) ** (1.0 / n)
    ratio = (testlen + tiny) / (reflen + small)
    return np.where(ratio < 1, bleu * np.exp(1 - 1 / ratio), bleu)


def caption_scores(outputs: dict[str, str], references: dict[str, list[str]],
                   n_boot: int = 1000, seed: int = 0, tokenizer: str = "simple") -> dict:
    """Corpus BLEU-4 (0-1) and CIDEr (~0-10) of generated captions against references, with bootstrap CIs.

    Texts are tokenized by ``normalize_caption`` (tokenizer "simple") or pycocoevalcap's PTB tokenizer
    ("ptb": Java; the COCO-caption protocol, used on real captioning sets). BLEU-4 is pycocoevalcap's corpus score; its CI
    resamples images and recomputes the corpus score from per-image n-gram statistics (so the CI
    brackets the corpus value, which a CI of mean sentence-BLEU would not). CIDEr's corpus score is the
    mean of per-image scores; its CI resamples those (idf held fixed at the full set's). CIDEr's idf
    comes from the references scored together, so it needs several images and is only comparable
    across runs that score the same reference set.
    """
    if not outputs:
        return {"bleu4": _metric(None, None), "cider": _metric(None, None)}
    missing = sorted(set(outputs) - set(references))
    if missing:
        raise BenchError(f"no reference captions for {len(missing)} output(s), e.g. {missing[:3]}")
    ids = sorted(outputs)
    if tokenizer == "ptb":
        res = ptb_tokenize({i: [outputs[i]] for i in ids})
        gts = ptb_tokenize({i: list(references[i]) for i in ids})
    elif tokenizer == "simple":
        res = {i: [normalize_caption(outputs[i])] for i in ids}
        gts = {i: [normalize_caption(r) for r in references[i]] for i in ids}
    else:
        raise BenchError(f"unknown caption tokenizer {tokenizer!r} (valid: simple, ptb)")
    empty = [i for i in ids if not gts[i]]
    if empty:
        raise BenchError(f"empty reference list for {len(empty)} image(s), e.g. {empty[:3]}")

    bleu, _ = _quiet(Bleu(4).compute_score, gts, res, verbose=0)
    bleu4 = float(bleu[3])
    stats = _bleu_stats(res, gts)
    rng = np.random.default_rng(seed)
    reps = np.concatenate([_corpus_bleu(stats[idx].sum(axis=1)) for idx in _boot_indices(rng, len(ids), n_boot, stats.shape[1])])
    bleu_ci = tuple(np.percentile(reps, [2.5, 97.5]))

    cider, per_image = _quiet(Cider().compute_score, gts, res)
    cider_ci = bootstrap_ci(per_image, n_boot=n_boot, seed=seed)
    return {"bleu4": _metric(bleu4, bleu_ci), "cider": _metric(float(cider), cider_ci)}
