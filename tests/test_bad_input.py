"""Bad input to `bench run` is refused before any work: exit 2, one line, nothing written.

Every case runs `bench.cli.main` in-process with tmp results and cache dirs, and with the artifact
cache's compute step replaced by a tripwire: a case the CLI fails to refuse up front raises
`WorkStarted` at the first stage instead of training for minutes, so the whole table stays cheap.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.cache import ArtifactCache
from bench.cli import main
from bench.spec import Decoding, Recipe, RunSpec
from core.errors import BenchError


class WorkStarted(Exception):
    """A stage began computing: the input was not refused before work."""


# (extra `bench run` args, extra environment, a piece of the expected message or None)
CASES = [
    # decoding (bench/spec.py Decoding)
    pytest.param(["--gen-length", "0"], {}, "gen_length must be an integer >= 1, got 0", id="gen-length-0"),
    pytest.param(["--gen-length", "-8"], {}, "gen_length must be an integer >= 1, got -8", id="gen-length-negative"),
    pytest.param(["--block-length", "0"], {}, "block_length must be an integer >= 1, got 0", id="block-length-0"),
    pytest.param(["--steps", "0"], {}, "steps must be an integer >= 1, got 0", id="steps-0"),
    pytest.param(["--steps", "5"], {}, "steps 5 must be a multiple of the number of blocks", id="steps-not-multiple"),
    pytest.param(["--gen-length", "30"], {}, "gen_length 30 must be a multiple of block_length 8", id="gen-length-ragged"),
    pytest.param(["--remasking", "greedy"], {}, "unknown remasking 'greedy' (valid: low_confidence, random)",
                 id="remasking-unknown"),
    # seed (RunSpec)
    pytest.param(["--seed", "-1"], {}, "seed must be an integer in [0, 2^32), got -1", id="seed-negative"),
    pytest.param(["--seed", str(2 ** 32)], {}, "seed must be an integer in [0, 2^32)", id="seed-too-large"),
    pytest.param(["--seed", "one"], {}, "'one' is not a valid integer", id="seed-not-int"),
    # victim recipe (Recipe)
    pytest.param(["--epochs", "0"], {}, "epochs must be an integer >= 1, got 0", id="epochs-0"),
    pytest.param(["--epochs", "-3"], {}, "epochs must be an integer >= 1, got -3", id="epochs-negative"),
    pytest.param(["--lr", "-1"], {}, "lr must be a positive number, got -1", id="lr-negative"),
    pytest.param(["--lr", "0"], {}, "lr must be a positive number, got 0", id="lr-0"),
    pytest.param(["--lr", "nan"], {}, "lr must be a positive number, got nan", id="lr-nan"),
    pytest.param(["--lr", "inf"], {}, "lr must be a positive number, got inf", id="lr-inf"),
    pytest.param(["--poison-rate", "nan"], {}, "poison rate must be in (0, 1)", id="poison-rate-nan"),
    # model / scale
    pytest.param(["--scale", "full"], {}, "scale 'full' for llada-v needs --weights PATH", id="scale-full"),
    pytest.param(["--scale", "huge"], {}, "unknown scale 'huge' for llada-v (valid: tiny, full)", id="scale-unknown"),
    pytest.param(["--model-arg", "n_heads=5"], {}, "multiples of their head counts", id="model-heads-indivisible"),
    pytest.param(["--model", "llava", "--defense", "disp"], {},
                 "defense disp needs a masked-diffusion victim; model llava (autoregressive VLM) has capabilities: none",
                 id="disp-on-an-autoregressive-victim"),
    pytest.param(["--model-arg", "enc_layers=1"], {}, "enc_layers must be >= 2", id="model-enc-layers-1"),
    pytest.param([], {"BENCH_THREADS": "0"}, "BENCH_THREADS must be a positive integer", id="threads-0"),
    # need the task: the pipeline's pre-flight (Cell construction)
    pytest.param(["--target", "misclassification", "--target-arg", "source=zebra"], {}, "zebra",
                 id="target-source-not-a-category"),
    pytest.param(["--attack", "wanet", "--poison-rate", "0.4"], {}, "cross", id="wanet-no-room-for-cross-samples"),
    pytest.param(["--poison-rate", "1e-4"], {}, "poisons no sample", id="poison-rate-poisons-nothing"),
    # method configs and the task's sizes
    pytest.param(["--model-arg", "d_model=0"], {}, "model arg d_model must be >= 1, got 0", id="model-d-model-0"),
    pytest.param(["--model-arg", "base_epochs=0"], {}, "model arg base_epochs must be >= 1, got 0", id="model-base-epochs-0"),
    pytest.param(["--model-arg", "base_lr=-1"], {}, "model arg base_lr must be > 0, got -1.0", id="model-base-lr-negative"),
    pytest.param(["--task-arg", "n_pool=0"], {}, "task arg n_pool must be >= 1, got 0", id="task-empty-pool"),
    pytest.param(["--task-arg", "n_test=-1"], {}, "task arg n_test must be >= 1, got -1", id="task-negative-split"),
    pytest.param(["--defense-arg", "n_probes=0"], {}, "disp n_probes must be >= 1, got 0", id="disp-no-probes"),
    pytest.param(["--defense-arg", "batch_size=0"], {}, "disp batch_size must be >= 1, got 0", id="disp-batch-0"),
    # the training window defaults to --gen-length; the message names the option that widens it
    pytest.param(["--gen-length", "8", "--block-length", "8", "--steps", "8"], {},
                 "train_length 8 cannot hold the longest training response (26 tokens + <eos>); use --train-length 27",
                 id="train-length-defaults-to-gen-length-too-short"),
    pytest.param(["--train-length", "16"], {}, "train_length 16 cannot hold the longest training response (26 tokens",
                 id="train-length-too-short"),
    pytest.param(["--train-length", "0"], {}, "train_length must be an integer >= 1, got 0", id="train-length-0"),
]


def files_under(p: Path) -> list[Path]:
    return sorted(x for x in p.rglob("*") if x.is_file()) if p.exists() else []


@pytest.mark.parametrize("args, env, needle", CASES)
def test_bad_input_is_refused_before_any_work(args, env, needle, tmp_path, monkeypatch, capsys):
    results, cache = tmp_path / "results", tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    monkeypatch.setenv("BENCH_THREADS", "1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    def tripwire(self, stage, key, compute, meta):
        raise WorkStarted(f"stage {stage!r} started computing: the input was not refused up front")

    monkeypatch.setattr(ArtifactCache, "get_or_compute", tripwire)
    with pytest.raises(SystemExit) as e:
        main(["run", "--results", str(results), "--cache", str(cache)] + args)
    out, err = capsys.readouterr()
    assert e.value.code == 2, err
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench: error:"), err
    if needle:
        assert needle in lines[0]
    assert files_under(results) == [] and files_under(cache) == []
    assert not (results / "records.jsonl").exists()


@pytest.mark.parametrize("make", [
    lambda: Recipe(batch_size=0), lambda: Recipe(batch_size=-32), lambda: Recipe(epochs=2.5),
    lambda: Recipe(lr=True), lambda: Recipe(train_length=0), lambda: Recipe(train_length=True),
    lambda: Decoding(steps=4.0), lambda: RunSpec(seed=True),
    lambda: RunSpec(poison_rate="0.2"),
], ids=["batch-0", "batch-negative", "epochs-float", "lr-bool", "train-length-0", "train-length-bool", "steps-float",
        "seed-bool", "poison-rate-str"])
def test_spec_refuses_settings_the_cli_does_not_expose(make):
    with pytest.raises(BenchError):
        make()


def test_defense_needing_a_capability_the_victim_lacks_is_refused(tmp_path, monkeypatch, capsys):
    """A defense declares the victim capabilities it needs (Defense.requires); a cell whose model lacks
    one is refused before any work, naming both (e.g. DiSP on an autoregressive victim)."""
    from dataclasses import dataclass

    from core import registry
    from defenses.base import Defense

    @dataclass(frozen=True)
    class NoArgs:
        pass

    class NeedsXAttn(Defense):
        """Needs gated cross-attention layers."""
        Config, requires = NoArgs, ("gated-cross-attention",)

    monkeypatch.setattr(registry, "_REGISTRY", {k: dict(v) for k, v in registry._REGISTRY.items()})
    registry.register("defenses", "needs-xattn")(NeedsXAttn)
    monkeypatch.setattr(ArtifactCache, "get_or_compute", lambda *a: (_ for _ in ()).throw(WorkStarted("work")))
    results, cache = tmp_path / "results", tmp_path / "cache"
    with pytest.raises(SystemExit) as e:
        main(["run", "--results", str(results), "--cache", str(cache), "--defense", "needs-xattn"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert ("defense needs-xattn needs a gated-cross-attention victim; model llada-v (masked-diffusion VLM) "
            "has capabilities: masked-diffusion, image-attention") in err
    assert files_under(results) == [] and files_under(cache) == []
