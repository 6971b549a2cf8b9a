#!/usr/bin/env bash
# Compute every missing cell behind the committed tables into leaderboards/records.jsonl with
# `bench grid` (stage-scheduled on 2 workers at one torch thread each: a stage that several cells
# share is trained once and no worker waits on another), then re-render every table from the records.
# Usage, from the repo root:   bash leaderboards/regenerate.sh
#   GRIDS="committed mdlm-main triggers"   grid files (leaderboards/NAME.yaml) to compute   [committed]
#   SEEDS=0,1,2                            seeds                                           [each file's]
#   FRESH=1                                drop the committed records first and recompute everything
#   SITE=DIR                               also write the static site (bench leaderboard --html DIR)
#   BENCH_CACHE as usual; BENCH (the bench command, default .venv/bin/bench)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${BENCH:-.venv/bin/bench}
out=leaderboards
if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$out/records.jsonl" "$out/outputs"; fi
for g in ${GRIDS:-committed}; do
    "$bench" grid "$out/$g.yaml" --workers 2 --threads 1 ${SEEDS:+--seeds "$SEEDS"} --results "$out"
done
"$bench" leaderboard --results "$out" --out "$out" --grid "$out/mdlm-main.yaml" --grid "$out/triggers.yaml" \
    ${SITE:+--html "$SITE"}
