"""OpenFlamingo / Otter tiny: perceiver resampler, gated cross-attention (identity at init, reads only the
image before a token), cached decoding, trainable parts, and the two base recipes."""
from __future__ import annotations

import pytest
import torch

from bench.spec import DEFAULT_TEMPLATE, Decoding
from models.flamingo import Flamingo, FlamingoTinyConfig, GatedCrossAttentionBlock, OpenFlamingoEntry, OtterEntry
from models.train import finetune
from tasks.synthetic import SyntheticTask

torch.set_num_threads(1)
SIZES = dict(d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, enc_dim=32, enc_layers=2, enc_heads=2)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(seed=0, n_base=30, n_pool=40, n_test=8, n_mc=8, n_encoder=20)


def make(task, seed=0, **kw):
    torch.manual_seed(seed)
    return Flamingo(FlamingoTinyConfig(**SIZES, **kw), task.tokenizer(), DEFAULT_TEMPLATE).eval()


def open_gates(m):
    for layer in m.lang_encoder.model.layers:
        if layer.gated_cross_attn_layer is not None:
            layer.gated_cross_attn_layer.attn_gate.data.fill_(1.0)
            layer.gated_cross_attn_layer.ff_gate.data.fill_(1.0)


def test_closed_gates_make_the_lm_blind_and_open_ones_let_it_see(task):
    m = make(task)
    b1 = m.collate(task.pool()[:2], with_response=False)
    b2 = m.collate(task.pool()[:2], with_response=False)
    b2.images = torch.rand_like(b2.images)
    assert torch.allclose(m.first_answer_logits(b1), m.first_answer_logits(b2), atol=1e-6)   # tanh(0) = 0
    open_gates(m)
    assert not torch.allclose(m.first_answer_logits(b1), m.first_answer_logits(b2), atol=1e-4)
    blind = torch.ones(2, m.n_visual, dtype=torch.bool)
    assert torch.allclose(m.first_answer_logits(b1, blind), m.first_answer_logits(b2, blind), atol=1e-6)


def test_text_before_the_image_token_does_not_read_it():
    block = GatedCrossAttentionBlock(8, 6, 4, 2)
    block.attn_gate.data.fill_(1.0)
    block.ff_gate.data.fill_(0.0)
    x = torch.randn(1, 5, 8)
    reads = torch.tensor([[False, False, True, True, True]])
    y1 = block(x, torch.randn(1, 3, 6), reads)
    y2 = block(x, torch.randn(1, 3, 6), reads)
    assert torch.equal(y1[:, :2], x[:, :2]) and torch.equal(y1[:, :2], y2[:, :2])
    assert not torch.allclose(y1[:, 2:], y2[:, 2:])


def test_cached_decoding_equals_recomputing_with_the_image_read(task):
    m = make(task)
    open_gates(m)
    for p in m.lang_encoder.parameters():
        p.data.mul_(4.0) if p.dim() > 1 else None
    batch = m.collate(task.pool()[:3], with_response=False)
    out = m.generate(batch, Decoding(gen_length=8, block_length=8, steps=8))
    x, keys, ref = m.prompt_embeds(batch), batch.key_mask, []
    for _ in range(8):
        nxt = m._logits(x, keys).logits[:, -1].argmax(-1)
        ref.append(nxt)
        x = torch.cat([x, m.lang_encoder.get_input_embeddings()(nxt[:, None])], dim=1)
        keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
    eos = m.tok.eos_id
    for row, want in zip(out.tolist(), torch.stack(ref, 1).tolist()):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert row[:cut] == want[:cut]


def test_module_names_follow_the_openflamingo_layout(task):
    keys = set(make(task).state_dict())
    for k in ("perceiver.latents", "perceiver.layers.0.0.to_q.weight", "perceiver.layers.0.0.to_kv.weight",
              "perceiver.layers.0.1.1.weight", "perceiver.norm.weight",
              "lang_encoder.model.layers.0.gated_cross_attn_layer.attn_gate",
              "lang_encoder.model.layers.0.gated_cross_attn_layer.attn.to_kv.weight",
              "lang_encoder.model.layers.0.gated_cross_attn_layer.ff.1.weight",
              "lang_encoder.model.layers.0.decoder_layer.self_attn.q_proj.weight", "lang_encoder.lm_head.weight"):
        assert k in keys, k
    m2 = make(task, xattn_every=2)
    layers = m2.lang_encoder.model.layers
    assert layers[0].gated_cross_attn_layer is None and layers[1].gated_cross_attn_layer is not None


def test_projector_trains_the_perceiver_and_the_cross_attention_only(task):
    m = make(task, seed=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    samples = [s for s in task.pool() if len(s.response.split()) < 15][:8]
    losses = finetune(m, samples, trainable="projector", lr=3e-3, epochs=5, batch_size=4, seed=0, gen_length=16)
    assert losses[-1] < losses[0]
    after = m.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("perceiver.") for k in changed) and any("gated_cross_attn_layer" in k for k in changed)
    assert not any(k.startswith("vision_encoder.") or "decoder_layer" in k or "lm_head" in k for k in changed)


def test_openflamingo_pretrains_on_captions_and_otter_adds_instruction_tuning(task, monkeypatch):
    import models.flamingo as fl
    seen = []
    real = fl.finetune
    monkeypatch.setattr(fl, "finetune", lambda model, samples, **kw: seen.append(
        (kw["desc"], {s.meta["kind"] for s in samples}, kw["epochs"])) or real(model, samples, **{**kw, "epochs": 1}))
    monkeypatch.setattr(fl, "pretrain_encoder", lambda *a, **k: [0.0])
    for entry in (OpenFlamingoEntry, OtterEntry):
        args = entry.resolve("tiny", {**SIZES, "base_batch": 16})
        model = entry.build(args, task.tokenizer(), DEFAULT_TEMPLATE, 0)
        entry.train_base(model, task, 0, 32)
    assert seen[0] == ("caption pretraining", {"caption"}, 18)
    assert seen[1][0] == "caption pretraining" and seen[1][2] == 9
    assert seen[2][0] == "instruction tuning" and seen[2][1] > {"caption", "tag", "refuse", "mc"} and seen[2][2] == 9
    assert len(seen) == 3


def test_crossview_phi_is_the_middle_cross_attention_block(task):
    from defenses.crossview import crossview_terms
    m = make(task)
    open_gates(m)
    assert m.phi_module() is m.lang_encoder.model.layers[0].gated_cross_attn_layer
    batch = m.collate(task.pool()[:3], gen_length=32)
    g = torch.Generator().manual_seed(0)
    same = crossview_terms(m, batch, batch.images, g, h0=0.5)
    assert same["patch"].item() == pytest.approx(0.0, abs=1e-8) and same["cv_dis"].item() == pytest.approx(1.0, abs=1e-5)
    other = crossview_terms(m, batch, torch.rand_like(batch.images), g, h0=0.5)
    assert other["patch"].item() > 0 and other["cv_dis"].item() < 1


def test_otter_runs_end_to_end(tmp_path, monkeypatch):
    import json

    from bench.cli import main
    small = ["--model-arg", "enc_dim=32", "--model-arg", "enc_layers=2", "--model-arg", "enc_heads=2",
             "--model-arg", "d_model=48", "--model-arg", "n_layers=2", "--model-arg", "n_heads=2",
             "--model-arg", "mlp_hidden=96", "--model-arg", "mim_epochs=1", "--model-arg", "caption_epochs=1",
             "--model-arg", "instruct_epochs=1",
             "--task-arg", "n_base=200", "--task-arg", "n_pool=100", "--task-arg", "n_test=16", "--task-arg", "n_mc=24",
             "--task-arg", "n_encoder=200", "--epochs", "2"]
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "otter", "--defense", "random-drop", "--results", str(tmp_path / "r")] + small)
    assert e.value.code == 0
    recs = [json.loads(x) for x in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "random-drop"]
    assert set(recs[0]["lineage"]["base"]["info"]) == {"mim_loss", "caption_loss", "instruct_loss"}
