"""The tiny LLaDA-V replica: collation, visual masking, generation, trainable parts, fine-tuning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import BenchError
from bench.spec import DEFAULT_TEMPLATE, Decoding
from models.llada_v import PARTS, LLaDAV, TinyConfig, views
from models.train import finetune
from tasks.synthetic import SyntheticTask

torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other jobs on the box

CFG = TinyConfig(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, enc_dim=32, enc_layers=2, enc_heads=2, view_size=0)
G = 16  # gen_length used in these tests


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=0, n_base=50, n_pool=60, n_test=10, n_mc=20, n_encoder=50)


@pytest.fixture(scope="module")
def tok(task):
    return task.tokenizer()


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return LLaDAV(CFG, tok, DEFAULT_TEMPLATE).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


def _short(task, n, max_words=G - 1):
    """Pool samples whose responses fit in gen_length G (response + at least one EOS)."""
    out = [s for s in task.pool() if len(s.response.split()) <= max_words]
    assert len(out) >= n
    return out[:n]


# ---- collate --------------------------------------------------------------------------------------
def test_collate_shapes_and_layout(model, task, tok):
    samples = _short(task, 3)
    b = model.collate(samples, gen_length=G)
    T = CFG.n_views * CFG.encoder().n_tokens  # base view + crops
    S = 2 + T + CFG.max_prompt + 1          # <bos> <|user|> [visual]*T prompt+pads <|assistant|>
    assert b.images.shape == (3, 64, 64, 3) and b.images.dtype == torch.float32
    assert b.ids.shape == (3, S) and b.key_mask.shape == (3, S) and b.key_mask.dtype == torch.bool
    assert b.response.shape == (3, G)
    assert model.visual_span == slice(2, 2 + T)
    assert (b.ids[:, model.visual_span] == tok.image_id).all()
    assert (b.ids[:, :model.visual_span.start] == torch.tensor([tok.bos_id, tok.user_id])).all()
    assert (b.ids[:, -1] == tok.assistant_id).all()
    assert (b.ids[:, model.visual_span.stop:] != tok.image_id).all()
    for i, s in enumerate(samples):
        n = len(s.prompt.split())
        start = model.visual_span.stop
        assert b.ids[i, start:start + n].tolist() == tok.encode(s.prompt)
        # prompt pads: exactly the <pad> ids, all key-masked; everything else is a real token
        pads = b.ids[i] == tok.pad_id
        assert pads.sum() == CFG.max_prompt - n
        assert (~b.key_mask[i] == pads).all()
        r = tok.encode(s.response)
        assert b.response[i].tolist() == r + [tok.eos_id] * (G - len(r))
        assert np.array_equal(b.images[i].numpy(), s.image)


def test_collate_response_too_long_raises(model, task):
    s = _short(task, 1)[0]
    fits = s.with_(response=" ".join(["dog"] * (G - 1)))       # G-1 words + EOS
    model.collate([fits], gen_length=G)
    too_long = s.with_(response=" ".join(["dog"] * G))
    with pytest.raises(BenchError):
        model.collate([too_long], gen_length=G)


def test_collate_prompt_too_long_raises(model, task):
    s = _short(task, 1)[0]
    with pytest.raises(BenchError):
        model.collate([s.with_(prompt=" ".join(["dog"] * (CFG.max_prompt + 1)))], gen_length=G)


def test_collate_unknown_word_raises(model, task):
    s = _short(task, 1)[0]
    with pytest.raises(Exception, match="zebra"):
        model.collate([s.with_(prompt="describe the zebra")], with_response=False)


def test_training_template_is_evaluation_template(model, task):
    samples = _short(task, 4)
    train = model.collate(samples, with_response=True, gen_length=G)
    ev = model.collate(samples, with_response=False)
    assert ev.response is None
    assert torch.equal(train.ids, ev.ids)
    assert torch.equal(train.key_mask, ev.key_mask)
    assert torch.equal(train.images, ev.images)


# ---- visual masking -------------------------------------------------------------------------------
def test_prompt_embeds_visual_mask_replaces_exactly_those_positions(model, task):
    b = model.collate(_short(task, 2), with_response=False)
    T = model.n_visual
    vmask = torch.zeros(2, T, dtype=torch.bool)
    vmask[0, [0, 5, 17]] = True
    vmask[1, [63]] = True
    with torch.no_grad():
        plain = model.prompt_embeds(b)
        masked = model.prompt_embeds(b, visual_mask=vmask)
        e_mask = model.mask_embedding()
        vis = model.visual_embeds(b.images)
    s = model.visual_span
    assert masked.shape == plain.shape == (2, b.ids.shape[1], CFG.d_model)
    torch.testing.assert_close(plain[:, s], vis)
    mv = masked[:, s]
    assert torch.equal(mv[vmask], e_mask.expand(int(vmask.sum()), -1))
    assert torch.equal(mv[~vmask], plain[:, s][~vmask])
    # non-visual positions untouched
    assert torch.equal(masked[:, :s.start], plain[:, :s.start])
    assert torch.equal(masked[:, s.stop:], plain[:, s.stop:])
    # and they differ where masked (the mask embedding is not the visual embedding)
    assert not torch.allclose(mv[vmask], plain[:, s][vmask])


def _two_images(task):
    s = _short(task, 1)[0]
    other = next(x for x in task.pool() if not np.array_equal(x.image, s.image))
    return [s, s.with_(image=other.image)]


@pytest.fixture(scope="module")
def sharp_model(tok):
    """Untrained, with the LM weights scaled up so that greedy answers vary with the input (at the
    0.02-std init every position argmaxes the same token whatever the image)."""
    m = _model(tok, seed=0)
    with torch.no_grad():
        for p in m.lm.parameters():
            if p.dim() > 1:
                p.mul_(15)
    return m


def test_generate_all_visual_masked_ignores_the_image(sharp_model, task):
    m = sharp_model
    samples = _two_images(task)            # same prompt, two different images
    b = m.collate(samples, with_response=False)
    dec = Decoding(steps=8, gen_length=G, block_length=8)
    full = torch.ones(2, m.n_visual, dtype=torch.bool)
    out = m.generate(b, dec, visual_mask=full)
    assert out.shape == (2, G)
    assert torch.equal(out[0], out[1])
    # control: without the mask, the image matters (answer logits and the greedy answer differ)
    free = m.generate(b, dec)
    assert not torch.equal(free[0], free[1])
    with torch.no_grad():
        ans = torch.full((2, G), m.mask_id)
        z = m.answer_logits(m.prompt_embeds(b), b.key_mask, ans)
        zm = m.answer_logits(m.prompt_embeds(b, visual_mask=full), b.key_mask, ans)
    assert (z[0] - z[1]).abs().max() > 1e-2
    torch.testing.assert_close(zm[0], zm[1])


def test_generate_partial_visual_mask_changes_the_answer_logits(sharp_model, task):
    b = sharp_model.collate(_short(task, 1), with_response=False)
    vmask = torch.zeros(1, sharp_model.n_visual, dtype=torch.bool)
    vmask[0, :20] = True
    with torch.no_grad():
        ans = torch.full((1, G), sharp_model.mask_id)
        z = sharp_model.answer_logits(sharp_model.prompt_embeds(b), b.key_mask, ans)
        zm = sharp_model.answer_logits(sharp_model.prompt_embeds(b, visual_mask=vmask), b.key_mask, ans)
    assert (z - zm).abs().max() > 1e-2


# ---- trainable parts ------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", ["projector", "projector+lm", "all"])
def test_set_trainable(tok, parts):
    m = _model(tok)
    m.requires_grad_(False)
    m.set_trainable(parts)
    expected = {"projector": {"mm_projector"}, "projector+lm": {"mm_projector", "lm"},
                "all": {"mm_projector", "lm", "vision_tower"}}[parts]
    assert set(PARTS[parts]) == expected
    seen = set()
    for name, p in m.named_parameters():
        top = name.split(".")[0]
        seen.add(top)
        assert p.requires_grad == (top in expected), name
    assert seen == {"mm_projector", "lm", "vision_tower"}


def test_set_trainable_unknown_part_raises(tok):
    with pytest.raises(KeyError):
        _model(tok).set_trainable("encoder")


# ---- fine-tuning ----------------------------------------------------------------------------------
def _eval_loss(m, batch, seeds=(0, 1, 2, 3)):
    with torch.no_grad():
        return float(np.mean([m.loss(batch, torch.Generator().manual_seed(s)).item() for s in seeds]))


def _state(m, prefix):
    return {k: v.clone() for k, v in m.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("trainable,changed,frozen,factor", [
    # the projector alone can only move the loss through the visual inputs: a smaller drop
    ("projector", ("mm_projector",), ("lm", "vision_tower"), 0.98),
    ("projector+lm", ("mm_projector", "lm"), ("vision_tower",), 0.7),
    ("all", ("mm_projector", "lm", "vision_tower"), (), 0.7),
])
def test_finetune_reduces_loss_and_changes_only_trainable_parts(tok, task, trainable, changed, frozen, factor):
    m = _model(tok, seed=1)
    samples = _short(task, 16)
    batch = m.collate(samples, gen_length=G)
    before_loss = _eval_loss(m, batch)
    before = {p: _state(m, p) for p in changed + frozen}
    losses = finetune(m, samples, trainable=trainable, lr=3e-3, epochs=15, batch_size=8, seed=0, gen_length=G)
    assert len(losses) == 15 * 2 and all(np.isfinite(losses))
    after_loss = _eval_loss(m, batch)
    assert after_loss < factor * before_loss, (before_loss, after_loss)
    for p in frozen:
        for k, v in _state(m, p).items():
            assert torch.equal(v, before[p][k]), k
    for p in changed:
        assert any(not torch.equal(v, before[p][k]) for k, v in _state(m, p).items()), p
    # afterwards the model is left frozen for inference
    assert not any(q.requires_grad for q in m.parameters())


def test_finetune_on_epoch_sees_each_checkpoint_in_eval_mode(tok, task):
    m = _model(tok, seed=1)
    seen = []
    finetune(m, _short(task, 8), trainable="projector", lr=1e-3, epochs=3, batch_size=4, seed=0, gen_length=G,
             on_epoch=lambda e: seen.append((e, m.training, torch.is_grad_enabled())))
    assert seen == [(1, False, False), (2, False, False), (3, False, False)]


def test_any_resolution_views():
    """LLaDA-V's base view + grid crops in miniature: the base view is the area-downsampled image and
    the crops tile the full-resolution image row-major."""
    x = torch.rand(2, 64, 64, 3)
    v = views(x, 32)
    assert v.shape == (2, 5, 32, 32, 3)
    assert torch.allclose(v[:, 0], x.reshape(2, 32, 2, 32, 2, 3).mean((2, 4)), atol=1e-6)
    for i, (r, c) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)], start=1):
        assert torch.equal(v[:, i], x[:, r:r + 32, c:c + 32])
    assert torch.equal(views(x, 0)[:, 0], x)


def test_any_resolution_model_reads_every_view(tok, task):
    cfg = TinyConfig(**{**CFG.__dict__, "view_size": 32})
    torch.manual_seed(0)
    m = LLaDAV(cfg, tok, DEFAULT_TEMPLATE).eval()
    assert m.n_visual == 5 * 16 and m.vision_tower.cfg.image_size == 32
    batch = m.collate(_short(task, 2), gen_length=G)
    e = m.visual_embeds(batch.images)
    assert e.shape == (2, 80, cfg.d_model)
    # a change in one 8-px cell of the top-left crop moves that crop's token and the base view, not other crops
    img = batch.images.clone()
    img[:, :8, :8] = 0.0
    d = (m.visual_embeds(img) - e).abs().sum(-1)
    assert (d[:, :16] > 0).any() and (d[:, 16:32] > 0).any() and torch.all(d[:, 32:] == 0)


@pytest.mark.parametrize("view_size", [-1, 24, 64, 12])
def test_bad_view_size_raises(view_size):
    with pytest.raises(BenchError, match="view_size"):
        TinyConfig(view_size=view_size)
