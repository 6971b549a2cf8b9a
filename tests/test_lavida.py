"""LaViDa tiny: its own differences from LLaDA-V (pooled views, complementary masking, Prefix-DLM with a
prompt cache, the shift schedule) and the paper's cell settings as recorded defaults."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.pipeline import make_spec
from bench.spec import DEFAULT_TEMPLATE, Decoding
from core.errors import BenchError
from models.lavida import LaViDa, LaViDaConfig, complementary_loss, pool_views, shifted_transfer_counts
from models.llada import num_transfer_tokens
from tasks.synthetic import SyntheticTask

torch.set_num_threads(1)

CFG = LaViDaConfig(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, enc_dim=32, enc_layers=2, enc_heads=2)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=0, n_base=20, n_pool=40, n_test=8, n_mc=8, n_encoder=20)


@pytest.fixture(scope="module")
def model(task):
    torch.manual_seed(0)
    m = LaViDa(CFG, task.tokenizer(), DEFAULT_TEMPLATE).eval()
    for p in m.parameters():          # a sharper random model, so that argmax ties cannot hide a difference
        p.data.mul_(8.0) if p.dim() > 1 else None
    return m


def test_pool_views_is_2d_bilinear_per_view():
    x = torch.randn(2, 5 * 16, 8)
    out = pool_views(x, n_views=5, pool_side=2)
    assert out.shape == (2, 5 * 4, 8)
    # 4 x 4 -> 2 x 2 bilinear (align_corners=False) averages each 2 x 2 block, view by view
    grid = x.reshape(2, 5, 4, 4, 8)
    blocks = grid.reshape(2, 5, 2, 2, 2, 2, 8).mean((3, 5)).reshape(2, 20, 8)
    assert torch.allclose(out, blocks, atol=1e-6)


def test_model_reads_pooled_views(model, task):
    assert model.n_visual == 5 * 4
    batch = model.collate(task.pool()[:2], gen_length=32)
    assert (batch.ids == task.tokenizer().image_id).sum(1).tolist() == [20, 20]
    assert model.visual_embeds(batch.images).shape == (2, 20, CFG.d_model)


@pytest.mark.parametrize("shift", [1.0, 0.33, 3.0])
def test_shift_schedule_commits_every_token(shift):
    n = torch.tensor([32, 7, 0])
    k = shifted_transfer_counts(n, 16, shift)
    assert k.shape == (3, 16) and k.sum(1).tolist() == [32, 7, 0] and (k >= 0).all()


def test_shift_below_one_commits_more_tokens_early():
    n = torch.tensor([32])
    early = lambda s: int(shifted_transfer_counts(n, 16, s)[0, :8].sum())
    assert early(0.33) > early(1.0) > early(3.0)
    assert shifted_transfer_counts(n, 16, 1.0).tolist() == num_transfer_tokens(n, 16).tolist()


def test_complementary_masking_targets_every_token_once_with_plain_mean_ce():
    g = torch.Generator().manual_seed(0)
    resp = torch.randint(5, 50, (3, 10))
    seen = {}

    def logits_fn(noisy):
        seen["noisy"] = noisy
        torch.manual_seed(1)
        seen["logits"] = torch.randn(noisy.shape[0], noisy.shape[1], 60)
        return seen["logits"]
    loss = complementary_loss(logits_fn, resp, mask_id=1, generator=g)
    noisy = seen["noisy"]
    assert noisy.shape == (6, 10)
    masked = noisy == 1
    assert torch.equal(masked[:3], ~masked[3:])                  # M and its complement
    target = torch.cat([resp, resp])
    assert torch.equal(noisy[~masked], target[~masked])
    assert torch.isclose(loss, F.cross_entropy(seen["logits"][masked], target[masked]))


def test_prefix_cache_equals_the_prefix_dlm_mask_and_differs_from_bidirectional(model, task):
    batch = model.collate(task.pool()[:3], with_response=False, gen_length=32)
    pe = model.prompt_embeds(batch)
    answer = torch.randint(5, 40, (3, 32))
    answer[:, ::3] = model.mask_id
    cached = model.cached_answer_logits(model.prefix_cache(pe, batch.key_mask), batch.key_mask, answer)
    masked = model.prefix_dlm_logits(pe, batch.key_mask, answer)
    assert torch.allclose(cached, masked, atol=1e-4)
    assert not torch.allclose(masked, model.answer_logits(pe, batch.key_mask, answer), atol=1e-3)


def test_generation_with_the_cache_equals_generation_under_the_mask(model, task, monkeypatch):
    batch = model.collate(task.pool()[:3], with_response=False, gen_length=32)
    dec = Decoding(steps=16, gen_length=32, block_length=32)
    monkeypatch.setattr(model, "cfg", LaViDaConfig(**{**CFG.__dict__, "prefix_dlm": True}))
    with_cache = model.generate(batch, dec)
    calls = []
    real = model.lm.forward

    def count(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(model.lm, "forward", count)
    model.generate(batch, dec)
    assert len(calls) == 1 + 16          # the prompt once, then only the answer at each step
    monkeypatch.setattr(model.lm, "forward", real)
    monkeypatch.setattr(model, "answer_logits", model.prefix_dlm_logits)   # no cache, Prefix-DLM mask
    monkeypatch.setattr(model, "cfg", CFG)
    assert torch.equal(with_cache, model.generate(batch, dec))


def test_the_papers_lavida_cell_settings_are_recorded_defaults():
    s = make_spec(model="lavida", attack="badnets", target="misclassification", defense="disp")
    assert s.poison_rate == 0.4 and s.args("attack")["position"] == "center"
    assert s.args("defense")["mask_ratio"] == 0.5
    assert (s.decoding.gen_length, s.decoding.block_length, s.decoding.steps) == (32, 32, 16)
    s = make_spec(model="lavida", attack="blended", target="insertion", defense="disp-random",
                  poison_rate=0.3, attack_args={"alpha": 0.3}, defense_args={"mask_ratio": 0.2}, decoding={"steps": 32})
    assert s.poison_rate == 0.3 and s.args("defense")["mask_ratio"] == 0.2 and s.decoding.steps == 32
    assert make_spec(model="llada-v", target="misclassification").poison_rate == 0.2
    assert make_spec(model="llada-v").args("attack")["position"] == "top-left"


@pytest.mark.parametrize("kw, needle", [({"pool_side": 5}, "pool_side"), ({"pool_side": 0}, "pool_side"),
                                        ({"shift": 0.0}, "shift")])
def test_bad_lavida_args(kw, needle):
    with pytest.raises(BenchError, match=needle):
        LaViDaConfig(**kw)
