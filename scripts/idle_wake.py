"""Time one stage's decode step right after its thread slept, against right after it spun.

A stage worker of a chain idles between its turns: at pp=4 with one stream, each stage waits
~7 ms for every ~1 ms step. This replays that rhythm on one ``StageRunner`` in one process, no
gRPC, no other process: before each step the thread either sleeps (blocks, as a worker waiting
for its next request does) or spins for the same time, and only the step is timed. On a machine
whose cores run a thread's first work after a sleep slower (a VM's idle vCPU, deep C-states,
frequency scaling) the "sleep" column is the higher one; BENCHMARKS.md ("where a hop goes").

    python scripts/idle_wake.py --model /tmp/tiny --pp 4 --stage 1 --rows 1 --waits-ms 0.5,2,8

``--profile N`` then runs N steps back to back under the torch profiler and prints its op table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stagemesh.config import ModelConfig
from stagemesh.mesh.layout import split_layers
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.params import SamplingParams, sample_spec
from stagemesh.serving.types import SeqChunk, StepPlan

PROMPT = 16


def steps_after(runner: StageRunner, rows: int, wait_s: float, spin: bool, n: int) -> list[float]:
    """Seconds of each of ``n`` decode steps of ``rows`` sequences, each after ``wait_s`` of sleep or spin."""
    hidden = runner.config.hidden_size
    first = runner.spec.is_first
    seqs = range(1, rows + 1)

    def run(step_id: int, chunks: tuple[SeqChunk, ...], free: tuple[int, ...] = ()) -> None:
        plan = StepPlan(step_id, chunks, free, epoch=1)
        runner.step(plan, None if first else torch.randn(plan.num_tokens, hidden))

    sample = sample_spec(SamplingParams(temperature=0.0), 0, 0) if runner.spec.is_last else None
    run(1, tuple(SeqChunk(s, 0, tuple(range(3, 3 + PROMPT)), sample) for s in seqs))
    times = []
    for i in range(n):
        if spin:
            until = time.perf_counter() + wait_s
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(wait_s)
        chunks = tuple(SeqChunk(s, PROMPT + i, (5,), sample) for s in seqs)
        t0 = time.perf_counter()
        run(2 + i, chunks)
        times.append(time.perf_counter() - t0)
    run(2 + n, (), free=tuple(seqs))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pp", type=int, default=4, help="stages the model is split into (default: 4)")
    parser.add_argument("--stage", type=int, default=1, help="which of them to time (default: 1, a middle one)")
    parser.add_argument("--rows", type=int, default=1, help="decoding sequences per step (default: 1)")
    parser.add_argument("--waits-ms", default="0.5,2,8", help="waits before each step, comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="times through every wait (default: 2)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then N steps back to back under the torch profiler: its op table (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runner = StageRunner(args.model, split_layers(ModelConfig.from_dir(args.model), args.pp)[args.stage])
    steps_after(runner, args.rows, 0.0, True, 50)  # warm-up
    print(f"stage {args.stage} of pp={args.pp}, {args.rows} row(s), one thread: median step in ms")
    for _ in range(args.rounds):
        for wait_ms in (float(w) for w in args.waits_ms.split(",")):
            slept = statistics.median(steps_after(runner, args.rows, wait_ms / 1e3, False, args.steps))
            spun = statistics.median(steps_after(runner, args.rows, wait_ms / 1e3, True, args.steps))
            print(f"  after {wait_ms:g} ms: slept {slept * 1e3:.3f}, spun {spun * 1e3:.3f} ({slept / spun:.2f}x)")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps_after(runner, args.rows, 0.0, True, args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
