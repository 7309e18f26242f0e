#!/usr/bin/env bash
# One stream through the mesh and through the in-process engine (one `stagemesh bench` run,
# `--compare inprocess`), once on this machine as it is and once with a lowest-priority spinner
# (SCHED_IDLE) on every core: what issue 18's "ITL <= in-process + 0.5 ms per stage hop" needs
# of the machine. A spinner runs only when nothing else wants its core, so the cores never go
# idle between the mesh's steps (scripts/idle_wake.py: a step after its thread slept 2-8 ms runs
# 1.4-1.6x slower on this VM than after a spin) and take nothing from the mesh's processes.
#
#   bash scripts/warm_cores.sh MODEL_DIR PP [PAIRS] [OUT_DIR]
#   bash scripts/warm_cores.sh /tmp/tiny 4 3
#
# Prints one line per run (interleaved: as is, warm, as is, warm, ...) with both ITL p50s and the
# mesh's cost per stage hop (the difference over pp - 1 hops; at pp=1 the whole difference), and leaves each run's `--json` document in OUT_DIR (default: a temp dir).
set -euo pipefail
model=$1 pp=$2 pairs=${3:-3} out=${4:-$(mktemp -d)}
load="--requests 2 --concurrency 1 --input-len 16 --output-len 300 --seed 0 --insecure --compare inprocess"
spinners=()
stop_spinners() { for pid in "${spinners[@]}"; do kill "$pid" 2>/dev/null || true; done; spinners=(); }
trap stop_spinners EXIT
for pair in $(seq "$pairs"); do
  for mode in as-is warm; do
    if [ "$mode" = warm ]; then
      for core in $(seq 0 $(($(nproc) - 1))); do
        taskset -c "$core" chrt --idle 0 python3 -c "while True: pass" &
        spinners+=($!)
      done
    fi
    # shellcheck disable=SC2086 # the load is several flags
    stagemesh bench --model "$model" --pp "$pp" $load --json > "$out/$mode-$pair.json"
    stop_spinners
    python3 - "$out/$mode-$pair.json" "$mode" "$pp" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))["systems"]
mesh = doc["mesh"]["itl_s"]["p50"] * 1e3
inproc = 1e3 / doc["inprocess"]["output_tokens_per_s"]  # one stream: its time per token (it has no ITL figure)
pp = int(sys.argv[3])
hops = max(1, pp - 1)  # as BENCHMARKS.md counts them: between stages (pp=1: the mesh's whole extra)
print(f"{sys.argv[2]:6} pp={pp}: ITL p50 mesh {mesh:.2f} ms, in-process {inproc:.2f} ms a token, "
      f"{(mesh - inproc) / hops:+.2f} ms per stage hop")
EOF
  done
done
