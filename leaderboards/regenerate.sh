#!/usr/bin/env bash
# Recompute every cell behind the committed tables into leaderboards/records.jsonl, then re-render
# the tables next to it. Two queues run side by side at one torch thread each (the machines have 2
# cores); a stage both need (base, clean) is trained once: the other queue waits on its cache lock.
# Usage, from the repo root:  bash leaderboards/regenerate.sh   (BENCH_CACHE as usual)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${BENCH:-.venv/bin/bench}
out=leaderboards
export BENCH_THREADS=1
run() { "$bench" run --results "$out" "$@" 2>>"$out/.regenerate.log" | tail -n 1; }

queue_disp() {      # BadNets x {refusal, insertion, misclassification} x DiSP and its ablations (DiSP Table 1, Fig. 4)
  for target in insertion refusal misclassification; do
    for defense in disp disp-nomask disp-random; do
      run --attack badnets --target "$target" --defense "$defense"
    done
  done
}

queue_attacks() {   # every attack's implant (DiSP Table 3 extended), and BadNets -> keyword
  run --attack badnets --target keyword --defense none
  for attack in multi noise blended wanet dualkey lowfreq inputaware; do
    run --attack "$attack" --target insertion --defense none
  done
}

rm -f "$out/records.jsonl" "$out/.regenerate.log"
rm -rf "$out/outputs"
queue_disp & a=$!
queue_attacks & b=$!
wait $a; wait $b
"$bench" leaderboard --results "$out" --out "$out"
