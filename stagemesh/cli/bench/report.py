"""A benchmark's figures: one JSON document, and the same as a short table for people."""

from __future__ import annotations

from stagemesh.cli.bench.roofline import ModelCost, roofline_figures
from stagemesh.cli.bench.workload import BenchRequest, LoadShape, SystemRun, latency_figures

RATIOS = (("mesh", "hf"), ("mesh", "inprocess"))


def system_figures(run: SystemRun, flops: float, cost: ModelCost, machine: dict) -> dict:
    """Everything measured of one system, JSON-ready."""
    doc = {
        "wall_s": run.wall_s,
        "output_tokens": run.output_tokens,
        "output_tokens_per_s": run.output_tokens / run.wall_s,
        "steps": run.steps,
        **roofline_figures(run.wall_s, run.steps, flops, cost, machine),
    }
    if run.traces is not None:
        doc.update(latency_figures(run.traces))
    if run.stages is not None:
        doc["stages"] = run.stages
        doc["bubble"] = 1.0 - sum(s["busy_fraction"] for s in run.stages) / len(run.stages) if run.stages else None
    if run.cpu is not None:
        doc["cpu"] = run.cpu
    if run.note:
        doc["note"] = run.note
    doc["token_ids"] = run.token_ids
    return doc


def workload_figures(requests: list[BenchRequest], shape: LoadShape, flops: float) -> dict:
    ins = [len(r.token_ids) for r in requests]
    outs = [r.output_len for r in requests]
    if shape.rate is not None:
        arrivals = f"poisson {shape.rate:g}/s"
    elif shape.concurrency is not None:
        arrivals = f"concurrency {shape.concurrency}"
    else:
        arrivals = "all at once"
    return {
        "requests": len(requests),
        "prompt_tokens": sum(ins),
        "output_tokens": sum(outs),
        "input_len": [min(ins), max(ins)],
        "output_len": [min(outs), max(outs)],
        "arrivals": arrivals,
        "seed": shape.seed,
        "flops_needed": flops,
        "per_request": [{"input_len": i, "output_len": o} for i, o in zip(ins, outs)],
    }


def comparisons(systems: dict[str, dict]) -> tuple[dict, dict]:
    """(tokens/s ratios, share of requests whose greedy ids agree), for the systems that ran."""
    ratios, agree = {}, {}
    for a, b in RATIOS:
        if a in systems and b in systems:
            ratios[f"{a}/{b}"] = systems[a]["output_tokens_per_s"] / systems[b]["output_tokens_per_s"]
    for a in ("mesh", "hf"):
        if a in systems and "inprocess" in systems:
            pairs = list(zip(systems[a]["token_ids"], systems["inprocess"]["token_ids"]))
            agree[f"{a}/inprocess"] = sum(x == y for x, y in pairs) / len(pairs)
    return ratios, agree


def format_text(doc: dict) -> str:
    """The human summary printed without ``--json``."""
    w, m = doc["workload"], doc["machine"]
    lines = [
        f"stagemesh bench: {w['requests']} requests, prompts {w['input_len'][0]}-{w['input_len'][1]} tokens, "
        f"outputs {w['output_len'][0]}-{w['output_len'][1]} ({w['output_tokens']} output tokens), "
        f"{w['arrivals']}, seed {w['seed']}",
        _machine_line(m),
        f"{'system':<16}{'wall s':>9}{'out tok/s':>11}{'roofline':>10}{'weight BW':>11}{'TTFT p50/p99 ms':>18}{'ITL p50/p99 ms':>17}",
    ]
    for name, s in doc["systems"].items():
        label = f"{name} {doc['config']['layout']}" if name == "mesh" else name
        lines.append(
            f"{label:<16}{s['wall_s']:>9.2f}{s['output_tokens_per_s']:>11.1f}{_pct(s.get('roofline_fraction')):>10}"
            f"{_pct(s.get('bandwidth_fraction')):>11}"
            f"{_pair(s.get('ttft_s')):>18}{_pair(s.get('itl_s')):>17}"
        )
    mesh = doc["systems"].get("mesh", {})
    if mesh.get("stages"):
        busy = ", ".join(f"{st['worker']} {st['busy_fraction']:.0%}" for st in mesh["stages"])
        lines.append(f"stage busy: {busy}; pipeline bubble {_pct(mesh['bubble'])}")
        lines += [_overhead_line(st) for st in mesh["stages"]]
    if mesh.get("cpu"):
        lines += _cpu_lines(mesh["cpu"])
    if doc["ratios"]:
        lines.append("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in doc["ratios"].items()))
    if doc["greedy_match"]:
        lines.append("same greedy tokens: " + ", ".join(f"{k} {v:.0%} of requests" for k, v in doc["greedy_match"].items()))
    return "\n".join(lines)


def _machine_line(m: dict) -> str:
    load = "load average {:.1f} before, {:.1f} after".format(*m["load_average_1m"])
    if m["kind"] == "cpu":
        return (f"roofline: {m['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({m['calibration']}, {m['threads']} threads), "
                f"copy {m['peak_bytes_per_s'] / 1e9:.1f} GB/s; {load}")
    return f"roofline: {m['peak_bytes_per_s'] / 1e9:.0f} GB/s on {m['device_name']} ({m['calibration']}); {load}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _pair(s: dict | None) -> str:
    if not s or s["p50"] is None:
        return "-"
    return f"{s['p50'] * 1e3:.0f}/{s['p99'] * 1e3:.0f}"


def _overhead_line(stage: dict) -> str:
    interval, compute, overhead = (_num(stage.get(k), ".2f") for k in ("step_interval_ms", "compute_ms", "overhead_ms"))
    return f"step overhead {stage['worker']}: interval {interval} ms - compute {compute} ms = {overhead} ms"


def _cpu_lines(cpu: dict) -> list[str]:
    """Where the mesh's CPU went: one row per role group and the total (``-``: no pid known)."""
    lines = [f"{'CPU over the run':<22}{'procs':>6}{'CPU s':>9}{'µs/out tok':>12}{'cores':>7}"]
    for role, r in cpu["roles"].items():
        label = role + (f" ({r['unknown']} unknown)" if r["unknown"] else "")
        lines.append(f"{label:<22}{r['processes']:>6}{_num(r['cpu_s'], '.2f'):>9}"
                     f"{_num(r['us_per_token'], '.1f'):>12}{_num(r['cores'], '.2f'):>7}")
    return lines


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
