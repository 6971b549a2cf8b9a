"""Full scale of the autoregressive victims without real weights: synthetic checkpoints in each
published layout (written by `save_pretrained` of tiny random configs of the published classes, a
word-level tokenizer and the published image-processor class) load offline with zero missing or
unexpected keys, reproduce the logits of the module they were written from, run the victim contract,
and a renamed or reshaped key exits 2 naming it."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.errors import BenchError
from tasks.base import Sample

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "USER:", "ASSISTANT:", "Question:", "Answer:", "what", "is", "in",
         "the", "image", "?", "a", "cat", "dog", "red", "blue"]


def write_tokenizer(path, extra=("<image>",)):
    """A word-level tokenizer that adds <s> like LLaMA's and OPT's, saved in the tokenizer.json layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": list(extra)})
    tok.save_pretrained(path)
    return tok


def samples(n=2, size=40, seed=0):
    rng = np.random.default_rng(seed)
    qs = ["what is in the image ?", "what is in image"]
    ans = ["a cat", "red dog"]
    return [Sample(rng.random((size, size, 3)).astype(np.float32), qs[i % 2], ans[i % 2]) for i in range(n)]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    path = tmp_path_factory.mktemp("llava-1.5")
    tok = write_tokenizer(path)
    torch.manual_seed(0)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=14)
    txt = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vis, text_config=txt,
                                                      image_token_index=tok.convert_tokens_to_ids("<image>"))).eval()
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTConfig)

    path = tmp_path_factory.mktemp("blip2-opt")
    tok = write_tokenizer(path)
    torch.manual_seed(0)
    vis = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14)
    qf = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=len(tok))
    txt = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = Blip2Config(vision_config=vis.to_dict(), qformer_config=qf.to_dict(), text_config=txt.to_dict(),
                      num_query_tokens=5, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    BlipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(path)
    return path, model


def build(name, path):
    from core.registry import get

    entry = get("models", name)
    return entry.build(entry.resolve("full", {"weights": str(path), "dtype": "float32"}), None, None, 0)


def assert_published_forward(m, ref, batch):
    """Our first-answer logits equal the transformers class's own forward on input_ids + pixel_values."""
    with torch.no_grad():
        want = ref(input_ids=batch.ids, pixel_values=m.pixel_values(batch.images),
                   attention_mask=batch.key_mask.long()).logits[:, -1]
        got = m.first_answer_logits(batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- LLaVA ----------------------------------------------------------------------------------------
def test_llava_full_loads_and_reproduces_the_published_forward(llava_dir):
    """Our path (visual tokens scattered into inputs_embeds) gives the logits of the class's own
    forward on input_ids + pixel_values, with the weights it was saved from."""
    path, ref = llava_dir
    m = build("llava", path)
    assert type(m).__name__ == "LlavaFull" and m.n_visual == 4      # (28 / 14)^2, CLS dropped ("default")
    for (k, v), (k2, v2) in zip(sorted(m.hf.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(v, v2)
    batch = m.collate(samples(1), gen_length=6)
    assert batch.ids[0, 0].item() == 1 and batch.ids[0, 1].item() == m.tok.hf.convert_tokens_to_ids("USER:")
    assert_published_forward(m, ref, batch)


def test_llava_full_contract(llava_dir):
    """Collation (left padding), loss with gradients reaching only the projector through inputs_embeds,
    greedy decoding, decode, CP option ids."""
    m = build("llava", llava_dir[0])
    batch = m.collate(samples(2), gen_length=6)
    assert (~batch.key_mask[1, :2]).all() and batch.key_mask[0].all()               # the shorter prompt is left-padded
    assert (batch.ids.gather(1, batch.vis_pos) == m.tok.image_id).all()
    m.set_trainable("projector")
    visual = m.visual_embeds(batch.images).detach().requires_grad_(True)
    logits = m._logits(m.prompt_embeds(batch, visual), batch.key_mask).logits
    logits[:, -1].sum().backward()
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    loss = m.loss(batch)
    loss.backward()
    trained = {n.split(".")[1] for n, p in m.hf.named_parameters() if p.grad is not None}
    assert trained == {"multi_modal_projector"}
    out = m.generate(batch, SimpleNamespace(gen_length=4))
    assert out.shape == (2, 4) and len(m.decode(out)) == 2
    assert m.decode(batch.response) == ["a cat", "red dog"]
    assert m.tok.token("cat") == m.tok.hf.convert_tokens_to_ids("cat")


def test_llava_full_cached_decoding_matches_the_full_forward(llava_dir):
    """Cached greedy decoding equals re-running the whole sequence each step (padding included)."""
    m = build("llava", llava_dir[0])
    batch = m.collate(samples(2), gen_length=6)
    out = m.generate(batch, SimpleNamespace(gen_length=3))
    with torch.no_grad():
        pe, keys, toks = m.prompt_embeds(batch), batch.key_mask, []
        for _ in range(3):
            nxt = m._logits(pe, keys).logits[:, -1].argmax(-1)
            toks.append(nxt)
            pe = torch.cat([pe, m.hf.get_input_embeddings()(nxt[:, None])], dim=1)
            keys = torch.cat([keys, torch.ones_like(keys[:, :1])], dim=1)
    want = torch.stack(toks, 1)
    eos = m.tok.eos_id
    for row, ref in zip(out, want):           # equal up to the first <eos> (after it decoding writes <eos>)
        n = int((ref == eos).nonzero()[0]) + 1 if (ref == eos).any() else len(ref)
        assert torch.equal(row[:n], ref[:n])


@pytest.mark.parametrize("mode", ["rename", "reshape"])
def test_llava_mismatched_checkpoint_exits_2_naming_the_key(llava_dir, tmp_path, mode, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(llava_dir[0], bad)
    sd = load_file(bad / "model.safetensors")
    key = "multi_modal_projector.linear_1.weight"
    if mode == "rename":
        sd["multi_modal_projector.linear_9.weight"] = sd.pop(key)
    else:
        sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BenchError, match="unexpected .*linear_9" if mode == "rename" else "shape mismatch.*linear_1"):
        build("llava", bad)
    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "llava", "--scale", "full", "--weights", str(bad), "--model-arg",
              "dtype=float32", "--defense", "crossview", "--results", str(tmp_path / "results"), "--cache", str(tmp_path / "cache")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "bench: error: llava:" in err and "Traceback" not in err
    assert not (tmp_path / "results" / "records.jsonl").exists()


def test_full_scale_refuses_what_it_cannot_load(tmp_path):
    from core.registry import get

    entry = get("models", "llava")
    with pytest.raises(BenchError, match="not a local directory"):
        entry.resolve("full", {"weights": "llava-hf/llava-1.5-7b-hf"})           # a hub id: no downloads
    with pytest.raises(BenchError, match="no config.json"):
        entry.resolve("full", {"weights": str(tmp_path)})
    with pytest.raises(BenchError, match="needs --weights"):
        entry.build(entry.resolve("full", {}), None, None, 0)
    with pytest.raises(BenchError, match="dtype"):
        entry.resolve("full", {"dtype": "int8"})


# ---- BLIP-2 ---------------------------------------------------------------------------------------
def test_blip2_full_loads_and_reproduces_the_published_forward(blip2_dir):
    """Query tokens before the BOS (transformers 5's Blip2Processor layout); our inputs_embeds path gives
    the class's own forward logits on input_ids + pixel_values."""
    path, ref = blip2_dir
    m = build("blip2", path)
    assert type(m).__name__ == "Blip2Full" and m.n_visual == 5
    batch = m.collate(samples(1), gen_length=6)
    assert batch.ids[0, :5].tolist() == [m.tok.image_id] * 5 and batch.ids[0, 5].item() == 1
    assert_published_forward(m, ref, batch)


def test_blip2_full_contract_and_trainable_parts(blip2_dir):
    m = build("blip2", blip2_dir[0])
    batch = m.collate(samples(2), gen_length=6)
    m.set_trainable("projector")
    m.loss(batch).backward()
    trained = {n.split(".")[0] for n, p in m.hf.named_parameters() if p.grad is not None}
    assert trained == {"qformer", "query_tokens", "language_projection"}
    out = m.generate(batch, SimpleNamespace(gen_length=3))
    assert out.shape == (2, 3)
    assert m.phi_module() is m.hf.qformer


def test_blip2_without_image_token_is_refused_by_name(blip2_dir, tmp_path):
    import json

    bad = tmp_path / "old-snapshot"
    shutil.copytree(blip2_dir[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("image_token_index", None)
    cfg["image_token_id"] = None
    (bad / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(bad, extra=())
    with pytest.raises(BenchError, match="image_token_index"):
        build("blip2", bad)


def test_blip2_mismatched_checkpoint_names_the_key(blip2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(blip2_dir[0], bad)
    sd = load_file(bad / "model.safetensors")
    sd["qformer_renamed.layernorm.weight"] = sd.pop("qformer.layernorm.weight")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BenchError, match="missing .*qformer.layernorm.weight"):
        build("blip2", bad)


def test_bench_list_shows_full_for_every_ar_victim():
    from core.registry import get

    for name in ("llava", "blip2", "openflamingo", "otter"):
        assert "full" in get("models", name).scales


# ---- OpenFlamingo / Otter -------------------------------------------------------------------------
def flamingo_source(flavour, tok_path, vision, lm, processor):
    """Our Flamingo around a tiny CLIP tower and LLaMA (embeddings resized for the repo's added tokens),
    with open gates and random connector weights: the module a synthetic checkpoint is written from."""
    from models.flamingo_published import SPECIALS, TEMPLATES, FlamingoFull, _tokenizer

    tok = _tokenizer(tok_path, flavour, flavour)
    src = FlamingoFull.__new__(FlamingoFull)
    torch.nn.Module.__init__(src)
    src.layers_attr, src.processor, src.flavour = "model.layers", processor, flavour
    FlamingoFull._resize(lm, len(tok))
    src.assemble(vision, lambda: lm, 32, 32, depth=2, num_latents=4, dim_head=8, heads=8, xattn_every=1)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(0.7)
    src.init_chat(tok, TEMPLATES[flavour], 1, tok.convert_tokens_to_ids("<image>"),
                  eos_id=tok.convert_tokens_to_ids(SPECIALS[flavour][0]))
    return src.eval()


def tiny_parts(path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tok = write_tokenizer(path, extra=())
    torch.manual_seed(1)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=28, patch_size=14)).eval()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=3)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return vision, lm, processor


@pytest.fixture(scope="module")
def openflamingo_dir(tmp_path_factory):
    """The published OpenFlamingo layout: checkpoint.pt (perceiver, gated blocks, embeddings only) beside
    vision/ (CLIPVisionModel) and lm/ (a causal LM and its tokenizer)."""
    root = tmp_path_factory.mktemp("openflamingo")
    vision, lm, processor = tiny_parts(root / "lm")
    vision.save_pretrained(root / "vision")
    processor.save_pretrained(root / "vision")
    lm.save_pretrained(root / "lm")
    src = flamingo_source("openflamingo", root / "lm", vision, lm, processor)
    keep = {k: v for k, v in src.state_dict().items()
            if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or k == "lang_encoder.model.embed_tokens.weight"}
    torch.save(keep, root / "checkpoint.pt")
    return root, src


@pytest.fixture(scope="module")
def otter_dir(tmp_path_factory):
    """Otter's published layout: one directory, config.json with vision/text configs, the whole model's
    weights under Otter's names (its rename table applied), the base tokenizer beside them."""
    import json

    from models.checkpoint import write_checkpoint
    from models.flamingo_published import otter_name

    root = tmp_path_factory.mktemp("otter")
    vision, lm, processor = tiny_parts(root)
    processor.save_pretrained(root)
    src = flamingo_source("otter", root, vision, lm, processor)
    config = {"model_type": "otter", "cross_attn_every_n_layers": 1, "vision_config": vision.config.to_dict(),
              "text_config": {**lm.config.to_dict(), "vocab_size": len(src.tok.hf)}}
    write_checkpoint(root, {otter_name(k): v for k, v in src.state_dict().items()}, config, shard_bytes=40_000)
    (root / "config.json").write_text(json.dumps(config))
    return root, src


@pytest.mark.parametrize("flavour", ["openflamingo", "otter"])
def test_flamingo_full_loads_its_published_layout_and_reproduces_the_logits(flavour, openflamingo_dir, otter_dir):
    root, src = openflamingo_dir if flavour == "openflamingo" else otter_dir
    m = build(flavour, root)
    assert type(m).__name__ == "FlamingoFull" and m.weights_report.ok
    got_sd, want_sd = m.state_dict(), src.state_dict()
    assert set(got_sd) == set(want_sd) and all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    batch = m.collate(samples(2), gen_length=6)
    assert (batch.ids.gather(1, batch.vis_pos) == m.tok.image_id).all()
    with torch.no_grad():
        got, want = m.first_answer_logits(batch), src.first_answer_logits(batch)
        blind = m.first_answer_logits(batch, torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, blind, atol=1e-4)          # the open gates make the image matter
    m.set_trainable("projector")
    m.loss(batch).backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("perceiver.") or ".gated_cross_attn_layer." in n for n in trained)
    out = m.generate(batch, SimpleNamespace(gen_length=3))
    assert out.shape == (2, 3) and m.tok.eos_id == m.tok.hf.convert_tokens_to_ids("<|endofchunk|>")


def test_otter_rename_table_is_its_published_names():
    from models.flamingo_published import otter_key, otter_name

    pairs = {"perceiver.layers.3.to_kv.weight": "perceiver.layers.3.0.to_kv.weight",
             "perceiver.layers.0.feed_forward.3.weight": "perceiver.layers.0.1.3.weight",
             "lang_encoder.transformer.blocks.7.gated_cross_attn_layer.feed_forward.1.weight":
                 "lang_encoder.transformer.blocks.7.gated_cross_attn_layer.ff.1.weight",
             "lang_encoder.model.layers.0.gated_cross_attn_layer.ff_gate": "lang_encoder.model.layers.0.gated_cross_attn_layer.ff_gate",
             "perceiver.latents": "perceiver.latents", "vision_encoder.vision_model.post_layernorm.weight":
                 "vision_encoder.vision_model.post_layernorm.weight"}
    for otter, ours in pairs.items():
        assert otter_key(otter) == ours and otter_name(ours) == otter


def test_openflamingo_mismatched_checkpoint_exits_2_naming_the_key(openflamingo_dir, tmp_path):
    root = tmp_path / "of"
    shutil.copytree(openflamingo_dir[0], root)
    state = torch.load(root / "checkpoint.pt")
    state["perceiver.layers.1.0.to_qq.weight"] = state.pop("perceiver.layers.1.0.to_q.weight")
    torch.save(state, root / "checkpoint.pt")
    with pytest.raises(BenchError, match=r"missing .*perceiver\.layers\.1\.0\.to_q\.weight.*unexpected .*to_qq"):
        build("openflamingo", root)


def test_otter_mismatched_checkpoint_exits_2_naming_the_key(otter_dir, tmp_path):
    from models.checkpoint import read_config, write_checkpoint
    from safetensors.torch import load_file

    root = tmp_path / "otter"
    shutil.copytree(otter_dir[0], root)
    tensors = {}
    for f in sorted(root.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    key = "perceiver.layers.0.feed_forward.1.weight"
    tensors[key] = tensors[key][:-1].contiguous()
    write_checkpoint(root, tensors, read_config(root))
    with pytest.raises(BenchError, match=r"shape mismatch: perceiver\.layers\.0\.feed_forward\.1\.weight"):
        build("otter", root)


# The connector each class trains under "projector" (module-name prefixes; "*" marks a substring).
PROJECTOR = {"llava": ("hf.model.multi_modal_projector.",), "blip2": ("hf.qformer.", "hf.language_projection.", "hf.query_tokens"),
             "openflamingo": ("perceiver.", "*.gated_cross_attn_layer."), "otter": ("perceiver.", "*.gated_cross_attn_layer.")}


def _is_projector(name: str, model: str) -> bool:
    return any(p[1:] in name if p.startswith("*") else name.startswith(p) for p in PROJECTOR[model])


@pytest.mark.parametrize("parts", ["projector", "projector+lm", "all"])
@pytest.mark.parametrize("name", ["llava", "blip2", "openflamingo", "otter"])
def test_stages_keep_the_trained_parts_and_the_hash_only(name, parts, llava_dir, blip2_dir, openflamingo_dir, otter_dir):
    """A stage stores exactly the parameters `set_trainable(parts)` opened plus the checkpoint hash (no copy
    of the untouched published weights), reloads into a fresh build with the trained model's logits, and
    refuses a stage trained on other weights; the checkpoint's tokenizer is what the pipeline's
    answer-length check counts with."""
    from core.registry import get

    root = {"llava": llava_dir, "blip2": blip2_dir, "openflamingo": openflamingo_dir, "otter": otter_dir}[name][0]
    m = build(name, root)
    assert not any(p.requires_grad for p in m.parameters())               # frozen until a fine-tune opens parts
    m.set_trainable(parts)
    trained = {n for n, p in m.named_parameters() if p.requires_grad}
    projector = {n for n, _ in m.named_parameters() if _is_projector(n, name)}
    assert projector <= trained and (trained == projector) == (parts == "projector")
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    m.requires_grad_(False)                                              # as a fine-tune leaves it
    state = m.stage_state()
    assert state["checkpoint"] == m.cfg.checkpoint and len(state["checkpoint"]) == 64
    assert set(state["trained"]) == trained                              # exactly what was opened
    batch = m.collate(samples(2), gen_length=6)
    fresh = build(name, root)
    with torch.no_grad():
        before = fresh.first_answer_logits(batch)
        fresh.load_stage_state(state)
        got, want = fresh.first_answer_logits(batch), m.first_answer_logits(batch)
    assert torch.equal(got, want) and not torch.allclose(before, want)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))
    with pytest.raises(BenchError, match="trained on checkpoint"):
        fresh.load_stage_state({**state, "checkpoint": "0" * 64})
    tok = get("models", name).text_tokenizer({"weights": str(root)})
    assert tok.encode("a cat") == m.tok.encode("a cat") and tok.eos_id == m.tok.eos_id
    assert get("models", name).text_tokenizer({"weights": ""}) is None


def test_check_weights_command(llava_dir, tmp_path, capsys):
    from bench.cli import main
    from safetensors.torch import load_file, save_file

    with pytest.raises(SystemExit) as e:
        main(["check-weights", "--model", "llava", str(llava_dir[0])])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "status: OK" in out and "sha256:" in out
    bad = tmp_path / "bad"
    shutil.copytree(llava_dir[0], bad)
    sd = load_file(bad / "model.safetensors")
    sd["multi_modal_projector.linear_2.bias"] = sd["multi_modal_projector.linear_2.bias"][:-1].clone()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit) as e:
        main(["check-weights", "--model", "llava", str(bad)])
    assert e.value.code == 2 and "linear_2.bias" in capsys.readouterr().err


def test_another_models_checkpoint_is_refused_by_name(blip2_dir, capsys):
    from bench.cli import main

    with pytest.raises(BenchError, match="holds a 'blip-2' checkpoint, not 'llava'"):
        build("llava", blip2_dir[0])
    with pytest.raises(SystemExit) as e:
        main(["list", "--args", "otter"])
    assert e.value.code == 0 and "at scale full: --weights PATH" in capsys.readouterr().out


@pytest.mark.parametrize("flavour", ["openflamingo", "otter"])
def test_flamingo_check_weights_reads_no_tensor_data(flavour, openflamingo_dir, otter_dir, tmp_path, capsys, monkeypatch):
    """bench check-weights builds the Flamingo on the meta device (no weights materialised) and reports
    the key match; a renamed perceiver key exits 2 naming it."""
    from bench.cli import main
    from models import flamingo_published

    root = (openflamingo_dir if flavour == "openflamingo" else otter_dir)[0]
    monkeypatch.setattr(flamingo_published, "fill", lambda *a, **k: pytest.fail("check-weights read tensors"))
    with pytest.raises(SystemExit) as e:
        main(["check-weights", "--model", flavour, str(root)])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "status: OK" in out and "perceiver" in out
    if flavour == "openflamingo":
        bad = tmp_path / "of"
        shutil.copytree(root, bad)
        state = torch.load(bad / "checkpoint.pt")
        state["perceiver.norm.weight_renamed"] = state.pop("perceiver.norm.weight")
        torch.save(state, bad / "checkpoint.pt")
        with pytest.raises(SystemExit) as e:
            main(["check-weights", "--model", flavour, str(bad)])
        assert e.value.code == 2 and "perceiver.norm.weight_renamed" in capsys.readouterr().err
