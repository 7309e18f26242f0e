#!/usr/bin/env bash
# The mesh at pp=1 with a core of its own for the front door, against the in-process engine on
# the compute core alone: what issue 18's "mesh >= 0.95x in-process" needs of the machine.
#
#   bash scripts/spare_core.sh MODEL_DIR "LOAD ARGS" [OUT_DIR]
#   bash scripts/spare_core.sh /tmp/llama40m "--requests 64 --input-len 16 --input-len-max 48 \
#       --output-len 4 --output-len-max 96 --seed 0"
#
# In-process: `stagemesh bench --no-mesh --compare inprocess` bound to core 0 (one torch thread;
# its own load generator runs there too). Mesh: `stagemesh up` bound to core 1, then its stage
# worker (every thread) moved to core 0, so it computes on one thread there as the in-process
# engine did; the gateway, the frontend, Redis and the bench client stay on core 1. Needs two
# cores; prints one line and leaves both `--json` documents in OUT_DIR (default: a temp dir).
set -euo pipefail
model=$1 load=$2 out=${3:-$(mktemp -d)} port=${SPARE_CORE_PORT:-50741}
# shellcheck disable=SC2086 # the load is several flags
taskset -c 0 stagemesh bench --model "$model" --no-mesh --compare inprocess $load --json > "$out/inprocess.json"
taskset -c 1 stagemesh up --model "$model" --pp 1 --no-cpu-bind --insecure --port "$port" > "$out/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 120); do grep -q "stagemesh ready" "$out/up.log" && break; sleep 1; done
stage=$(pgrep -P "$up" -f stage_worker)
taskset -a -p -c 0 "$stage" > /dev/null
redis_url=$(grep -o "redis://[^ ]*" "$out/up.log" | head -1)
# shellcheck disable=SC2086
taskset -c 1 stagemesh bench --addr "127.0.0.1:$port" --redis-url "$redis_url" --model "$model" $load --json \
  > "$out/mesh.json"
python3 - "$out" <<'EOF'
import json, sys
inproc = json.load(open(f"{sys.argv[1]}/inprocess.json"))["systems"]["inprocess"]["output_tokens_per_s"]
mesh = json.load(open(f"{sys.argv[1]}/mesh.json"))["systems"]["mesh"]
busy = [round(s["busy_fraction"], 3) for s in mesh.get("stages", [])]
print(f"in-process (core 0) {inproc:.0f} tok/s | mesh (stage on core 0, front door and client on core 1) "
      f"{mesh['output_tokens_per_s']:.0f} tok/s | mesh/in-process {mesh['output_tokens_per_s'] / inproc:.3f} | "
      f"stage busy {busy}")
EOF
