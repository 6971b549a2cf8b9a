"""Speed and memory of the default `bench run`, as ratios to the targets (not a test).

    python benchmarks/bench_speed.py [--target insertion] [--skip-runs] [--model-arg k=v ...]

`--model-arg` (repeatable) measures another replica than the default, e.g. the pre-issue-14 single
view `--model-arg view_size=0`: the cost of a replica choice stays visible beside the adopted one.

cold: `bench run` from an empty artifact cache (encoder + base training included), target <= 600 s.
warm: the same command with only the base stage cached, target <= 180 s.
peak RSS of the run (the child process), target <= 4 GiB.
saliency: all Hutchinson probes in one batched backward pass vs. a loop of single-probe passes.
crossview: time per training step and peak memory of the cross-view objective vs the plain fine-tune.
prefix cache: LaViDa tiny generating 32-token answers with the prompt's K/V cached vs. without.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_run(cache: Path, results: Path, target: str, model_args: list[str] = ()) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one `bench run` in a child process."""
    env = dict(os.environ, BENCH_CACHE=str(cache))
    cmd = [sys.executable, "-m", "bench.cli", "run", "--model", "llada-v", "--attack", "badnets",
           "--target", target, "--defense", "disp", "--results", str(results)]
    cmd += [x for kv in model_args for x in ("--model-arg", kv)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rss = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2 ** 20  # KiB -> GiB
    return wall, rss


def saliency_speedup(repeats: int = 3) -> tuple[float, float]:
    """Seconds per batch of 64 inputs: batched probes vs. one backward pass per probe (default sizes)."""
    import torch

    from bench.spec import DEFAULT_TEMPLATE, Decoding
    from defenses.disp import saliency
    from models.llada_v import LLaDAV, TinyConfig
    from tasks.synthetic import SyntheticTask

    torch.set_num_threads(2)
    task = SyntheticTask(seed=0, n_pool=64)
    model = LLaDAV(TinyConfig(), task.tokenizer(), DEFAULT_TEMPLATE).eval()
    model.requires_grad_(False)
    batch = model.collate(task.pool()[:64], with_response=False)
    dec = Decoding()
    out = {}
    for batched in (True, False):
        saliency(model, batch, dec.block_length, dec.gen_length, batched=batched)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            saliency(model, batch, dec.block_length, dec.gen_length, n_probes=6, batched=batched)
        out[batched] = (time.perf_counter() - t0) / repeats
    return out[True], out[False]


def prefix_cache_speedup(repeats: int = 2) -> tuple[float, float]:
    """Seconds to generate a 32-token answer for 64 inputs with LaViDa tiny (default sizes, one 32-token
    block, 16 steps): Prefix-DLM with the prompt's K/V cached vs. the full sequence at every step."""
    import torch

    from bench.spec import DEFAULT_TEMPLATE, Decoding
    from models.lavida import LaViDa, LaViDaConfig
    from tasks.synthetic import SyntheticTask

    torch.set_num_threads(2)
    task = SyntheticTask(seed=0, n_pool=64)
    dec = Decoding(steps=16, gen_length=32, block_length=32)
    out = {}
    for cached in (True, False):
        torch.manual_seed(0)
        model = LaViDa(LaViDaConfig(prefix_dlm=cached), task.tokenizer(), DEFAULT_TEMPLATE).eval()
        batch = model.collate(task.pool()[:64], with_response=False)
        model.generate(batch, dec)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.generate(batch, dec)
        out[cached] = (time.perf_counter() - t0) / repeats
    return out[True], out[False]


_STEP_SCRIPT = """
import resource, sys, time, torch
torch.set_num_threads(2)
from bench.pipeline import Cell, make_spec
from bench.cache import ArtifactCache
from defenses.base import DefenseContext
from defenses.crossview import CrossView
cell = Cell(make_spec(defense='crossview'), ArtifactCache('/nonexistent'), log=lambda _: None)
model = cell.fresh_model(); model.set_trainable('projector+lm'); model.train()
batch = model.collate(cell.pool()[:32])
d, ctx = CrossView(), DefenseContext(spec=cell.defender_spec(), finetune=None, base_model=None)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator().manual_seed(0)
def step():
    loss = model.loss(batch, g) + (d.objective(model, batch, ctx) if sys.argv[1] == 'crossview' else 0)
    opt.zero_grad(); loss.backward(); opt.step()
step()
t0 = time.perf_counter()
for _ in range(5):
    step()
print((time.perf_counter() - t0) / 5, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
"""


def crossview_cost() -> dict[str, tuple[float, float]]:
    """Seconds per training step (batch 32, default tiny llada-v) and peak RSS (GiB) of a plain step vs a
    cross-view step (two views: the task loss plus the objective's two passes), each in a fresh process."""
    out = {}
    for mode in ("plain", "crossview"):
        res = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, mode], cwd=ROOT, capture_output=True, text=True, check=True)
        sec, rss = map(float, res.stdout.split())
        out[mode] = (sec, rss)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="insertion")
    ap.add_argument("--skip-runs", action="store_true", help="only the saliency micro-benchmark")
    ap.add_argument("--keep", default=None, help="keep the cold run's cache and both runs' records under this dir")
    ap.add_argument("--model-arg", action="append", default=[], metavar="K=V", help="measure another replica")
    a = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"replica: {' '.join(a.model_arg) or 'default'}")
    if not a.skip_runs:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(a.keep) if a.keep else Path(tmp)
            cache, warm_cache = tmp / "cache", tmp / "cache-warm"
            cold, rss_cold = timed_run(cache, tmp / "results", a.target, a.model_arg)
            shutil.rmtree(warm_cache, ignore_errors=True)
            shutil.copytree(cache / "base", warm_cache / "base")  # warm = only the base model cached
            warm, rss_warm = timed_run(warm_cache, tmp / "results-warm", a.target, a.model_arg)
        rss = max(rss_cold, rss_warm)
        print(f"cold bench run : {cold:7.1f} s   ratio to 600 s target: {cold / 600:.2f}")
        print(f"warm bench run : {warm:7.1f} s   ratio to 180 s target: {warm / 180:.2f}")
        print(f"peak RSS       : {rss:7.2f} GiB ratio to 4 GiB target: {rss / 4:.2f}")
    fast, slow = saliency_speedup()
    print(f"saliency, 64 inputs x 6 probes: batched {fast:.3f} s, looped {slow:.3f} s, speed-up x{slow / fast:.2f}")
    cost = crossview_cost()
    (ps, pm), (cs, cm) = cost["plain"], cost["crossview"]
    print(f"crossview training step (batch 32): {cs:.3f} s vs plain {ps:.3f} s (x{cs / ps:.2f} time per epoch); "
          f"peak RSS {cm:.2f} GiB vs {pm:.2f} GiB (x{cm / pm:.2f}; target <= 2.2)")
    cached, full = prefix_cache_speedup()
    print(f"lavida 32-token answers, 64 inputs: prompt K/V cached {cached:.3f} s, full sequence every step "
          f"{full:.3f} s, speed-up x{full / cached:.2f} (LaViDa reports ~2x; aim 3x)")


if __name__ == "__main__":
    main()
