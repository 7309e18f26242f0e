"""Time one stage alone on a benchmark load: the profiling harness behind BENCHMARKS.md.

Runs the seeded `stagemesh bench` load once through the in-process engine to record its step
plans, then replays those plans through a fresh ``StageRunner`` (the whole model, one stage)
several times: no scheduler, no event loop, no network — only the model's step time, which is
what the kernel-level changes in BENCHMARKS.md were measured with. Every replay checks that
the sampled tokens equal the recorded ones.

    python scripts/stage_replay.py --model /tmp/llama40m --runs 5 [--profile]

``--profile`` prints the torch profiler's op table over one replay instead. ``--gemm-only``
times only the replay's matrix multiplies, through the stage's own packed weights at each
step's row counts: a bound on what any engine built from these GEMMs could reach on the load,
given as the fraction of the machine's matmul rate that `stagemesh bench` reports against.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from stagemesh.cli.bench.local import _lines
from stagemesh.cli.bench.workload import LoadShape, make_requests
from stagemesh.cli.inprocess import InProcessEngine
from stagemesh.config import ModelConfig
from stagemesh.mesh.layout import split_layers
from stagemesh.model import torch_thread
from stagemesh.runners.stage import StageRunner


def record(model: str, shape: LoadShape):
    """(plans, results) of the load through the in-process engine, in step order."""
    engine = InProcessEngine(model)
    chain, steps = engine.chain, []

    class Recording:
        async def step(self, plan):
            result = chain.run(plan)
            steps.append((plan, result))
            return result

    engine.chain = Recording()
    asyncio.run(engine.run(_lines(make_requests(shape, engine.config.vocab_size))))
    return steps


def replay(runner: StageRunner, steps) -> list[float]:
    """Seconds of each step; raises if a step samples other tokens than recorded."""
    times = []
    for plan, want in steps:
        t0 = time.perf_counter()
        got = runner.step(plan, None)
        times.append(time.perf_counter() - t0)
        if got.tokens != want.tokens:
            raise AssertionError(f"step {plan.step_id} sampled other tokens than the recorded run")
    for seq_id in list(runner.cache.block_tables):
        runner.cache.free(seq_id)
    return times


def gemm_only(runner: StageRunner, steps) -> list[float]:
    """Seconds of each step's matrix multiplies alone: every projection of every layer on the
    step's tokens, ``lm_head`` on its sampled rows. The inputs are row slices of tensors made
    once (in a model too, each GEMM reads what the op before it has just written)."""
    model, config = runner.model, runner.config
    if config.is_moe:
        raise SystemExit("--gemm-only covers dense models (an MoE layer's GEMMs depend on its routing)")
    rows = max(sum(len(c.token_ids) for c in plan.chunks) for plan, _ in steps)
    attn = model.layers[0].attn
    x, o, m = (torch.randn(rows, k) for k in (config.hidden_size, attn.num_heads * attn.head_dim, config.intermediate_size))
    times = []
    with torch.inference_mode():
        for plan, want in steps:
            n, sampled = sum(len(c.token_ids) for c in plan.chunks), len(want.tokens)
            t0 = time.perf_counter()
            for layer in model.layers:
                layer.attn.qkv(x[:n])
                layer.attn.o_proj(o[:n])
                layer.mlp.gate_up(x[:n])
                layer.mlp.down(m[:n])
            model.lm_head(x[:sampled])
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--gemm-only", action="store_true", help="time only the GEMMs of the replay (see above)")
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch_thread.call(measure, args)  # one thread for all the torch work: see stagemesh.model.torch_thread


def measure(args: argparse.Namespace) -> None:
    shape = LoadShape(args.requests, 16, 4, input_len_max=48, output_len_max=96, seed=0)
    steps = record(args.model, shape)
    runner = StageRunner(args.model, split_layers(ModelConfig.from_dir(args.model), 1)[0])
    replay(runner, steps)  # warm-up
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            replay(runner, steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    if args.gemm_only:
        from stagemesh.cli.bench.roofline import flops_needed, measure_matmul_rate, model_cost

        peak = measure_matmul_rate(3.0)["peak_flops_per_s"]
        flops = flops_needed(model_cost(args.model), make_requests(shape, runner.config.vocab_size))
        for _ in range(args.runs):
            seconds = sum(gemm_only(runner, steps))
            print(f"GEMMs only {seconds:.3f} s: {flops / seconds / peak:.0%} of {peak / 1e9:.0f} GFLOP/s")
        return
    has_prefill = [any(len(c.token_ids) > 1 for c in plan.chunks) for plan, _ in steps]
    print(f"{len(steps)} steps ({sum(has_prefill)} with prefill chunks), {args.threads} threads")
    for _ in range(args.runs):
        times = replay(runner, steps)
        prefill = sum(t for t, p in zip(times, has_prefill) if p)
        print(f"stage time {sum(times):.3f} s (steps with prefill chunks {prefill:.3f} s, decode-only {sum(times) - prefill:.3f} s)")


if __name__ == "__main__":
    main()
