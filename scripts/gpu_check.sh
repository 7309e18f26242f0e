#!/usr/bin/env bash
# GPU check: the CUDA tests (tests/gpu) and a short `stagemesh bench --device cuda` on one GPU,
# all within 8 minutes. Installs nothing: run it from an environment where stagemesh is
# installed (pip install -e '.[test]') over a CUDA build of torch; the repository's .venv is
# used when no virtual environment is active. Exit 2 when torch sees no GPU.
#
#   scripts/gpu_check.sh [RESULTS_DIR]        (default ./gpu-results)
#
# RESULTS_DIR receives: env.txt (torch, GPUs, nvidia-smi), pytest.txt + pytest.xml,
# the demo checkpoint, bench-*.json / bench-*.err / logs-*/ per bench, summary.txt.
# Environment: PYTHON (the interpreter), GPU_CHECK_DEVICE=cpu (runs every step on CPU, to
# check this script itself on a machine without a GPU; the tests then skip).
set -euo pipefail

OUT=$(realpath -m "${1:-./gpu-results}")
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DEADLINE_S=470  # 8 minutes, less 10 s for the summary
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
mkdir -p "$OUT"
FAILED=()

# Seconds a step may take: at most $1, and never past the deadline; 0 when fewer than $2 are left.
budget() {
  local left=$((DEADLINE_S - SECONDS))
  local t=$(($1 < left ? $1 : left))
  if ((t < $2)); then echo 0; else echo "$t"; fi
}

# --- the environment ----------------------------------------------------------------------------
set +e
"$PYTHON" - "$DEVICE" > "$OUT/env.txt" 2>&1 <<'EOF'
import sys

import torch

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}, "
      f"GPUs visible {torch.cuda.device_count() if cuda else 0}")
for i in range(torch.cuda.device_count() if cuda else 0):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
sys.exit(0 if cuda or sys.argv[1] == "cpu" else 2)
EOF
env_rc=$?
set -e
cat "$OUT/env.txt"
if ((env_rc != 0)); then
  cat >&2 <<EOF
gpu_check: $PYTHON cannot run the check (exit $env_rc; see above): torch sees no CUDA device, or
torch/stagemesh are not installed. Set up an environment with a CUDA build of torch, e.g.:
  python3 -m venv .venv && . .venv/bin/activate
  pip install torch --index-url https://download.pytorch.org/whl/cu128   # the CUDA version the driver supports
  pip install -e '.[test]'
then run scripts/gpu_check.sh again (or PYTHON=/path/to/python scripts/gpu_check.sh).
EOF
  exit 2
fi
command -v nvidia-smi > /dev/null && nvidia-smi >> "$OUT/env.txt" 2>&1 || true
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")

# --- the CUDA tests -------------------------------------------------------------------------------
t=$(budget 270 60)  # never 0 here: only seconds have passed
echo "gpu_check: tests/gpu (at most ${t} s)"
set +e
timeout --kill-after=10 "$t" "$PYTHON" -m pytest -q -rs tests/gpu -p no:cacheprovider \
  --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.txt"
pytest_rc=${PIPESTATUS[0]}
set -e
((pytest_rc == 0)) || FAILED+=("tests/gpu (exit $pytest_rc)")

# --- a short bench ---------------------------------------------------------------------------------
MODEL="$OUT/model-llama-h512-l8"
if [[ ! -f "$MODEL/config.json" ]]; then
  "$PYTHON" -m stagemesh.cli demo-model "$MODEL" --family llama --hidden-size 512 --num-layers 8 --num-heads 8 \
    --num-kv-heads 4 --intermediate-size 1536 --vocab-size 4096 --dtype float32 > /dev/null
fi

# bench NAME CAP_S ARGS...: one `stagemesh bench --json` into bench-NAME.json (stderr: bench-NAME.err).
bench() {
  local name=$1 cap=$2
  shift 2
  local t
  t=$(budget "$cap" 45)
  if ((t == 0)); then
    echo "gpu_check: bench $name skipped: under 45 s left of the 8 minutes"
    FAILED+=("bench $name (no time left)")
    return
  fi
  echo "gpu_check: bench $name (at most ${t} s): $*"
  set +e
  timeout --kill-after=10 "$t" "$PYTHON" -m stagemesh.cli bench --model "$MODEL" --device "$DEVICE" --seed 0 --json \
    --calibrate-s 1 --log-dir "$OUT/logs-$name" "$@" > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.err"
  local rc=$?
  set -e
  if ((rc != 0)); then
    FAILED+=("bench $name (exit $rc, see bench-$name.err)")
    tail -c 4000 "$OUT/bench-$name.err" | tr '\r' '\n' | grep -v 'tok/s' | tail -n 5 >&2 || true  # not the progress bars
  fi
}

bench pp1 150 --pp 1 --requests 64 --input-len 16 --input-len-max 64 --output-len 64 --output-len-max 128 \
  --compare inprocess,hf
bench pp1-one-stream 60 --pp 1 --requests 4 --concurrency 1 --input-len 16 --output-len 64 --compare inprocess
if ((GPUS >= 2)); then  # one GPU per stage: validate_layout refuses two stages on one GPU
  bench pp2 150 --pp 2 --requests 64 --input-len 16 --input-len-max 64 --output-len 64 --output-len-max 128 \
    --compare inprocess
else
  echo "gpu_check: bench pp2 skipped: $GPUS GPU(s) visible, pp=2 needs one per stage"
fi

# --- the summary: one line per figure ----------------------------------------------------------------
"$PYTHON" - "$OUT" "$SECONDS" <<'EOF' | tee "$OUT/summary.txt"
import json
import sys
from pathlib import Path

out, elapsed = Path(sys.argv[1]), sys.argv[2]
print(f"gpu_check: {elapsed} s in all; results in {out}")
pytest_txt = out / "pytest.txt"
if pytest_txt.is_file():
    lines = [l for l in pytest_txt.read_text().splitlines() if l.strip()]
    print(f"tests/gpu: {lines[-1] if lines else 'no output'}")
for path in sorted(out.glob("bench-*.json")):
    name = path.stem.removeprefix("bench-")
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        print(f"{name}: no JSON (see {path.with_suffix('.err').name})")
        continue
    machine = doc["machine"]
    print(f"{name}: {machine.get('device_name', machine['kind'])}, copy bandwidth "
          f"{machine['peak_bytes_per_s'] / 1e9:.0f} GB/s, layout {doc['config']['layout']}")
    for system, s in doc["systems"].items():
        print(f"{name} {system} output_tokens_per_s {s['output_tokens_per_s']:.1f}")
        print(f"{name} {system} wall_s {s['wall_s']:.2f}")
        if s.get("bandwidth_fraction") is not None:
            print(f"{name} {system} weight_bandwidth_fraction {s['bandwidth_fraction']:.3f}")
        for figure in ("ttft_s", "itl_s"):
            if figure in s:
                print(f"{name} {system} {figure.removesuffix('_s')}_ms p50 {s[figure]['p50'] * 1e3:.2f} "
                      f"p99 {s[figure]['p99'] * 1e3:.2f}")
        for stage in s.get("stages") or []:
            shown = {k: stage[k] for k in ("busy_fraction", "compute_ms", "step_interval_ms", "overhead_ms") if k in stage}
            print(f"{name} {system} {stage['worker']} " + " ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        for role, figures in ((s.get("cpu") or {}).get("roles") or {}).items():
            if figures.get("us_per_token") is not None:
                print(f"{name} {system} cpu_us_per_token {role} {figures['us_per_token']:.1f}")
    for ratio, value in doc["ratios"].items():
        print(f"{name} ratio {ratio} {value:.3f}")
    for pair, value in doc["greedy_match"].items():
        print(f"{name} greedy_match {pair} {value:.3f}")
EOF

if ((${#FAILED[@]})); then
  printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}" | tee -a "$OUT/summary.txt" >&2
  exit 1
fi
echo "gpu_check: OK" | tee -a "$OUT/summary.txt"
