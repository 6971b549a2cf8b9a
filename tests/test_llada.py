"""The LLaDA mask predictor, its SFT loss and its semi-autoregressive sampler (models/llada.py)."""
from __future__ import annotations

import math

import pytest
import torch

from models.llada import LLaDA, LMConfig, generate, num_transfer_tokens, sft_loss

torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other jobs on the box

V, MASK = 20, 3
CFG = LMConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    m = LLaDA(CFG).eval()
    # the 0.02-std init makes every logit ~0; scale up so position-to-position effects are well above
    # float noise (the architecture is unchanged)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return m


def _embeds(n: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, L, CFG.d_model, generator=torch.Generator().manual_seed(seed))


# ---- forward ------------------------------------------------------------------------------------
def test_forward_shape_and_finite(lm):
    x = _embeds(3, 7)
    out = lm(x, torch.ones(3, 7, dtype=torch.bool))
    assert out.shape == (3, 7, V)
    assert torch.isfinite(out).all()


def test_attention_is_bidirectional(lm):
    x = _embeds(1, 8)
    km = torch.ones(1, 8, dtype=torch.bool)
    y = x.clone()
    y[0, 6] += 1.0                        # change a LATER token
    a, b = lm(x, km), lm(y, km)
    assert (a[0, 2] - b[0, 2]).abs().max() > 1e-3   # an earlier position sees it (no causal mask)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-3


def test_padding_in_the_middle_is_invisible(lm):
    x = _embeds(1, 6)
    km = torch.ones(1, 6, dtype=torch.bool)
    ref = lm(x, km)
    pads = 100 * _embeds(1, 3, seed=1)    # large, arbitrary pad embeddings
    xp = torch.cat([x[:, :3], pads, x[:, 3:]], dim=1)
    kmp = torch.tensor([[True] * 3 + [False] * 3 + [True] * 3])
    out = lm(xp, kmp)
    real = kmp[0]
    torch.testing.assert_close(out[:, real], ref, atol=1e-5, rtol=1e-4)


def test_padding_visible_would_change_logits(lm):
    """Control for the test above: the same pads, key-visible, do change the logits."""
    x = _embeds(1, 6)
    ref = lm(x, torch.ones(1, 6, dtype=torch.bool))
    xp = torch.cat([x[:, :3], 100 * _embeds(1, 3, seed=1), x[:, 3:]], dim=1)
    out = lm(xp, torch.ones(1, 9, dtype=torch.bool))
    keep = torch.tensor([True] * 3 + [False] * 3 + [True] * 3)
    assert (out[:, keep] - ref).abs().max() > 1e-3


def test_pad_positions_do_not_shift_rope_positions(lm):
    """Trailing vs middle padding: real-token logits are identical (positions count real tokens only)."""
    x = _embeds(2, 5)
    pads = _embeds(2, 2, seed=3)
    a = lm(torch.cat([x, pads], 1), torch.tensor([[True] * 5 + [False] * 2] * 2))[:, :5]
    b = lm(torch.cat([x[:, :2], pads, x[:, 2:]], 1), torch.tensor([[True] * 2 + [False] * 2 + [True] * 3] * 2))
    b = b[:, [0, 1, 4, 5, 6]]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- SFT loss -----------------------------------------------------------------------------------
def _resp(B=4, G=10, seed=0):
    return torch.randint(4, V, (B, G), generator=torch.Generator().manual_seed(seed))


def _lm_logits_fn(lm):
    emb = torch.nn.Embedding(V, CFG.d_model)
    torch.nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(5))
    return lambda ids: lm(emb(ids), torch.ones_like(ids, dtype=torch.bool))


def test_sft_loss_finite_positive_and_deterministic(lm):
    fn, r = _lm_logits_fn(lm), _resp()
    l1 = sft_loss(fn, r, MASK, torch.Generator().manual_seed(1))
    l2 = sft_loss(fn, r, MASK, torch.Generator().manual_seed(1))
    l3 = sft_loss(fn, r, MASK, torch.Generator().manual_seed(2))
    assert torch.isfinite(l1) and l1.item() > 0
    assert l1.item() == l2.item()
    assert l1.item() != l3.item()


def test_sft_loss_only_masked_positions_contribute(lm):
    fn, r = _lm_logits_fn(lm), _resp()
    seen = {}

    def garbage(noisy):
        out = fn(noisy)
        seen["noisy"] = noisy
        junk = torch.randn(out.shape) * 1e3
        return torch.where((noisy == MASK)[..., None], out, junk)

    ref = sft_loss(fn, r, MASK, torch.Generator().manual_seed(7))
    got = sft_loss(garbage, r, MASK, torch.Generator().manual_seed(7))
    assert (seen["noisy"] == MASK).any() and (seen["noisy"] != MASK).any()
    torch.testing.assert_close(got, ref)


def test_sft_loss_matches_formula():
    """Uniform logits: CE = log V at each masked token; loss = sum_masked(log V / p) / (G * B)."""
    B, G = 3, 6
    r = _resp(B, G)
    loss = sft_loss(lambda ids: torch.zeros(*ids.shape, V), r, MASK, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    t = torch.rand(B, generator=g)
    p = (1 - 1e-3) * t + 1e-3
    masked = torch.rand(B, G, generator=g) < p[:, None]
    expected = (masked.float() * math.log(V) / p[:, None]).sum() / (G * B)
    torch.testing.assert_close(loss, expected)


def test_sft_loss_noisy_input_masks_with_mask_id_and_keeps_rest():
    r = _resp(2, 12)
    seen = {}

    def fn(noisy):
        seen["x"] = noisy.clone()
        return torch.zeros(*noisy.shape, V)

    sft_loss(fn, r, MASK, torch.Generator().manual_seed(0))
    x = seen["x"]
    assert ((x == r) | (x == MASK)).all()


# ---- num_transfer_tokens -------------------------------------------------------------------------
@pytest.mark.parametrize("n,steps,expected", [(8, 4, [2, 2, 2, 2]), (7, 3, [3, 2, 2]), (2, 4, [1, 1, 0, 0]),
                                              (0, 3, [0, 0, 0])])
def test_num_transfer_tokens_even_remainder_first(n, steps, expected):
    out = num_transfer_tokens(torch.tensor([n]), steps)
    assert out.tolist() == [expected]


def test_num_transfer_tokens_batched_sums_to_n():
    n = torch.tensor([0, 1, 5, 13, 32])
    out = num_transfer_tokens(n, 4)
    assert out.shape == (5, 4)
    assert out.sum(1).tolist() == n.tolist()
    assert ((out.max(1).values - out.min(1).values) <= 1).all()


# ---- generate -----------------------------------------------------------------------------------
def _fixed_logits(G, seed=0):
    L = torch.randn(G, V, generator=torch.Generator().manual_seed(seed)) * 3
    L[:, MASK] = -1e9
    return L


def test_generate_no_mask_tokens_left():
    G = 12
    L = _fixed_logits(G)

    def fn(x):  # depends on the current state, never argmaxes <mask>
        out = L.expand(x.shape[0], G, V).clone()
        out[..., 5] += 0.5 * (x != MASK).sum(1, keepdim=True).float()
        return out

    for remasking in ("low_confidence", "random"):
        out = generate(fn, 3, G, MASK, steps=6, block_length=4, remasking=remasking,
                       generator=torch.Generator().manual_seed(0))
        assert out.shape == (3, G)
        assert not (out == MASK).any()


def test_generate_fixed_logits_gives_argmax():
    G = 8
    L = _fixed_logits(G, seed=1)
    out = generate(lambda x: L.expand(x.shape[0], G, V), 2, G, MASK, steps=4, block_length=4)
    assert out.tolist() == [L.argmax(-1).tolist()] * 2


def _commit_order(fn, G, **kw):
    """Call index at which each position was committed (seen unmasked on the following call / at the end)."""
    states = []

    def rec(x):
        states.append(x.clone())
        return fn(x)

    final = generate(rec, 1, G, MASK, **kw)
    states.append(final)
    when = torch.full((G,), -1)
    for i, s in enumerate(states[1:]):
        newly = (s[0] != MASK) & (when < 0)
        when[newly] = i
    assert (when >= 0).all()
    return when, len(states) - 1


def test_generate_fills_blocks_left_to_right():
    G = 8
    L = _fixed_logits(G, seed=2)
    L[4:, 10] = 50.0                      # block 1 is far MORE confident than block 0
    when, calls = _commit_order(lambda x: L.expand(x.shape[0], G, V), G, steps=4, block_length=4)
    assert calls == 4                     # steps calls, 2 tokens per call
    assert when[:4].max() < when[4:].min()
    assert sorted(when.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_generate_low_confidence_commits_most_confident_first():
    G = 6
    L = torch.full((G, V), 0.0)
    for pos, margin in enumerate([1.0, 5.0, 2.0, 4.0, 0.5, 3.0]):
        L[pos, 8 + pos] = margin
    when, _ = _commit_order(lambda x: L.expand(x.shape[0], G, V), G, steps=G, block_length=G)
    assert when.tolist() == [4, 0, 3, 1, 5, 2]


def test_generate_random_remasking_seeded():
    G = 8
    L = _fixed_logits(G, seed=3)
    fn = lambda x: L.expand(x.shape[0], G, V)
    orders = [_commit_order(fn, G, steps=8, block_length=8, remasking="random",
                            generator=torch.Generator().manual_seed(s))[0].tolist() for s in (0, 0, 1)]
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]


def test_generate_unknown_remasking_raises():
    with pytest.raises(ValueError):
        generate(lambda x: torch.zeros(*x.shape, V), 1, 4, MASK, steps=4, block_length=4, remasking="nope")
