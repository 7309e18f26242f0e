"""Where one token's time goes along a chain: each stage's step, and the gaps between them.

Reads the dashboard's pipeline timeline (``GET /api/timeline``: each stage's last steps, with
their step ids, on one clock) of a running mesh and, over the steps every stage ran, prints the
median of each stage's step (its compute, as the stage times it), of each forward gap (stage s
ends a step -> stage s+1 starts it: the send, the wire, the receive and the hand-over to the
step thread) and of the way back (the last stage ends step k -> the first stage starts step
k + 1: the sampled tokens relayed back up the chain, which the first stage waits for). Only
meaningful while ONE stream runs (then the steps follow each other), e.g. beside::

    stagemesh up --model /tmp/tiny --pp 4 --insecure --port 50300 --http-port 50380
    stagemesh bench --model /tmp/tiny --addr 127.0.0.1:50300 --requests 1 --concurrency 1 \\
        --input-len 16 --output-len 400 --seed 0
    python scripts/hop_breakdown.py --url http://127.0.0.1:50380 --window-s 5

(within the window after the bench: a stage keeps its last 256 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import urllib.request


def breakdown(chain: dict) -> dict[str, list[float] | float | int]:
    """Medians in ms over the steps every stage of ``chain`` (a ``/api/timeline`` chain) ran."""
    stages = [{step: (start, end) for start, end, step in s["steps"]} for s in chain["stages"]]
    shared = set.intersection(*(set(s) for s in stages)) if stages else set()
    steps = sorted(k for k in shared if k + 1 in stages[0])
    if not steps:
        raise SystemExit("no step that every stage ran (and a next one): run one stream first, within --window-s")

    def ms(values) -> float:
        return round(1e3 * statistics.median(values), 3)

    last = len(stages) - 1
    return {
        "steps": len(steps),
        "compute_ms": [ms(s[k][1] - s[k][0] for k in steps) for s in stages],
        "forward_gap_ms": [ms(stages[i + 1][k][0] - stages[i][k][1] for k in steps) for i in range(last)],
        "back_ms": ms(stages[0][k + 1][0] - stages[last][k][1] for k in steps),
        "per_token_ms": ms(stages[0][k + 1][0] - stages[0][k][0] for k in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the mesh's dashboard, e.g. http://127.0.0.1:8080")
    parser.add_argument("--window-s", type=float, default=5.0, help="the timeline's window")
    parser.add_argument("--chain", type=int, default=0)
    parser.add_argument("--api-key", help="when the mesh asks for one")
    args = parser.parse_args()
    request = urllib.request.Request(f"{args.url.rstrip('/')}/api/timeline?window_s={args.window_s}")
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        doc = json.load(answer)
    [chain] = [c for c in doc["chains"] if c["chain"] == args.chain]
    print(json.dumps(breakdown(chain)))


if __name__ == "__main__":
    main()
