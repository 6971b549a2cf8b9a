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
            "--defense", "disp", "--poison-rate", "0.25", "--epochs", "1", "--gen-length", "16", "--steps", "4",
            "--block-length", "8", "--results", str(tmp_path / "res")]
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
    outputs = [json.loads(x) for x in (tmp_path / "res" / recs[0]["outputs"]).read_text().splitlines()]
    triggered = [o for o in outputs if o["triggered"] is True]
    # ASR w/t is measured on the triggered split's images, ASR w/o on the clean test's
    assert sorted(o["id"] for o in triggered) == sorted(f"cc-sbu-align-{i}" for i in recs[0]["data"]["ids"]["test_triggered"])
    assert sorted(o["id"] for o in outputs if o["triggered"] is False) == \
        sorted(f"cc-sbu-align-{i}" for i in recs[0]["data"]["ids"]["test"])
    assert all(o["prompt"] == DISP_PROMPT for o in outputs)
    # DiSP ran its purify hook on the poisoned pool: every training response regenerated under masking
    assert recs[2]["stage_info"]["n_train"] == 16 and "mask_frequency" in recs[2]["stage_info"]
    assert "llada-v (full) · badnets · target insertion" in out
