"""Which tiny replica do backdoors implant on? Candidate replicas x seeds x implant cells, as one table.

    python benchmarks/replica_search.py [--candidates default,anyres] [--seeds 0,1] [--workers 2]
                                        [--cells implant] [--out benchmarks/replica_search]
    python benchmarks/replica_search.py --curve blended --candidates anyres --seeds 0 [--every 5]

Each cell is one `bench run --defense none` (Clean and Backdoored rows) in a child process at
BENCH_THREADS=1, `--workers` side by side; the artifact cache makes a killed search resume where it
stopped and a finished cell is not rerun (its record is in OUT/records.jsonl). Every candidate uses
one victim recipe (the default `projector+lm`, lr, epochs) for every attack and target: the search
varies the replica, never the attack. The table reports, per candidate and seed, Clean CP, the Clean
row's object accuracy (overall and worst category), and per cell the Backdoored ASR w/t / w/o and the
ASR on the poisoned *training* inputs (a replica that fits its poison without learning the trigger
shows high training ASR and low test ASR).

`--curve ATTACK` trains one backdoor fine-tune in-process and evaluates checkpoints of that one run
every `--every` epochs (test ASR w/t, w/o, training-poison ASR): the learning curve of the implant.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Each candidate is a set of `--model-arg` overrides of the llada-v tiny replica, faithful to something
# the real model does (docs/tiny-replica.md explains each).
CANDIDATES: dict[str, dict] = {
    "single-view": {"view_size": 0},                         # the pre-issue-14 layout: one 64-token view
    "anyres": {"view_size": 32},                             # base view (16 tokens) + 4 full-resolution crops (64)
    "single-view-deep6": {"view_size": 0, "n_layers": 6},    # depth: the real LLaDA has 32 layers
    "anyres-deep6": {"view_size": 32, "n_layers": 6},
    "single-view-wide": {"view_size": 0, "d_model": 128, "n_layers": 5, "mlp_hidden": 384},
}
ATTACKS = ("badnets", "multi", "noise", "blended", "lowfreq", "wanet", "inputaware", "dualkey")
CELLS = {
    "implant": [(a, "insertion") for a in ATTACKS] + [("badnets", t) for t in ("refusal", "misclassification", "keyword")],
    "subtle": [(a, "insertion") for a in ("badnets", "noise", "blended")],
}


def run_cell(candidate: str, seed: int, attack: str, target: str, out: Path) -> str:
    args = [a for k, v in CANDIDATES[candidate].items() for a in ("--model-arg", f"{k}={v}")]
    cmd = [sys.executable, "-m", "bench.cli", "run", "--model", "llada-v", "--attack", attack, "--target", target,
           "--defense", "none", "--seed", str(seed), "--results", str(out / "runs" / candidate), *args]
    env = dict(os.environ, BENCH_THREADS="1", TQDM_DISABLE="1")
    log = out / "logs" / f"{candidate}-s{seed}-{attack}-{target}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return f"{candidate} seed {seed} {attack}/{target}: " + ("done" if rc == 0 else f"FAILED (rc {rc}, see {log})")


def load(out: Path) -> list[dict]:
    recs = []
    for path in sorted((out / "runs").glob("*/records.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            rec["candidate"] = path.parent.name
            recs.append(rec)
    return recs


def done(recs: list[dict], candidate: str, seed: int, attack: str, target: str) -> bool:
    s = lambda r: r["spec"]
    return any(r["candidate"] == candidate and s(r)["seed"] == seed and s(r)["attack"] == attack
               and s(r)["target"] == target and r["row"] == "backdoored" for r in recs)


def table(recs: list[dict], cells: list[tuple[str, str]]) -> str:
    """Markdown: one row per candidate x seed; per cell 'w/t / w/o (train)' of the newest Backdoored record."""
    v = lambda r, k: (r["metrics"].get(k) or {}).get("value")
    f = lambda x: "–" if x is None else f"{x:.1f}"
    newest: dict = {}
    for r in recs:
        s = r["spec"]
        newest[(r["candidate"], s["seed"], s["attack"], s["target"], r["row"])] = r
    keys = sorted({(c, sd) for c, sd, *_ in newest}, key=lambda k: (list(CANDIDATES).index(k[0]) if k[0] in CANDIDATES else 99, k[1]))
    head = ["replica", "seed", "Clean CP", "Clean object acc. (worst)"] + [f"{a}/{t[:5]}" for a, t in cells]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cand, seed in keys:
        clean = next((r for (c, sd, a, t, row), r in newest.items()
                      if (c, sd, row, t) == (cand, seed, "clean", "insertion")), None)
        row = [cand, str(seed), f(clean and v(clean, "cp")),
               f"{f(clean and v(clean, 'obj_acc'))} ({f(clean and v(clean, 'obj_acc_min'))})"]
        for a, t in cells:
            r = newest.get((cand, seed, a, t, "backdoored"))
            row.append("" if r is None else f"{f(v(r, 'asr_wt'))} / {f(v(r, 'asr_wo'))} ({f(v(r, 'asr_train'))})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def curve(candidate: str, seed: int, attack: str, target: str, every: int, out: Path) -> None:
    """ASR at checkpoints of one backdoor fine-tune (epochs every, 2*every, ...), appended to OUT/curves.jsonl."""
    import torch

    from attacks.base import triggered
    from bench.cache import ArtifactCache
    from bench.evaluate import generate_texts
    from bench.metrics import rate
    from bench.pipeline import Cell, make_spec

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    spec = make_spec(attack=attack, target=target, defense="none", seed=seed, model_args=CANDIDATES[candidate])
    cell = Cell(spec, ArtifactCache(), log=print)
    model = cell.model_from(cell.base()["state"])
    test = cell.target.test_inputs(cell.task)
    sets = {"wt": triggered(test, cell.fitted_trigger(), seed), "wo": test, "train": cell.poisoned_training_inputs()}
    path = out / "curves.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def evaluate(epoch: int) -> None:
        if epoch % every and epoch != spec.recipe.epochs:
            return
        res = {name: rate([cell.target.judge(o, s) for o, s in zip(generate_texts(model, xs, spec.decoding, seed), xs)])["value"]
               for name, xs in sets.items()}
        line = {"candidate": candidate, "seed": seed, "attack": attack, "target": target, "epoch": epoch, **res}
        print(json.dumps(line), flush=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    cell.finetune(model, cell.poisoned_pool(), desc="backdoor fine-tune", on_epoch=evaluate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default="single-view,anyres")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cells", default="implant", choices=sorted(CELLS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "replica_search")
    ap.add_argument("--curve", metavar="ATTACK", help="learning curve of ATTACK -> insertion instead of the grid")
    ap.add_argument("--every", type=int, default=5)
    a = ap.parse_args()
    cands = [c for c in a.candidates.split(",") if c]
    unknown = [c for c in cands if c not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidate(s) {unknown} (valid: {', '.join(CANDIDATES)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.curve:
        for c in cands:
            for s in seeds:
                curve(c, s, a.curve, "insertion", a.every, a.out)
        return
    cells = CELLS[a.cells]
    recs = load(a.out)
    # cell-major order: the first jobs of the workers train different candidates' bases side by side
    jobs = [(c, s, at, t) for at, t in cells for s in seeds for c in cands if not done(recs, c, s, at, t)]
    print(f"{len(jobs)} cells to run ({len(cells) * len(seeds) * len(cands) - len(jobs)} already recorded), "
          f"{a.workers} workers at one thread each", flush=True)
    with ThreadPoolExecutor(a.workers) as pool:
        for i, msg in enumerate(pool.map(lambda j: run_cell(*j, a.out), jobs), 1):
            print(f"[{i}/{len(jobs)}] {msg}", flush=True)
    md = table(load(a.out), cells)
    (a.out / "replica_search.md").write_text(
        "Backdoored ASR w/t / w/o (ASR on the poisoned training inputs), insertion unless named; defense none, "
        "20% poison, projector+lm, lr 1e-3 x 20 epochs.\n\n" + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
