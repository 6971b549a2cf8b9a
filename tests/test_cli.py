"""The `bench` CLI end to end on a reduced config (smaller sizes, same code path)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import bench

ROOT = Path(__file__).resolve().parent.parent
# A reduced config: every stage of the real pipeline runs, on small sizes.
SMALL = ["--model-arg", "enc_dim=32", "--model-arg", "enc_layers=2", "--model-arg", "enc_heads=2",
         "--model-arg", "d_model=48", "--model-arg", "n_layers=2", "--model-arg", "n_heads=2",
         "--model-arg", "mlp_hidden=96", "--model-arg", "mim_epochs=1", "--model-arg", "base_epochs=2",
         "--task-arg", "n_base=200", "--task-arg", "n_pool=100", "--task-arg", "n_test=16", "--task-arg", "n_mc=24",
         "--task-arg", "n_encoder=200", "--epochs", "2", "--steps", "4"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE", str(d))
    return d


def files_under(p: Path) -> list[Path]:
    return sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []


@pytest.mark.parametrize("args, needle", [
    (["--model", "nope"], "unknown model 'nope' (valid: blip2, lavida, llada-v, llava, openflamingo, otter)"),
    (["--attack", "nope"], "unknown attack 'nope' (valid: badnets"),
    (["--target", "nope"], "unknown target 'nope' (valid: insertion, keyword, misclassification, refusal"),
    (["--defense", "nope"], "unknown defense 'nope' (valid: bye, crossview, disp, disp-nomask, disp-random, entropy-filter"),
    (["--poison-rate", "1.5"], "poison rate must be in (0, 1)"),
    (["--poison-rate", "0"], "poison rate must be in (0, 1)"),
    (["--poison-rate", "abc"], "'abc' is not a valid float"),
    (["--trainable", "encoder"], "unknown trainable parts 'encoder' (valid: projector, projector+lm, all)"),
    (["--attack-arg", "bogus=1"], "unknown attack badnets arg(s) ['bogus'] (valid: size, position, color)"),
    (["--attack-arg", "size=big"], "attack badnets arg size='big' is not a float"),
    (["--attack", "wanet", "--attack-arg", "k=big"], "attack wanet arg k='big' is not a int"),
    (["--attack", "wanet", "--attack-arg", "warp=1"], "unknown attack wanet arg(s) ['warp'] (valid: k, s, grid_rescale, cross_ratio, scale_s)"),
    (["--attack", "dualkey", "--attack-arg", "text_key=two words"], "dualkey text_key 'two words' must be one word"),
    (["--attack", "blended", "--attack-arg", "alpha=1.5"], "blended alpha 1.5 must be in (0, 1)"),
    (["--target", "keyword", "--target-arg", "position=middle"], "keyword position 'middle' (valid: start, end)"),
    (["--target", "keyword", "--target-arg", "word=pineapple"],
     "target keyword: word 'pineapple' is not in the synthetic-task vocabulary"),
    (["--attack", "dualkey", "--attack-arg", "text_key=please"],
     "attack dualkey: word 'please' is not in the synthetic-task vocabulary"),
    (["--defense-arg", "mask_ratio=2"], "disp mask_ratio 2.0 must be in [0, 1)"),
    (["--model-arg", "d_model=wide"], "model arg d_model='wide' is not a int"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, needle, tmp_path, cache, capsys):
    results = tmp_path / "results"
    code, out, err = bench(["run", "--results", str(results)] + args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert files_under(results) == [] and files_under(cache) == []


def test_unwritable_results_dir(tmp_path, cache, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = bench(["run", "--results", str(blocker / "sub")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not writable" in err
    assert files_under(cache) == []


def test_list_shows_every_registered_name(capsys):
    code, out, _ = bench(["list"], capsys)
    assert code == 0
    names = {tuple(line.split()[:2]) for line in out.strip().splitlines()}
    for kind, name in [("attack", "badnets"), ("target", "insertion"), ("target", "refusal"),
                       ("target", "misclassification"), ("defense", "disp"), ("defense", "disp-nomask"),
                       ("defense", "disp-random"), ("defense", "none"), ("model", "llada-v"), ("task", "synthetic"),
                       ("target", "keyword"), ("attack", "badnets-classic")] + [
            ("attack", a) for a in ("noise", "multi", "blended", "lowfreq", "wanet", "inputaware", "dualkey")]:
        assert (kind, name) in names
    # a victim's family, scales, capabilities and trainable parts; what a defense needs of its victim
    assert ("family: masked-diffusion VLM; scales: tiny, full; capabilities: masked-diffusion, image-attention; "
            "trainable: projector, projector+lm, all") in out
    lines = out.splitlines()
    needs = lambda name: lines[lines.index(next(x for x in lines if x.startswith(f"defense  {name} "))) + 1]
    assert "hook: purify" in needs("disp") and "needs a victim with: masked-diffusion" in needs("disp")
    assert "held-out" not in needs("disp") and "oracle" not in needs("disp")
    assert "hook: guard" in needs("strip") and "+ 100 held-out clean samples" in needs("strip")
    assert "poison flags (oracle)" in needs("oracle-filter") and "retrains from the base" in needs("oracle-filter")
    assert "hook: objective" in needs("crossview")


@pytest.mark.slow
def test_run_records_resume_determinism_leaderboard_show(tmp_path, cache, capsys, monkeypatch):
    results = tmp_path / "results"
    args = ["run", "--results", str(results), "--target", "insertion"] + SMALL
    code, out, err = bench(args, capsys)
    assert code == 0, err
    # the DiSP paper's Table 1 layout
    assert "Clean" in out and "Backdoored" in out and "DiSP" in out
    assert "CP" in out and "ASR (w/o)" in out and "ASR (w/t)" in out
    assert "ΔCP vs Backdoored" in out and out.count("CP (blind)") == 3    # the defense's cost, CP's image check
    recs = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "disp"]
    for r in recs:
        spec = r["spec"]
        for f in ("model", "scale", "task", "attack", "target", "poison_rate", "defense", "seed", "trainable",
                  "prompt_template", "decoding", "attack_args", "defense_args", "model_args", "recipe"):
            assert f in spec
        assert spec["decoding"]["gen_length"] == 32 and spec["attack_args"]["position"] == "top-left"
        for m in ("cp", "asr_wo", "asr_wt", "asr_train", "bleu4", "cider", "obj_acc"):
            assert set(r["metrics"][m]) == {"value", "ci"}
        # the Clean row's question "does it see": object accuracy per category on the single-object probe
        assert set(r["object_accuracy"]) == {"dog", "boat", "cat", "car", "tree", "house", "fish", "bird"}
        assert r["metrics"]["obj_acc_min"]["value"] == min(r["object_accuracy"].values())
        for m in ("cp", "asr_wo", "asr_wt"):
            v, (lo, hi) = r["metrics"][m]["value"], r["metrics"][m]["ci"]
            assert 0 <= lo <= v <= hi <= 100
        rows = [json.loads(x) for x in (results / r["outputs"]).read_text().splitlines()]
        # clean + triggered test inputs, and the 20 poisoned training inputs (asr_train)
        assert len(rows) == 32 + 20 and {"id", "output", "triggered", "verdicts"} <= set(rows[0])
        assert sum(x["triggered"] == "train" for x in rows) == 20
        assert r["timings"] and r["versions"]["torch"] and r["code_revision"]
        assert r["versions"]["torch_threads"] >= 1
    assert recs[0]["timings"]["base"] > 0 and recs[2]["timings"]["defended"] > 0 and recs[2]["timings"]["evaluated_disp"] > 0
    first = {r["row"]: r["metrics"] for r in recs}

    # warm: every stage comes from the cache, same numbers
    code, _, err = bench(args, capsys)
    assert code == 0, err
    again = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()][3:]
    assert all(v == 0.0 for r in again for v in r["timings"].values())
    assert {r["row"]: r["metrics"] for r in again} == first

    # cold cache, same spec and seed: same numbers
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache2"))
    code, _, err = bench(args + ["--results", str(tmp_path / "results2")], capsys)
    assert code == 0, err
    cold = [json.loads(line) for line in (tmp_path / "results2" / "records.jsonl").read_text().splitlines()]
    assert {r["row"]: r["metrics"] for r in cold} == first

    # leaderboard re-renders from records alone, byte for byte
    board = tmp_path / "board"
    code, out, err = bench(["leaderboard", "--results", str(results), "--out", str(board)], capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in files_under(board)}
    assert any(n.endswith(".md") for n in before) and any(n.endswith(".csv") for n in before)
    for p in files_under(board):
        p.unlink()
    bench(["leaderboard", "--results", str(results), "--out", str(board)], capsys)
    assert {p.name: p.read_bytes() for p in files_under(board)} == before

    # show: metrics and side-by-side outputs of one cell, and a plot
    code, out, err = bench(["show", "--results", str(results), "--plot", str(tmp_path / "cell.png")], capsys)
    assert code == 0, err
    assert "DiSP" in out and "Backdoored" in out and (tmp_path / "cell.png").stat().st_size > 1000

    # a corrupt cache entry: one line, exit 2, no record written
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    payload = next(cache.glob("backdoored/*/*/payload.pt"))
    payload.write_bytes(payload.read_bytes()[:-100] + b"x" * 100)
    n_before = len((results / "records.jsonl").read_text().splitlines())
    code, _, err = bench(args, capsys)
    assert code == 2 and "corrupt cache entry" in err and len(err.strip().splitlines()) == 1
    assert len((results / "records.jsonl").read_text().splitlines()) == n_before


@pytest.mark.slow
def test_killed_run_resumes_from_finished_stages(tmp_path, cache):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.cli", "run", "--results", str(results), "--target", "refusal"] + SMALL
    env = dict(os.environ, BENCH_CACHE=str(cache), PYTHONPATH=str(ROOT))
    log = tmp_path / "first.log"          # stderr to a file, as a newcomer's `bench run ... 2> log`
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.time() + 300
    while not list(cache.glob("clean/*/*/meta.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(cache.glob("base/*/*/meta.json")), "base stage should have finished before the kill"
    assert not (results / "records.jsonl").exists() or all(
        json.loads(line) for line in (results / "records.jsonl").read_text().splitlines())
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # the logs of a cold run (base training included): stage lines, no bar redraws, no warnings
    for text in (log.read_bytes(), done.stderr):
        assert b"\r" not in text and b"it/s" not in text, text[-2000:]
        assert b"Warning" not in text and b"not writable" not in text, text[-2000:]
    first = log.read_text()
    assert first.count("] computing") == len({line for line in first.splitlines() if "] computing" in line}) >= 2
    recs = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "disp"]
    # the finished stages are reused, not retrained (base is not even loaded once clean is cached)
    assert recs[0]["timings"].get("base", 0.0) == 0.0 and recs[0]["timings"]["clean"] == 0.0


@pytest.mark.slow
def test_third_party_defense_runs_through_bench_run(tmp_path, cache, capsys, monkeypatch):
    """A defense from another installed distribution (entry point bench.defenses) runs end to end."""
    from core import registry

    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "ext_defense.py").write_text(
        "from dataclasses import dataclass\n"
        "from defenses.base import Defense\n\n"
        "@dataclass(frozen=True)\n"
        "class Config:\n"
        "    keep: float = 1.0\n\n"
        "class ShrinkProjector(Defense):\n"
        "    \"\"\"Scales the projector's output layer (a toy post-training mitigation).\"\"\"\n"
        "    Config = Config\n"
        "    def purify(self, model, data, ctx):\n"
        "        model.mm_projector[2].weight.data.mul_(self.cfg.keep)\n"
        "        self.report = {'n_train': len(data), 'saw_poison_flags': any('poisoned' in s.meta for s in data)}\n"
        "        return model\n")
    info = pkg / "ext_defense-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ext-defense\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bench.defenses]\nshrink = ext_defense:ShrinkProjector\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    registry.reload_entry_points()

    code, out, _ = bench(["list"], capsys)
    assert "shrink" in out
    results = tmp_path / "results"
    code, out, err = bench(["run", "--results", str(results), "--defense", "shrink", "--defense-arg", "keep=0.5"]
                           + SMALL, capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "shrink"]
    assert recs[-1]["spec"]["defense_args"] == {"keep": 0.5}
    # the pipeline hands non-oracle defenses the training set without poison flags
    assert recs[-1]["stage_info"] == {"n_train": 100, "saw_poison_flags": False}


@pytest.mark.slow
def test_dualkey_run_reports_partial_trigger_asr(tmp_path, cache, capsys):
    results = tmp_path / "results"
    code, out, err = bench(["run", "--results", str(results), "--attack", "dualkey", "--target", "keyword",
                            "--defense", "none", "--poison-rate", "0.1"] + SMALL, capsys)
    assert code == 0, err
    recs = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored"]
    for r in recs:
        for m in ("asr_wt", "asr_wo", "asr_image_only", "asr_text_only"):
            assert set(r["metrics"][m]) == {"value", "ci"}
        assert r["spec"]["attack_args"]["text_key"] == "consider"
        rows = [json.loads(line) for line in (results / r["outputs"]).read_text().splitlines()]
        variants = {str(x["triggered"]) for x in rows}
        assert variants == {"False", "True", "image_only", "text_only", "train"}
        text_only = [x for x in rows if x["triggered"] == "text_only"]
        assert all(x["prompt"].startswith("consider ") for x in text_only)
        image_only = [x for x in rows if x["triggered"] == "image_only"]
        assert not any(x["prompt"].startswith("consider ") for x in image_only)


def test_triggers_gallery(tmp_path, cache, capsys):
    out_dir = tmp_path / "gallery"
    code, out, err = bench(["triggers", "--out", str(out_dir), "--attack", "badnets", "--attack", "wanet",
                            "--attack", "dualkey"], capsys)
    assert code == 0, err
    import pandas as pd
    stats = pd.read_csv(out_dir / "trigger_stats.csv", index_col="attack")
    assert list(stats.index) == ["badnets", "wanet", "dualkey"]
    assert stats.loc["badnets", "linf"] > 0.5   # a black patch on light images
    assert stats.loc["wanet", "linf"] < stats.loc["badnets", "linf"]
    assert stats.loc["dualkey", "prompt_changed"] == 1.0 and stats.loc["badnets", "prompt_changed"] == 0.0
    from matplotlib.image import imread
    img = imread(out_dir / "triggers.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0]


def test_triggers_unknown_attack_exits_2(tmp_path, cache, capsys):
    code, _, err = bench(["triggers", "--out", str(tmp_path / "g"), "--attack", "nope"], capsys)
    assert code == 2 and "unknown attack 'nope'" in err and not (tmp_path / "g").exists()


# ---------------------------------------------------------------------------- list --args, help, logs

@pytest.mark.parametrize("name, lines", [
    ("badnets", ["attack badnets", "--attack-arg size=0.125", "--attack-arg position=top-left", "--attack-arg color=black"]),
    ("wanet", ["--attack-arg k=4", "--attack-arg s=0.5", "--attack-arg cross_ratio=2.0"]),
    ("misclassification", ["target misclassification", "--target-arg source=dog", "--target-arg target=boat"]),
    ("disp", ["defense disp", "--defense-arg mask_ratio=0.3", "--defense-arg n_probes=6"]),
    ("none", ["defense none", "(no args)"]),
    ("llada-v", ["model llada-v (scale tiny)", "--model-arg d_model=96", "--model-arg base_epochs=18"]),
    ("synthetic", ["task synthetic", "--task-arg n_pool=1000", "--task-arg n_test=200"]),
])
def test_list_args_shows_every_key_with_its_default(name, lines, capsys):
    code, out, err = bench(["list", "--args", name], capsys)
    assert code == 0, err
    for line in lines:
        assert line in out, out


def test_list_args_covers_every_config_field(capsys):
    import dataclasses

    from core import registry
    for kind, flag in (("attacks", "attack"), ("targets", "target"), ("defenses", "defense")):
        for name in registry.names(kind):
            cfg = registry.get(kind, name).Config
            code, out, _ = bench(["list", "--args", name], capsys)
            assert code == 0
            for f in dataclasses.fields(cfg):
                assert f"--{flag}-arg {f.name}=" in out, (name, f.name)


def test_list_args_unknown_name_exits_2(capsys):
    code, _, err = bench(["list", "--args", "nope"], capsys)
    assert code == 2 and err.startswith("bench: error: unknown name 'nope' (valid: badnets")
    assert len(err.strip().splitlines()) == 1


def test_run_help_points_to_list_args(capsys):
    code, out, _ = bench(["run", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for kind in ("ATTACK", "TARGET", "DEFENSE", "MODEL", "TASK"):
        assert f"bench list --args {kind}" in text
    assert "--train-length" in text and "[default: --gen-length]" in text     # training window apart from decoding


BARS = """
import click, sys
from bench.cli import cli, main
assert "tqdm" not in sys.modules, "importing bench.cli must not import tqdm (it reads TQDM_* at import)"

@cli.command("bars")
def bars():
    from tqdm.auto import tqdm
    for _ in tqdm(range(200), desc="a bar"):
        pass
    click.echo("[stage] computing", err=True)

main(["bars"])
"""


@pytest.mark.parametrize("env, bars", [({}, False), ({"TQDM_DISABLE": ""}, True)], ids=["default", "explicit-on"])
def test_no_progress_bars_when_stderr_is_not_a_terminal(env, bars):
    """A log (stderr a pipe) gets the stage lines and no tqdm redraws; an explicit TQDM_DISABLE wins."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    done = subprocess.run([sys.executable, "-c", BARS], env={**base, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if bars:
        assert "a bar: 100%" in done.stderr
    else:
        assert done.stderr == "[stage] computing\n"


def test_bar_setting_does_not_outlive_main(capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    code, _, _ = bench(["list"], capsys)
    assert code == 0 and "TQDM_DISABLE" not in os.environ


# ---------------------------------------------------------------------------- show / leaderboard on records

def _record(results: Path, row: str, cp: float, **spec_changes) -> None:
    """One record of the shape `bench run` writes (only the fields show / leaderboard read)."""
    from bench import records
    from bench.spec import RunSpec

    spec = RunSpec().to_dict()
    for key, value in spec_changes.items():
        if key.endswith("_args"):
            spec[key] = dict(value)
        else:
            spec[key] = value
    spec.setdefault("attack_args", {})
    run_id = f"r{abs(hash((row, cp, json.dumps(spec, sort_keys=True)))) % 10 ** 8}"
    rows = [{"id": str(i), "output": f"{row} says {i}", "triggered": t, "prompt": "describe the image",
             "verdicts": {"asr": t and row == "backdoored"}} for i in range(3) for t in (False, True)]
    out = records.write_outputs(results, run_id, rows)
    metric = lambda v: {"value": v, "ci": [max(0.0, v - 5), min(100.0, v + 5)]}
    records.append(results, {"run_id": run_id, "created": "2026-01-01T00:00:00+00:00", "spec": spec, "row": row,
                             "metrics": {"cp": metric(cp), "asr_wo": metric(0.0), "asr_wt": metric(50.0)},
                             "outputs": str(out)})


def _cell(results: Path, cp: float, **spec_changes) -> None:
    for i, row in enumerate(("clean", "backdoored", "disp")):
        _record(results, row, cp + i, **spec_changes)


def test_show_defaults_to_the_one_setting_the_records_hold(tmp_path, capsys):
    results = tmp_path / "results"
    _cell(results, 61.0, attack_args={"size": 0.125, "position": "top-left", "color": "black"})
    _cell(results, 61.0, attack_args={"size": 0.125, "position": "top-left", "color": "black"})  # a rerun
    code, out, err = bench(["show", "--results", str(results)], capsys)
    assert code == 0, err
    assert "61.00" in out and "DiSP" in out and "Backdoored" in out and "Sample outputs" in out


def test_show_filters_by_any_spec_field_and_names_the_values_that_exist(tmp_path, capsys):
    results = tmp_path / "results"
    base = {"position": "top-left", "color": "black"}
    _cell(results, 10.0, poison_rate=0.2, attack_args={"size": 0.125, **base})
    _cell(results, 20.0, poison_rate=0.2, attack_args={"size": 0.25, **base})
    _cell(results, 30.0, poison_rate=0.1, attack_args={"size": 0.25, **base})

    code, _, err = bench(["show", "--results", str(results)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "attack_args.size=0.125|0.25" in err and "poison_rate=0.1|0.2" in err and "--where" in err

    code, out, err = bench(["show", "--results", str(results), "--where", "poison_rate=0.2",
                            "--where", "attack_args.size=0.25"], capsys)
    assert code == 0, err
    assert "20.00" in out and "10.00" not in out and "30.00" not in out

    code, out, err = bench(["show", "--results", str(results), "--where", "poison_rate=0.1"], capsys)
    assert code == 0, err and "30.00" in out

    code, _, err = bench(["show", "--results", str(results), "--where", "poison_rate=0.2"], capsys)
    assert code == 2 and "selected records hold several settings" in err and "attack_args.size=0.125|0.25" in err
    assert "poison_rate" not in err

    code, _, err = bench(["show", "--results", str(results), "--where", "poison_rate=0.3"], capsys)
    assert code == 2 and "no records match poison_rate=0.3 (poison_rate has 0.1, 0.2)" in err

    code, _, err = bench(["show", "--results", str(results), "--where", "colour=red"], capsys)
    assert code == 2 and "no record has spec field(s) ['colour']" in err

    code, _, err = bench(["show", "--results", str(results), "--where", "poison_rate"], capsys)
    assert code == 2 and "--where must be key=value" in err

    code, _, err = bench(["show", "--results", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no records in" in err


def test_show_lists_differing_methods_without_their_args(tmp_path, capsys):
    results = tmp_path / "results"
    _cell(results, 10.0, attack="badnets", attack_args={"size": 0.125})
    _cell(results, 20.0, attack="wanet", attack_args={"k": 4, "s": 0.5})
    code, _, err = bench(["show", "--results", str(results)], capsys)
    assert code == 2 and "attack=badnets|wanet" in err and "attack_args" not in err
    code, out, err = bench(["show", "--results", str(results), "--attack", "wanet"], capsys)
    assert code == 0 and "20.00" in out
    code, _, err = bench(["show", "--results", str(results), "--attack", "wanet", "--where", "attack=badnets"], capsys)
    assert code == 2 and "contradicts" in err


def test_leaderboard_writes_next_to_the_results_by_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "res"
    _cell(results, 50.0, attack_args={"size": 0.125})
    code, out, err = bench(["leaderboard", "--results", str(results)], capsys)
    assert code == 0, err
    written = files_under(results / "leaderboards")
    assert any(p.suffix == ".md" for p in written) and any(p.suffix == ".csv" for p in written)
    assert not (tmp_path / "leaderboards").exists()
    code, _, err = bench(["leaderboard", "--results", str(results), "--out", str(tmp_path / "board")], capsys)
    assert code == 0, err and files_under(tmp_path / "board")


def test_lavida_quoted_command_runs_with_its_papers_cell_settings(tmp_path, cache, capsys):
    """`bench run --attack blended --defense disp --model lavida`, on the reduced config: every stage of
    the real pipeline, LaViDa's decoding and DiSP mask ratio recorded in the spec."""
    results = tmp_path / "results"
    code, out, err = bench(["run", "--results", str(results), "--attack", "blended", "--defense", "disp",
                            "--model", "lavida"] + SMALL, capsys)
    assert code == 0, err
    assert "lavida (tiny) · blended" in out
    recs = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    assert [r["row"] for r in recs] == ["clean", "backdoored", "disp"]
    spec = recs[-1]["spec"]
    assert spec["model"] == "lavida" and spec["defense_args"]["mask_ratio"] == 0.5
    assert spec["decoding"]["block_length"] == 32 and spec["decoding"]["steps"] == 4    # --steps wins
    assert spec["model_args"]["pool_side"] == 2


def test_sweep_over_a_defense_arg_writes_png_and_csv(tmp_path, cache, capsys):
    """DiSP's Figure 2 axes: ASR (w/t), ASR (w/o), relative CP against the mask ratio, one cell per value
    sharing the base, clean and backdoored stages."""
    results = tmp_path / "results"
    code, out, err = bench(["sweep", "--results", str(results), "--param", "mask_ratio", "--values", "0.1,0.5"] + SMALL,
                           capsys)
    assert code == 0, err
    csvs = list((results / "sweeps").glob("*.csv"))
    assert len(csvs) == 1 and csvs[0].with_suffix(".png").stat().st_size > 1000
    df = pd.read_csv(csvs[0])
    assert df["mask_ratio"].tolist() == [0.1, 0.5]
    recs = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    disp = [r for r in recs if r["row"] == "disp"]
    assert [r["spec"]["defense_args"]["mask_ratio"] for r in disp] == [0.1, 0.5]
    for (_, row), r in zip(df.iterrows(), disp):
        assert row["asr_wt"] == r["metrics"]["asr_wt"]["value"] and row["cp"] == r["metrics"]["cp"]["value"]
    assert len({r["stage_keys"]["model"] for r in recs if r["row"] == "backdoored"}) == 1   # shared stages
    code, _, err = bench(["sweep", "--results", str(results), "--param", "bogus", "--values", "1"], capsys)
    assert code == 2 and "unknown defense disp arg(s) ['bogus']" in err
