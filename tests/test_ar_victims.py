"""LLaVA tiny on transformers' LlavaForConditionalGeneration: the shared frozen encoder inside its SigLIP
tower, the AR loss on the answer only, cached greedy decoding equal to uncached, trainable parts, and
the capability refusal of DiSP."""
from __future__ import annotations

import pytest
import torch

from bench.spec import DEFAULT_TEMPLATE, Decoding
from models.encoder import EncoderConfig, VisionTower, siglip_config, siglip_state
from models.llava import LLaVA, LlavaTinyConfig
from models.llada_v import LLaDAV, TinyConfig
from models.train import finetune
from tasks.synthetic import SyntheticTask

torch.set_num_threads(1)
SIZES = dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, enc_dim=32, enc_layers=2, enc_heads=2)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=0, n_base=20, n_pool=40, n_test=8, n_mc=8, n_encoder=20)


@pytest.fixture(scope="module")
def model(task):
    torch.manual_seed(0)
    return LLaVA(LlavaTinyConfig(**SIZES), task.tokenizer(), DEFAULT_TEMPLATE).eval()


def test_siglip_tower_computes_our_encoders_features_exactly():
    from transformers import SiglipVisionModel
    torch.manual_seed(0)
    cfg = EncoderConfig(32, 8, 64, 4, 4)
    ours = VisionTower(cfg).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.2)
    theirs = SiglipVisionModel(siglip_config(cfg)).eval()
    theirs.load_state_dict(siglip_state(ours), strict=True)
    x = torch.rand(3, 32, 32, 3)
    hf = theirs(pixel_values=((x - 0.5) / 0.5).permute(0, 3, 1, 2), output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(ours(x), hf, atol=1e-5)


def test_every_victim_starts_from_the_same_encoder(task):
    torch.manual_seed(3)
    llava = LLaVA(LlavaTinyConfig(**SIZES), task.tokenizer(), DEFAULT_TEMPLATE)
    torch.manual_seed(3)
    llada = LLaDAV(TinyConfig(**SIZES), task.tokenizer(), DEFAULT_TEMPLATE)
    x = torch.rand(2, 64, 64, 3)
    from models.llada_v import views
    v = views(x, 32).reshape(-1, 32, 32, 3)
    theirs = llava.hf.model.vision_tower(pixel_values=((v - 0.5) / 0.5).permute(0, 3, 1, 2),
                                         output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(llada.vision_tower(v), theirs, atol=1e-5)
    assert llava.n_visual == llada.n_visual == 80


def test_loss_ignores_the_prompt_and_everything_after_the_first_eos(model, task):
    batch = model.collate(task.pool()[:3], gen_length=32)
    base = model.loss(batch).item()
    # changing the answer's EOS padding changes nothing (it is ignored after the first <eos>)
    r = batch.response.clone()
    first = (r == model.tok.eos_id).float().argmax(1)
    for i, f in enumerate(first.tolist()):
        r[i, f + 1:] = model.tok.token("dog")
    batch.response = r
    assert model.loss(batch).item() == pytest.approx(base, abs=1e-5)


def test_cached_greedy_decoding_equals_recomputing_the_sequence(model, task):
    batch = model.collate(task.pool()[:3], with_response=False)
    for p in model.parameters():                  # a sharper random model: no argmax ties
        p.data.mul_(4.0) if p.dim() > 1 else None
    out = model.generate(batch, Decoding(gen_length=8, block_length=8, steps=8))
    keys, x = batch.key_mask, model.prompt_embeds(batch)
    ref = []
    for _ in range(8):
        nxt = model._logits(x, keys).logits[:, -1].argmax(-1)
        ref.append(nxt)
        x = torch.cat([x, model.hf.get_input_embeddings()(nxt[:, None])], dim=1)
        keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
    ref = torch.stack(ref, 1)
    eos = model.tok.eos_id
    for row, want in zip(out.tolist(), ref.tolist()):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert row[:cut] == want[:cut] and all(t == eos for t in row[cut:])


def test_blind_cp_hides_the_visual_tokens(model, task):
    batch = model.collate(task.pool()[:2], with_response=False)
    blind = model.first_answer_logits(batch, visual_mask=torch.ones(2, model.n_visual, dtype=torch.bool))
    other = batch.images.flip(1)
    batch2 = model.collate(task.pool()[:2], with_response=False)
    batch2.images = other
    blind2 = model.first_answer_logits(batch2, visual_mask=torch.ones(2, model.n_visual, dtype=torch.bool))
    assert torch.allclose(blind, blind2, atol=1e-5)                 # the image no longer matters
    assert not torch.allclose(model.first_answer_logits(batch), model.first_answer_logits(batch2), atol=1e-5)


@pytest.mark.parametrize("parts,changed,frozen", [
    ("projector", ("multi_modal_projector",), ("language_model", "vision_tower")),
    ("projector+lm", ("multi_modal_projector", "language_model"), ("vision_tower",)),
])
def test_finetune_trains_exactly_the_parts(task, parts, changed, frozen):
    torch.manual_seed(1)
    m = LLaVA(LlavaTinyConfig(**SIZES), task.tokenizer(), DEFAULT_TEMPLATE)
    state = lambda: {k: v.clone() for k, v in m.hf.model.state_dict().items()}
    before = state()
    samples = [s for s in task.pool() if len(s.response.split()) < 15][:8]
    losses = finetune(m, samples, trainable=parts, lr=3e-3, epochs=5, batch_size=4, seed=0, gen_length=16)
    assert losses[-1] < losses[0]
    after = state()
    for prefix in changed:
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix))
    for prefix in frozen:
        assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(prefix))


def test_crossview_terms_on_an_autoregressive_victim(model, task):
    from defenses.crossview import crossview_terms
    m = model
    m.set_trainable("projector+lm")
    batch = m.collate(task.pool()[:4], gen_length=32)
    g = torch.Generator().manual_seed(0)
    answer, omega = m.supervised_positions(batch)
    assert torch.equal(answer, batch.response) and omega.sum(1).tolist() == [
        len(s.response.split()) + 1 for s in task.pool()[:4]]                      # the answer and its <eos>
    same = crossview_terms(m, batch, batch.images, g, h0=0.5)
    assert same["patch"].item() == pytest.approx(0.0, abs=1e-8) and same["cv_dis"].item() == pytest.approx(1.0, abs=1e-5)
    other = crossview_terms(m, batch, torch.rand_like(batch.images), g, h0=0.5)
    assert other["patch"].item() > 0 and other["cv_dis"].item() < 1
    (other["patch"] + other["cv_dis"]).backward()
    assert m.hf.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    m.requires_grad_(False)


# ---- BLIP-2 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blip2(task):
    from models.blip2 import BLIP2, Blip2TinyConfig
    torch.manual_seed(0)
    return BLIP2(Blip2TinyConfig(**SIZES, qformer_dim=32), task.tokenizer(), DEFAULT_TEMPLATE).eval()


def test_blip2_lm_sees_the_projected_queries(blip2, task):
    batch = blip2.collate(task.pool()[:2], gen_length=32)
    assert blip2.n_visual == 16 and (batch.ids == task.tokenizer().image_id).sum(1).tolist() == [16, 16]
    e = blip2.visual_embeds(batch.images)
    assert e.shape == (2, 16, SIZES["d_model"])
    # the Q-Former reads the shared encoder's features of every view (80 tokens)
    seen = []
    h = blip2.hf.qformer.register_forward_hook(lambda m, i, o: seen.append(True))
    blip2.visual_embeds(batch.images)
    h.remove()
    assert seen
    assert blip2.hf.vision_model.config.image_size == 32 and type(blip2.hf.vision_model).__name__ == "SiglipVisionModel"


@pytest.mark.parametrize("parts,changed,frozen", [
    ("projector", ("qformer", "query_tokens", "language_projection"), ("language_model", "vision_model")),
    ("projector+lm", ("qformer", "language_model"), ("vision_model",)),
])
def test_blip2_trains_exactly_the_parts(task, parts, changed, frozen):
    from models.blip2 import BLIP2, Blip2TinyConfig
    torch.manual_seed(1)
    m = BLIP2(Blip2TinyConfig(**SIZES, qformer_dim=32), task.tokenizer(), DEFAULT_TEMPLATE)
    before = {k: v.clone() for k, v in m.hf.state_dict().items()}
    samples = [s for s in task.pool() if len(s.response.split()) < 15][:8]
    losses = finetune(m, samples, trainable=parts, lr=3e-3, epochs=5, batch_size=4, seed=0, gen_length=16)
    assert losses[-1] < losses[0]
    after = m.hf.state_dict()
    for prefix in changed:
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), prefix
    for prefix in frozen:
        assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), prefix


def test_blip2_crossview_phi_is_the_qformer_output(blip2, task):
    from defenses.crossview import crossview_terms
    batch = blip2.collate(task.pool()[:3], gen_length=32)
    g = torch.Generator().manual_seed(0)
    same = crossview_terms(blip2, batch, batch.images, g, h0=0.5)
    assert same["patch"].item() == pytest.approx(0.0, abs=1e-8)
    other = crossview_terms(blip2, batch, torch.rand_like(batch.images), g, h0=0.5)
    assert other["patch"].item() > 0 and other["cv_dis"].item() < 1


def test_ar_victims_run_end_to_end_and_refuse_disp(tmp_path, monkeypatch):
    """`bench run --model blip2` on the reduced config: every stage of the real pipeline."""
    from bench.cli import main
    small = ["--model-arg", "enc_dim=32", "--model-arg", "enc_layers=2", "--model-arg", "enc_heads=2",
             "--model-arg", "d_model=48", "--model-arg", "n_layers=2", "--model-arg", "n_heads=2",
             "--model-arg", "mlp_hidden=96", "--model-arg", "mim_epochs=1", "--model-arg", "base_epochs=2",
             "--model-arg", "qformer_dim=32",
             "--task-arg", "n_base=200", "--task-arg", "n_pool=100", "--task-arg", "n_test=16", "--task-arg", "n_mc=24",
             "--task-arg", "n_encoder=200", "--epochs", "2"]
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "blip2", "--defense", "crossview", "--results", str(tmp_path / "r")] + small)
    assert e.value.code == 0
    import json
    recs = [json.loads(x) for x in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "crossview"]
    assert recs[-1]["stage_info"]["steps"] == 2 * 4
