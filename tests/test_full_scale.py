"""Full scale on CPU without the real weights: synthetic checkpoints in each published layout, the strict
loader, the published visual-token counts, DiSP on a full-scale tiny-random model, and the GPU script."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.spec import Decoding, Recipe, RunSpec
from core.errors import BenchError
from defenses.base import DefenseContext
from defenses.disp import DiSPDefense, saliency
from models import checkpoint as ckpt
from models.lavida_full import FullLaViDa, lavida_ckpt_key, lavida_key
from models.llada_v_full import (FullConfig, FullLLaDAV, check_weights, geometry, llada_v_ckpt_key, llada_v_key,
                                 load_model, random_model, select_grid, tiny_config, visual_token_count,
                                 write_synthetic_checkpoint)
from tasks.base import Sample
from tests.helpers import bench

torch.set_num_threads(1)
WORDS = "a dog cat on the left right describe image there is <backdoor>".split()
FAMILIES = {"llada-v": (FullLLaDAV, {}), "lavida": (FullLaViDa, {"pool_side": 1})}


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request, tmp_path_factory):
    """(family, class, directory, the module the checkpoint was written from)."""
    cls, over = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    m0 = write_synthetic_checkpoint(d, tiny_config(**over), cls=cls, family=request.param, words=WORDS, seed=1)
    return request.param, cls, d, m0


@pytest.fixture(scope="module")
def llada_v_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada-v-dir")
    write_synthetic_checkpoint(d, tiny_config(), words=WORDS, seed=2)
    return d


def _samples(n=2, side=28, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(rng.random((side, side, 3), dtype=np.float32), "describe image", "a dog on the left", {"id": i})
            for i in range(n)]


def _cfg(d, cls, **over):
    return replace(tiny_config(weights=str(d), **over), **geometry(d, cls.key_map))


# ---- the published layouts -----------------------------------------------------------------------
def test_written_in_the_published_layout(written):
    family, cls, d, _ = written
    index = json.loads((d / ckpt.INDEX_NAME).read_text())["weight_map"]
    assert len(set(index.values())) >= 2 and (d / "config.json").exists() and (d / "tokenizer.json").exists()
    if family == "llada-v":
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.q_proj.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.norm.weight"} <= set(index)
    else:
        assert {"model.transformer.wte.weight", "model.transformer.ff_out.weight", "model.transformer.ln_f.weight",
                "model.transformer.blocks.1.attn_out.weight", "model.transformer.blocks.0.ff_out.weight"} <= set(index)
        assert not any(k.startswith("model.layers.") for k in index)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline",
            "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"} <= set(index)
    assert not any(".head." in k for k in index)               # SigLIP's head is not part of the tower


def test_key_maps_are_one_to_one_inverses():
    m = random_model(FullLLaDAV, tiny_config())
    for fwd, inv in ((llada_v_key, llada_v_ckpt_key), (lavida_key, lavida_ckpt_key)):
        names = [inv(k) for k in m.state_dict()]
        assert len(set(names)) == len(names) and [fwd(n) for n in names] == list(m.state_dict())
    # the global ff_out is the head, a block's ff_out the down projection
    assert lavida_key("model.transformer.ff_out.weight") == "lm.lm_head.weight"
    assert lavida_key("model.transformer.blocks.3.ff_out.weight") == "lm.layers.3.mlp.down_proj.weight"
    assert llada_v_key("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") == "vision_tower.post_layernorm.weight"
    assert llada_v_key("model.transformer.wte.weight") is None and lavida_key("model.embed_tokens.weight") is None


def test_loads_with_no_missing_or_unexpected_keys_and_identical_logits(written):
    family, cls, d, m0 = written
    report = check_weights(cls, d)
    assert report.ok and not report.match.missing and not report.match.unexpected
    assert report.n_tensors == len(m0.state_dict()) and report.hash is None      # headers only
    model, rep = load_model(cls, _cfg(d, cls, **FAMILIES[family][1]))
    assert rep.ok and rep.hash == ckpt.checkpoint_hash(d) and rep.loaded_dtype == "float32" and rep.device == "cpu"
    for k, v in m0.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    b = model.collate(_samples())
    for attr in ("tok", "_pre", "_post", "_mid", "visual_span"):
        setattr(m0, attr, getattr(model, attr))
    got = model.answer_logits(model.prompt_embeds(b), b.key_mask, b.response)
    want = m0.answer_logits(m0.prompt_embeds(b), b.key_mask, b.response)
    assert torch.equal(got, want)


def test_the_other_familys_layout_is_refused(written):
    family, cls, d, _ = written
    other = FullLaViDa if cls is FullLLaDAV else FullLLaDAV
    report = check_weights(other, d)
    assert not report.ok and report.match.unexpected and report.match.missing


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a checkpoint directory with edit(tensors) applied (tensors in checkpoint naming)."""
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    edit(tensors)
    ckpt.write_checkpoint(dst, tensors, json.loads((src / "config.json").read_text()), shard_bytes=10_000)
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())


def test_a_renamed_key_stops_the_load_naming_it(llada_v_dir, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    _rewrite(llada_v_dir, tmp_path, lambda t: t.__setitem__("model.layers.1.mlp.upp_proj.weight", t.pop(key)))
    with pytest.raises(BenchError) as e:
        load_model(FullLLaDAV, _cfg(tmp_path, FullLLaDAV))
    msg = str(e.value)
    assert "model.layers.1.mlp.upp_proj.weight" in msg and "lm.layers.1.mlp.up_proj.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "\n" not in msg


def test_a_reshaped_key_stops_the_load_naming_it(llada_v_dir, tmp_path):
    key = "model.mm_projector.2.weight"
    _rewrite(llada_v_dir, tmp_path, lambda t: t.__setitem__(key, t[key][:, :-1].clone()))
    with pytest.raises(BenchError, match=r"shape mismatch: model\.mm_projector\.2\.weight \[32, 31\] vs mm_projector\.2\.weight \[32, 32\]"):
        load_model(FullLLaDAV, _cfg(tmp_path, FullLLaDAV))


def test_geometry_comes_from_the_headers(llada_v_dir):
    g = geometry(llada_v_dir)
    assert g["vocab_size"] == 64 and g["n_layers"] == 2 and g["vis_layers"] == 1 and g["view_size"] == 28
    assert g["n_heads"] == 4 and g["vis_width"] == 32 and g["patch"] == 14


def test_strict_match_kinds():
    m = ckpt.match_keys({"a": (2,), "b": (3,), "c": (1,), "d": (4,)}, {"A": (2,), "B": (4,), "E": (1,)},
                        {"a": "A", "b": "B", "c": None, "d": "A"}.get)
    assert m.mapping == {"a": "A"} and m.shape == [("b", "B", (3,), (4,))]
    assert m.unexpected == ["c"] and m.duplicate == [("d", "A")] and m.missing == ["E"] and not m.ok


def test_load_state_dict_strict():
    lin = torch.nn.Linear(3, 2)
    src = {"x.weight": torch.ones(2, 3), "x.bias": torch.zeros(2)}
    ckpt.load_state_dict_strict(lin, src, lambda k: k[2:])
    assert torch.equal(lin.weight, torch.ones(2, 3))
    with pytest.raises(BenchError, match="missing.*bias"):
        ckpt.load_state_dict_strict(lin, {"x.weight": torch.ones(2, 3)}, lambda k: k[2:])


def test_hash_changes_with_content(llada_v_dir, tmp_path):
    _rewrite(llada_v_dir, tmp_path, lambda t: t["model.norm.weight"].add_(1))
    assert ckpt.checkpoint_hash(tmp_path) != ckpt.checkpoint_hash(llada_v_dir)
    assert len(ckpt.checkpoint_hash(tmp_path)) == 64


# ---- the published geometry -----------------------------------------------------------------------
def test_anyres_token_counts_of_the_published_config():
    cfg, lav = FullConfig(), FullConfig(pool_side=14)
    assert visual_token_count(384, 384, cfg) == 1485
    assert visual_token_count(480, 640, cfg) == 2929
    assert visual_token_count(768, 1024, cfg) == 3627
    assert visual_token_count(384, 384, lav) == 406
    assert select_grid(480, 640, 384, 6) == (2, 2) and select_grid(768, 1024, 384, 6) == (2, 3)


def test_real_vision_geometry_gives_the_published_visual_token_counts():
    """SigLIP at its published width, patch and resolution (one layer), a tiny LM: a 384^2 image."""
    vis = dict(vis_width=1152, vis_heads=16, vis_mlp=64, vis_layers=1, view_size=384, patch=14, image_size=384)
    img = torch.rand(1, 384, 384, 3)
    for cls, over, n in ((FullLLaDAV, {}, 1485), (FullLaViDa, {"pool_side": 14}, 406)):
        m = random_model(cls, tiny_config(**vis, **over))
        with torch.no_grad():
            v = m.visual_embeds(img)
        assert m.n_visual == n and v.shape == (1, n, 32)
        # every row of the grid map ends with image_newline; the base view has none
        side = 27 if cls is FullLLaDAV else 14
        rows = v[0, side * side:].reshape(side, side + 1, 32)
        assert torch.equal(rows[:, -1], m.image_newline.expand(side, 32))


# ---- DiSP on a full-scale tiny-random llada-v -------------------------------------------------------------
def test_disp_runs_unchanged_on_a_full_scale_model(llada_v_dir):
    model, _ = load_model(FullLLaDAV, _cfg(llada_v_dir, FullLLaDAV))
    data = _samples(3, seed=1)
    batch = model.collate(data, with_response=False)
    visual = model.visual_embeds(batch.images).detach().requires_grad_(True)
    pe = model.prompt_embeds(batch, visual=visual)
    answer = torch.full((3, 8), model.mask_id)
    (g,) = torch.autograd.grad(model.answer_logits(pe, batch.key_mask, answer).square().sum(), visual)
    assert g.abs().sum() > 0                                   # gradients w.r.t. the visual embeddings flow
    s = saliency(model, batch, 4, 8, n_probes=2, top_k=3, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, model.n_visual) and torch.isfinite(s).all() and (s > 0).any()

    seen = []
    inner = model.answer_logits

    def spy(pe, km, a):
        seen.append(pe.detach())
        return inner(pe, km, a)
    model.answer_logits = spy
    dec = Decoding(steps=4, gen_length=8, block_length=4)
    calls = []
    ctx = DefenseContext(spec=RunSpec(decoding=dec, trainable="projector", recipe=Recipe(epochs=10), seed=0),
                         finetune=lambda m, s, **kw: calls.append(kw) or [], base_model=lambda: None, log=lambda _: None)
    d = DiSPDefense(n_probes=2, batch_size=8, mask_ratio=0.5)
    assert d.purify(model, data, ctx) is model and len(d.purified) == 3 and calls[0]["trainable"] == "projector"
    freq = torch.tensor(d.report["mask_frequency"])
    assert math.isclose(float(freq.sum()), math.floor(0.5 * model.n_visual), rel_tol=1e-6)
    # masked inference: at every denoising step the chosen visual positions hold e_MASK (never committed:
    # they are prompt positions, and the sampler only writes the answer)
    e_mask = model.mask_embedding()
    vis = seen[-1][:, model.visual_span]
    held = (vis == e_mask).all(-1)
    assert (held.sum(1) == math.floor(0.5 * model.n_visual)).all()
    assert all(torch.equal((p[:, model.visual_span] == e_mask).all(-1), held) for p in seen[-dec.steps:])
    del model.answer_logits
    out = model.generate(batch, dec, visual_mask=held)
    assert out.shape == (3, 8) and not (out == model.mask_id).any()


@pytest.mark.parametrize("parts,modules", [("projector", {"mm_projector"}), ("projector+lm", {"mm_projector", "lm"}),
                                           ("all", {"mm_projector", "lm", "vision_tower"})])
def test_stage_state_is_the_trained_parts_and_the_hash(llada_v_dir, parts, modules):
    """A fine-tune of `parts` (the real loop) stores exactly the parameters it opened plus the hash; the
    published checkpoint plus that state gives the trained model's logits; mismatches are refused."""
    from models.train import finetune

    cfg = _cfg(llada_v_dir, FullLLaDAV, checkpoint="f" * 64)
    model, _ = load_model(FullLLaDAV, cfg)
    assert model.stage_state() == {"checkpoint": "f" * 64, "trained": {}}     # the published weights as they are
    finetune(model, _samples(2), trainable=parts, lr=1e-2, epochs=1, batch_size=2, seed=0, gen_length=8)
    state = model.stage_state()
    assert set(state["trained"]) == {n for n, _ in model.named_parameters() if n.split(".")[0] in modules}
    batch = model.collate(_samples(2, seed=1), gen_length=8)
    fresh, _ = load_model(FullLLaDAV, cfg)
    with torch.no_grad():
        before = fresh.first_answer_logits(batch, gen_length=8)
        fresh.load_stage_state(state)
        got, want = fresh.first_answer_logits(batch, gen_length=8), model.first_answer_logits(batch, gen_length=8)
    assert torch.equal(got, want) and not torch.allclose(before, want)
    other = random_model(FullLLaDAV, _cfg(llada_v_dir, FullLLaDAV, checkpoint="e" * 64))
    with pytest.raises(BenchError, match="trained on checkpoint"):
        other.load_stage_state(state)
    if parts != "projector":       # a model with more trained parts than the stage would restore
        narrow = {**state, "trained": {n: t for n, t in state["trained"].items() if n.startswith("mm_projector.")}}
        with pytest.raises(BenchError, match="fewer parts than this model has trained"):
            model.load_stage_state(narrow)
    bad = {**state, "trained": {**state["trained"], "mm_projector.0.bias": torch.zeros(3)}}
    with pytest.raises(BenchError, match=r"other shapes \(mm_projector\.0\.bias\)"):
        fresh.load_stage_state(bad)


# ---- the GPU script, on CPU ------------------------------------------------------------------------
def test_full_scale_gpu_script_tiny(tmp_path):
    from benchmarks.full_scale_gpu import main
    out = tmp_path / "r.json"
    report = main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    lv, lav = report["models"]
    assert lv["build"]["visual_tokens"] == 10 and lav["build"]["visual_tokens"] == 3
    for entry, parts in ((lv, ("a_forward", "b_disp_saliency", "c_generate", "d_train_step")),
                         (lav, ("a_forward", "b_disp_saliency", "c_generate_no_cache", "c_generate_prefix_cache",
                                "d_train_step", "d_train_step_block_checkpointing"))):
        for p in parts:
            assert "error" not in entry[p], (entry["model"], p, entry[p])
            assert entry[p]["peak_gib"] >= 0
    assert lav["d_train_step"]["trainable_params"] == lav["build"]["projector_params"]
    assert lav["prefix_cache_speedup"] > 0


# ---- the command line ----------------------------------------------------------------------------------
def test_check_weights_reports_what_a_run_would_load(written, capsys):
    family, cls, d, m0 = written
    rc, out, err = bench(["check-weights", "--model", family, str(d)], capsys)
    assert rc == 0 and err == ""
    assert f"tensors: {len(m0.state_dict())}" in out and "F32 x" in out and "status: OK" in out
    assert "mm_projector.0 (2)" in out and "vision_tower.encoder" in out and "lm.layers" in out


def test_check_weights_exits_2_naming_a_renamed_key(llada_v_dir, tmp_path, capsys):
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(llada_v_dir, tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.out_proj.weight", t.pop(key)))
    rc, out, err = bench(["check-weights", "--model", "llada-v", str(tmp_path)], capsys)
    assert rc == 2 and "status: MISMATCH" in out
    assert err.startswith("bench: error: ") and err.count("\n") == 1
    assert "model.layers.0.self_attn.out_proj.weight" in err and "lm.layers.0.self_attn.o_proj.weight" in err
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite(llada_v_dir, tmp_path / "reshaped", lambda t: t.__setitem__(key, t[key][:, :-1].clone()))
    rc, out, err = bench(["check-weights", "--model", "llada-v", str(tmp_path / "reshaped")], capsys)
    assert rc == 2 and "1 shape mismatch: model.layers.1.mlp.down_proj.weight [32, 63] vs lm.layers.1.mlp.down_proj.weight [32, 64]" in err
    rc, _, err = bench(["check-weights", "--model", "lavida", str(llada_v_dir)], capsys)   # the other layout
    assert rc == 2 and "unexpected" in err and "model.layers.0" in err


def test_full_scale_bad_input_exits_2(llada_v_dir, tmp_path, capsys):
    rc, _, err = bench(["run", "--scale", "full", "--model", "llada-v", "--results", str(tmp_path / "r")], capsys)
    assert rc == 2 and "needs --weights PATH" in err
    rc, _, err = bench(["run", "--weights", str(llada_v_dir), "--model", "llada-v", "--results", str(tmp_path / "r")], capsys)
    assert rc == 2 and "--weights is for --scale full" in err
    rc, _, err = bench(["run", "--scale", "full", "--weights", str(llada_v_dir), "--model", "llada-v", "--model-arg",
                        "d_model=8", "--results", str(tmp_path / "r")], capsys)
    assert rc == 2 and "read from the checkpoint" in err
    rc, _, err = bench(["check-weights", "--model", "llava", str(llada_v_dir)], capsys)
    assert rc == 2 and "holds a 'llava_llada' checkpoint, not 'llava'" in err
    run = ["run", "--scale", "full", "--weights", str(llada_v_dir), "--results", str(tmp_path / "r")]
    for args, needle in [(["--model-arg", "device=tpu"], "model arg device 'tpu' is not a torch device"),
                         (["--model-arg", "device=cuda:99"], "model arg device 'cuda:99': this machine has"),
                         (["--model", "lavida"], "does not match the model")]:     # another layout: refused at spec time
        rc, _, err = bench(run + args, capsys)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "r").exists()
    for over, needle in [({"pool_side": -3}, "pool_side must be >= 0"), ({"shift": 0.0}, "shift must be > 0")]:
        with pytest.raises(BenchError, match=needle):       # LaViDa's sampler args, before any build
            FullConfig(**over)


@pytest.mark.parametrize("trainable", [None, "projector+lm"])
def test_bench_run_at_full_scale_on_a_tiny_random_checkpoint(trainable, tmp_path, monkeypatch, capsys):
    """The whole pipeline on a synthetic published-layout checkpoint: the checkpoint's tokenizer reads the
    task's text, the projector trains by default (projector+lm when asked), stages store the trained parts
    with the hash, records pin hash/dtype/device."""
    from tasks.synthetic import vocabulary
    w = tmp_path / "w"
    write_synthetic_checkpoint(w, tiny_config(vocab_size=256, image_size=64), words=vocabulary())
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("tasks.synthetic.OBJECT_PROBE_PER_CATEGORY", 1)     # 8 object probes, not 200
    rc, out, err = bench(["run", "--scale", "full", "--weights", str(w), "--model", "llada-v", "--defense", "none",
                          "--results", str(tmp_path / "res"), "--task-arg", "n_base=8", "--task-arg", "n_pool=16",
                          "--task-arg", "n_test=4", "--task-arg", "n_mc=4", "--task-arg", "n_encoder=8",
                          "--epochs", "1", "--steps", "4", "--model-arg", "image_size=64"]
                         + (["--trainable", trainable] if trainable else []), capsys)
    assert rc == 0, err
    parts = trainable or "projector"
    assert "llada-v (full)" in out and f"trainable {parts}\n" in out
    recs = [json.loads(x) for x in (tmp_path / "res" / "records.jsonl").read_text().splitlines()]
    digest = ckpt.checkpoint_hash(w)
    for r in recs:
        ma = r["spec"]["model_args"]
        assert ma["checkpoint"] == digest and ma["dtype"] == "float32" and ma["device"] == "cpu"
        assert r["lineage"]["base"]["info"]["hash"] == digest and r["spec"]["trainable"] == parts
    stages = [torch.load(f, weights_only=False)["state"] for f in (tmp_path / "cache" / "backdoored").rglob("payload.pt")]
    assert len(stages) == 1 and stages[0]["checkpoint"] == digest
    assert {n.split(".")[0] for n in stages[0]["trained"]} == {"mm_projector"} | ({"lm"} if trainable else set())
    if trainable is None:
        stored = sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*") if f.is_file())
        assert stored < 2 * sum(f.stat().st_size for f in w.glob("*.safetensors")) + 200_000   # projectors, not model copies


def test_our_lm_equals_transformers_llama_with_bidirectional_attention():
    """The published LLaDA-V LM is a LLaMA block with non-causal attention: our module with the
    rotate_half RoPE gives LlamaForCausalLM's logits under an all-True 4-D mask (and not the causal ones)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from models.llada import LLaDA, LMConfig
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = LlamaForCausalLM(c).eval()
    ours = LLaDA(LMConfig(50, 32, 2, 4, 64, 500000.0, 1e-5, rope_style="half")).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        bidir = hf(input_ids=ids, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool)).logits
        causal = hf(input_ids=ids).logits
        got = ours(ours.embed_tokens(ids), torch.ones(2, 9, dtype=torch.bool))
    torch.testing.assert_close(got, bidir, atol=1e-6, rtol=1e-5)
    assert (got - causal).abs().max() > 1e-3


def test_list_args_shows_the_full_scale_args(capsys):
    rc, out, _ = bench(["list", "--args", "lavida"], capsys)
    assert rc == 0 and "model lavida (scale tiny)" in out
    assert "at scale full: --weights PATH (required)" in out and "--model-arg pool_side=14" in out
