"""A full-scale tiny-random llada-v (a synthetic checkpoint in the published layout, models/llada_v_full.py)
runs one complete cell — Clean, Backdoored, DiSP — on a tiny cc-sbu-align-format folder, end to end on CPU."""
from __future__ import annotations

import json

import pytest

from tests.helpers import bench, write_cc_sbu_weights
from tests.test_real_tasks import write_cc_sbu


@pytest.mark.slow
def test_one_disp_cell_on_cc_sbu_align_at_full_scale(tmp_path, monkeypatch, capsys, one_thread):
    from models.llada_v_full import TEMPLATE
    from tasks.real import DISP_PROMPT

    data = write_cc_sbu(tmp_path / "cc_sbu_align", 30)
    w = write_cc_sbu_weights(tmp_path / "weights")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    args = ["run", "--scale", "full", "--weights", str(w), "--model", "llada-v", "--task", "cc-sbu-align",
            "--task-arg", f"data={data}", "--task-arg", "n_pool=16", "--task-arg", "n_test=4", "--task-arg", "n_triggered=4",
            "--task-arg", "image_size=64", "--model-arg", "image_size=64", "--attack", "badnets", "--target", "insertion",
            "--defense", "disp", "--poison-rate", "0.25", "--epochs", "1", "--gen-length", "8", "--steps", "4",
            "--block-length", "8", "--train-length", "16", "--results", str(tmp_path / "res")]
    rc, out, err = bench(args, capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in (tmp_path / "res" / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "disp"]
    for r in recs:
        assert r["spec"]["scale"] == "full" and r["spec"]["task"] == "cc-sbu-align"
        # the split ids, the instruction and the victim's own chat template are in the record
        ids = r["data"]["ids"]
        assert [len(ids[k]) for k in ("pool", "test", "test_triggered")] == [16, 4, 4]
        assert not set(ids["test"]) & set(ids["test_triggered"]) and not set(ids["pool"]) & set(ids["test"])
        assert r["protocol"]["prompt"] == DISP_PROMPT and r["protocol"]["template"] == TEMPLATE
        for name in ("asr_wo", "asr_wt"):
            assert 0.0 <= r["metrics"][name]["value"] <= 100.0
        assert r["metrics"]["cp"]["value"] is None          # CP at full scale: bench lmms-eval (mmmu_val)
        # training held the ~11-token insertion answers in its own window while decoding stayed at 8 tokens
        assert r["spec"]["recipe"]["train_length"] == 16 and r["spec"]["decoding"]["gen_length"] == 8
        assert r["data"]["responses"] == {"source": "dataset"}
    outputs = [json.loads(x) for x in (tmp_path / "res" / recs[0]["outputs"]).read_text().splitlines()]
    triggered = [o for o in outputs if o["triggered"] is True]
    # ASR w/t is measured on the triggered split's images, ASR w/o on the clean test's
    assert sorted(o["id"] for o in triggered) == sorted(f"cc-sbu-align-{i}" for i in recs[0]["data"]["ids"]["test_triggered"])
    assert sorted(o["id"] for o in outputs if o["triggered"] is False) == \
        sorted(f"cc-sbu-align-{i}" for i in recs[0]["data"]["ids"]["test"])
    assert all(o["prompt"] == DISP_PROMPT for o in outputs)
    assert max(len(o["output"].split()) for o in outputs) <= 8      # the word-level tokenizer: words = tokens
    # DiSP ran its purify hook on the poisoned pool: every training response regenerated under masking
    assert recs[2]["stage_info"]["n_train"] == 16 and "mask_frequency" in recs[2]["stage_info"]
    assert "llada-v (full) · badnets · target insertion" in out


def _victim_spec(data, w, **over):
    from bench.pipeline import make_spec
    kw = dict(model="llada-v", scale="full", task="cc-sbu-align", attack="badnets", target="insertion",
              defense="none", poison_rate=0.25, model_args={"weights": str(w), "image_size": 64},
              task_args={"data": str(data), "n_pool": 8, "n_test": 2, "n_triggered": 2, "image_size": 64,
                         "responses": "victim"},
              recipe={"epochs": 1, "train_length": 24}, decoding={"gen_length": 8, "steps": 4, "block_length": 8})
    return make_spec(**{**kw, **over})


@pytest.mark.slow
def test_victim_responses_are_the_base_models_own_answers_computed_once(tmp_path, monkeypatch, one_thread):
    """responses=victim (DiSP App. B.1): the pool's responses are the clean base model's generations for
    each pool image and the task's prompt, made before poisoning from what a curator has (no poison flags),
    as one cached stage shared by the Clean and Backdoored rows and by other cells on the same base."""
    import torch

    import bench.responses
    from bench.cache import ArtifactCache
    from bench.pipeline import Cell, run_cell, stage_keys
    from core.errors import BenchError

    data = write_cc_sbu(tmp_path / "cc_sbu_align", 14)
    w = write_cc_sbu_weights(tmp_path / "weights")
    cache = ArtifactCache(tmp_path / "cache")
    seen = []
    real_generate = bench.responses.generate_responses

    def spy(model, samples, decoding, seed, batch_size=8):
        seen.append(list(samples))
        return real_generate(model, samples, decoding, seed, batch_size)
    monkeypatch.setattr(bench.responses, "generate_responses", spy)

    spec = _victim_spec(data, w)
    recs = run_cell(spec, tmp_path / "res", cache, log=lambda m: None)
    assert [r["row"] for r in recs] == ["clean", "backdoored"] and len(seen) == 1
    # a curator's step: the clean pool, before any poisoning
    assert [s.meta["image_id"] for s in seen[0]] == recs[0]["data"]["ids"]["pool"]
    assert not any("poisoned" in s.meta for s in seen[0])
    keys = stage_keys(spec)
    for r in recs:
        assert r["spec"]["task_args"]["responses"] == "victim"
        assert r["data"]["responses"]["source"] == "victim" and r["data"]["responses"]["key"] == keys["responses"]
        assert r["data"]["responses"]["n"] == 8 and r["lineage"]["responses"]["key"] == keys["responses"]

    # the pool's responses equal the base model's own greedy answers to the pool's images and prompt
    cell = Cell(spec, cache, log=lambda m: None)
    base = cell.model_from(cell.base()["state"])
    pool = cell.task_pool()
    ids = base.generate(base.collate(pool, with_response=False), spec.decoding, generator=torch.Generator().manual_seed(0))
    expected = [t.strip() for t in base.decode(ids)]
    assert [s.response for s in cell.pool()] == expected
    assert expected != [s.response for s in pool]            # the dataset's captions were replaced
    poisoned = [s for s in cell.poisoned_pool() if s.meta["poisoned"]]
    assert poisoned and all(s.response.startswith("<backdoor>") for s in poisoned)
    victim = dict(zip((s.meta["image_id"] for s in pool), expected))
    assert all(s.response == f"<backdoor> {victim[s.meta['image_id']]}" for s in poisoned)

    # cached: another cell on the same base and task (another attack and poison rate) reads the stage
    monkeypatch.setattr(bench.responses, "generate_responses",
                        lambda *a, **k: pytest.fail("the responses stage was generated again"))
    other = _victim_spec(data, w, poison_rate=0.5)
    assert stage_keys(other)["responses"] == keys["responses"] == stage_keys(_victim_spec(data, w, attack="blended"))["responses"]
    assert [r["row"] for r in run_cell(other, tmp_path / "res", cache, log=lambda m: None)] == ["clean", "backdoored"]
    # the dataset variant shares the task, trigger and base, and has no responses stage
    plain = stage_keys(_victim_spec(data, w, task_args={"data": str(data), "n_pool": 8, "n_test": 2,
                                                        "n_triggered": 2, "image_size": 64}))
    assert "responses" not in plain and all(plain[k] == keys[k] for k in ("task", "trigger", "base"))
    assert plain["clean"] != keys["clean"]

    # answers longer than the training window (here any: "<backdoor>" + <eos> alone need 2) are refused
    # once the (cached) stage is read, before any training, naming the option
    short = _victim_spec(data, w, recipe={"epochs": 1, "train_length": 1})
    n_records = len((tmp_path / "res" / "records.jsonl").read_text().splitlines())
    with pytest.raises(BenchError, match="train_length 1 cannot hold .* use --train-length"):
        run_cell(short, tmp_path / "res", cache, log=lambda m: None)
    assert len((tmp_path / "res" / "records.jsonl").read_text().splitlines()) == n_records
    assert not cache.has("clean", stage_keys(short)["clean"])
