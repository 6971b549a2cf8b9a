"""DiSP: the Hutchinson saliency estimator, mask selection, the saliency's meaning, config, purify."""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.errors import BenchError
from bench.spec import DEFAULT_TEMPLATE, Decoding, Recipe, RunSpec
from defenses.base import DefenseContext
from defenses.disp import (DiSPConfig, DiSPDefense, DiSPNoMask, DiSPRandom, exact_saliency, fit_answer, saliency,
                           select_mask)
from models.base import Batch
from models.llada_v import LLaDAV, TinyConfig
from tasks.base import Sample
from tasks.synthetic import Tokenizer

torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other jobs on the box

# 32 px images, 8 px patches, one view -> 16 visual tokens; a short prompt budget keeps sequences short
CFG = TinyConfig(image_size=32, patch=8, max_prompt=8, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64,
                 enc_dim=32, enc_layers=2, enc_heads=2, view_size=0)
BL, GL = 4, 8  # block_length, gen_length of the saliency's first block


@contextmanager
def math_attention():
    """exact_saliency's double-backward JVP needs SDPA's math kernel on CPU (see
    test_exact_saliency_runs_with_default_attention_backend)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(rng.random((32, 32, 3), dtype=np.float32), "describe the image", "a dog", {"id": f"s{i}"})
            for i in range(n)]


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = LLaDAV(CFG, tok, DEFAULT_TEMPLATE).eval()
    # scale the LM up from its 0.02-std init so the saliency is far from uniform (architecture unchanged)
    with torch.no_grad():
        for p in m.lm.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return m


@pytest.fixture(scope="module")
def batch(model):
    return model.collate(_samples(2), with_response=False)


@pytest.fixture(scope="module")
def exact(model, batch):
    with math_attention():
        ex = exact_saliency(model, batch, BL, GL)
    assert ex.shape == (2, model.n_visual) and (ex >= 0).all() and ex.max() > 0
    return ex


def _rel(est, ex):
    return ((est - ex).norm() / ex.norm()).item()


def _ranks(x):
    return x.argsort(-1).argsort(-1).float()


def _spearman(a, b):
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


# ---- the Hutchinson estimator -------------------------------------------------------------------
def test_saliency_converges_to_exact(model, batch, exact):
    few = saliency(model, batch, BL, GL, n_probes=4, generator=torch.Generator().manual_seed(0))
    many = saliency(model, batch, BL, GL, n_probes=2000, generator=torch.Generator().manual_seed(1))
    assert few.shape == many.shape == exact.shape
    err_few, err_many = _rel(few, exact), _rel(many, exact)
    assert err_many < 0.1, err_many
    assert err_many < err_few
    assert (many.argmax(-1) == exact.argmax(-1)).all()
    assert (_spearman(many, exact) > 0.9).all()


def test_saliency_seeded_and_nonnegative(model, batch):
    a = saliency(model, batch, BL, GL, n_probes=3, generator=torch.Generator().manual_seed(5))
    b = saliency(model, batch, BL, GL, n_probes=3, generator=torch.Generator().manual_seed(5))
    c = saliency(model, batch, BL, GL, n_probes=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all()


def test_batched_and_looped_estimators_agree_in_expectation(model, batch, exact):
    n = 1000
    bat = saliency(model, batch, BL, GL, n_probes=n, generator=torch.Generator().manual_seed(2))
    loop = saliency(model, batch, BL, GL, n_probes=n, generator=torch.Generator().manual_seed(3), batched=False)
    assert _rel(bat, exact) < 0.15
    assert _rel(loop, exact) < 0.15
    assert (bat.argmax(-1) == loop.argmax(-1)).all()


def test_saliency_of_a_sample_does_not_depend_on_its_batchmates(model, exact):
    """Samples are independent sequences: the exact score of sample 0 alone equals its score in the pair."""
    alone = model.collate(_samples(2)[:1], with_response=False)
    with math_attention():
        ex0 = exact_saliency(model, alone, BL, GL)
    torch.testing.assert_close(ex0[0], exact[0], rtol=1e-4, atol=1e-8)


def test_exact_saliency_runs_with_default_attention_backend(model, batch):
    exact_saliency(model, batch, BL, GL)


# ---- the saliency's meaning: a planted one-token trigger ----------------------------------------
class OneTokenModel:
    """Implements what `saliency` calls; the answer logits depend on visual token `hot` only."""

    mask_id = 0

    def __init__(self, T=10, d=6, G=8, V=12, hot=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.hot, self.G, self.V = hot, G, V
        self.W = torch.randn(G * V, d, generator=g)
        self.e_mask = torch.randn(d, generator=g)
        self.n_visual = T

    def visual_embeds(self, images):
        return images                                   # the "image" is its (B, T, d) visual embeddings

    def mask_embedding(self):
        return self.e_mask

    def prompt_embeds(self, batch, visual=None, visual_mask=None):
        if visual is None:
            visual = self.visual_embeds(batch.images)
        if visual_mask is not None:
            visual = torch.where(visual_mask[..., None], self.e_mask.expand_as(visual), visual)
        return visual

    def answer_logits(self, prompt_embeds, key_mask, answer_ids):
        B = prompt_embeds.shape[0]
        z = 3 * torch.tanh(prompt_embeds[:, self.hot] @ self.W.T)
        return z.view(B, self.G, self.V)


def _fake_batch(B=5, T=10, d=6, seed=1):
    imgs = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))
    return Batch(imgs, torch.zeros(B, 4, dtype=torch.long), torch.ones(B, 4, dtype=torch.bool),
                 torch.arange(T).repeat(B, 1))


@pytest.mark.parametrize("hot", [3, 7])
def test_planted_token_has_the_highest_saliency(hot):
    m, b = OneTokenModel(hot=hot), _fake_batch()
    for batched in (True, False):
        s = saliency(m, b, block_length=4, gen_length=8, n_probes=6, generator=torch.Generator().manual_seed(0),
                     batched=batched)
        assert (s.argmax(-1) == hot).all()
        others = torch.cat([s[:, :hot], s[:, hot + 1:]], 1)
        assert (s[:, hot] > 0).all() and torch.equal(others, torch.zeros_like(others))
    ex = exact_saliency(m, b, block_length=4, gen_length=8)
    assert (ex.argmax(-1) == hot).all()
    # and DiSP's mask selection holds exactly that token once it may mask one token
    vmask = select_mask(s, 0.1, "saliency")
    assert vmask.sum(1).tolist() == [1] * 5 and vmask[:, hot].all()


def test_saliency_reads_only_the_first_block(tok):
    """A token that moves only the logits AFTER the first block has zero saliency."""
    m = OneTokenModel(hot=3)
    base = m.answer_logits

    def logits(pe, km, ans):
        z = base(pe, km, ans).clone()
        z[:, 4:] = z[:, 4:] + 5 * torch.tanh(pe[:, 8].sum(-1))[:, None, None] * torch.arange(m.V).float()
        return z

    m.answer_logits = logits
    s = saliency(m, _fake_batch(), block_length=4, gen_length=8, n_probes=4,
                 generator=torch.Generator().manual_seed(0))
    assert (s[:, 8] == 0).all() and (s[:, 3] > 0).all()


# ---- select_mask --------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,T", [(0.3, 64), (0.3, 16), (0.5, 10), (0.05, 16), (0.0, 16), (0.99, 7)])
def test_select_mask_count(ratio, T):
    scores = torch.rand(3, T, generator=torch.Generator().manual_seed(0))
    k = math.floor(ratio * T)
    for mode in ("saliency", "random"):
        m = select_mask(scores, ratio, mode, torch.Generator().manual_seed(1))
        assert m.dtype == torch.bool and m.shape == (3, T)
        assert m.sum(1).tolist() == [k] * 3


def test_select_mask_saliency_picks_the_top_scores():
    scores = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    m = select_mask(scores, 0.3, "saliency")
    k = 19
    for row, mrow in zip(scores, m):
        top = set(row.argsort(descending=True)[:k].tolist())
        assert set(mrow.nonzero().flatten().tolist()) == top
        assert row[mrow].min() > row[~mrow].max()


def test_select_mask_random_is_seeded_and_ignores_scores():
    scores = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    a = select_mask(scores, 0.3, "random", torch.Generator().manual_seed(7))
    b = select_mask(torch.zeros(4, 64), 0.3, "random", torch.Generator().manual_seed(7))
    c = select_mask(scores, 0.3, "random", torch.Generator().manual_seed(8))
    sal = select_mask(scores, 0.3, "saliency")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, sal)


def test_select_mask_none():
    assert select_mask(torch.rand(2, 16), 0.3, "none") is None


# ---- config -------------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(BenchError, match="saliency"):
        DiSPConfig(mask="everything")
    with pytest.raises(BenchError):
        DiSPDefense(mask="everything")
    for bad in (1.0, -0.1):
        with pytest.raises(BenchError):
            DiSPConfig(mask_ratio=bad)
    assert DiSPDefense().cfg.mask == "saliency"
    assert DiSPNoMask().cfg.mask == "none" and DiSPRandom().cfg.mask == "random"


# ---- purify end to end (tiny) -------------------------------------------------------------------
def _ctx(spec, calls):
    return DefenseContext(spec=spec, finetune=lambda m, s, **kw: calls.append((m, s, kw)) or [],
                          base_model=lambda: None, log=lambda _: None)


@pytest.mark.parametrize("defense", [DiSPDefense, DiSPNoMask, DiSPRandom])
def test_purify_relabels_and_recovers(model, defense):
    data = [s.with_(meta={**s.meta, "poisoned": i == 0}) for i, s in enumerate(_samples(5, seed=3))]
    dec = Decoding(steps=4, gen_length=8, block_length=4)
    spec = RunSpec(decoding=dec, trainable="projector", recipe=Recipe(epochs=10), seed=0)
    calls = []
    d = defense(n_probes=2, batch_size=2)
    out = d.purify(model, data, _ctx(spec, calls))
    assert out is model
    assert len(calls) == 1
    m, purified, kw = calls[0]
    assert m is model
    assert kw["epochs"] == 2 and kw["trainable"] == "projector"       # round(0.2 * 10); the victim's parts
    assert purified == d.purified and len(purified) == 5
    for s, p in zip(data, purified):                                  # only the response is relabelled
        assert np.array_equal(s.image, p.image) and s.prompt == p.prompt and s.meta == p.meta
    texts = [p.response for p in purified]
    assert d.report["n_train"] == 5 and d.report["recovery_epochs"] == 2
    assert d.report["recovery_trainable"] == "projector"
    assert d.report["relabelled_changed"] == sum(t != s.response for t, s in zip(texts, data))
    if defense is DiSPNoMask:
        assert "mask_frequency" not in d.report
        raw = model.decode(model.generate(model.collate(data, with_response=False), dec))
        ref = [fit_answer(model, t, dec.gen_length) for t in raw]   # the random model fills every position
        assert texts == [t for t, _ in ref]
        assert d.report["relabelled_truncated"] == sum(cut for _, cut in ref)
    else:
        freq = torch.tensor(d.report["mask_frequency"])
        assert freq.shape == (model.n_visual,) and ((freq >= 0) & (freq <= 1)).all()
        assert math.isclose(float(freq.sum()), 4.0, rel_tol=1e-6)     # floor(0.3 * 16) tokens per input


def test_purify_saliency_generates_with_the_selected_mask(model):
    """One chunk: the relabelled responses are generate(visual_mask=select_mask(saliency(...)))."""
    data = _samples(3, seed=4)
    dec = Decoding(steps=4, gen_length=8, block_length=4)
    spec = RunSpec(decoding=dec, seed=5)
    d = DiSPDefense(n_probes=3, batch_size=8, mask_ratio=0.5, recovery_frac=0.1)
    calls = []
    d.purify(model, data, _ctx(spec, calls))
    assert calls[0][2]["trainable"] == spec.trainable and calls[0][2]["epochs"] == 2  # round(0.1 * 20)
    g = torch.Generator().manual_seed(5)
    b = model.collate(data, with_response=False)
    scores = saliency(model, b, dec.block_length, dec.gen_length, 3, 5, g)
    vmask = select_mask(scores, 0.5, "saliency", g)
    raw = model.decode(model.generate(b, dec, visual_mask=vmask))
    assert [p.response for p in d.purified] == [fit_answer(model, t, dec.gen_length)[0] for t in raw]
    torch.testing.assert_close(torch.tensor(d.report["mask_frequency"]), vmask.float().mean(0))


def test_a_relabel_without_an_end_token_is_truncated_to_fit():
    from tasks.synthetic import Tokenizer

    class M:
        tok = Tokenizer()
    full = " ".join(["dog"] * 8)
    text, cut = fit_answer(M, full, gen_length=8)
    assert cut and text == " ".join(["dog"] * 7)
    assert fit_answer(M, "a red dog", gen_length=8) == ("a red dog", False)
