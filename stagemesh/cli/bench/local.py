"""The systems a mesh is compared with, run in this process on the same requests: the
in-process engine (the mesh minus the network) and Hugging Face ``transformers``' batched
``generate`` with every request in one batch (its best case on a load of mixed lengths).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path

from stagemesh.cli.bench.workload import BenchRequest, SystemRun
from stagemesh.cli.requests_io import InputLine
from stagemesh.serving.types import SamplingParams, StepPlan, StepResult


class _CountingChain:
    """Wraps the engine's chain: counts steps and ticks the progress bar per sampled token."""

    def __init__(self, chain, progress):
        self.chain, self.progress, self.steps = chain, progress, 0

    async def step(self, plan: StepPlan) -> StepResult:
        result = await self.chain.step(plan)
        self.steps += 1
        self.progress.update(len(result.tokens))
        return result


def _lines(requests: list[BenchRequest], output_len: int | None = None) -> list[InputLine]:
    return [
        InputLine(None, r.token_ids, SamplingParams(max_new_tokens=output_len or r.output_len, ignore_eos=True))
        for r in requests
    ]


def run_inprocess(model_dir: Path, requests: list[BenchRequest], *, device: str, bar, overlap: bool = True) -> SystemRun:
    """Every request at once through ``InProcessEngine(model_dir).run`` (one stage, this process)."""
    from stagemesh.cli.inprocess import InProcessEngine

    kwargs = {"overlap": overlap}
    if device != "cpu":
        if "device" not in inspect.signature(InProcessEngine).parameters:
            raise ValueError(f"the in-process engine of this build runs on cpu only, not {device}")
        kwargs["device"] = device
    engine = InProcessEngine(model_dir, **kwargs)
    asyncio.run(engine.run(_lines(requests[:4], output_len=2)))  # warm-up
    with bar() as progress:
        # NOTE: ``run`` builds its Engine over ``engine.chain``; wrapping it counts steps without touching the engine.
        counter = _CountingChain(engine.chain, progress)
        engine.chain = counter
        t0 = time.time()
        outcomes = asyncio.run(engine.run(_lines(requests)))
        wall = time.time() - t0
    failed = [o.error for o in outcomes if o.error is not None]
    if failed:
        raise RuntimeError(f"the in-process engine failed {len(failed)} request(s), e.g. {failed[0].code}: {failed[0].message}")
    return SystemRun(
        name="inprocess",
        wall_s=wall,
        output_tokens=sum(len(o.token_ids) for o in outcomes),
        token_ids=[o.token_ids for o in outcomes],
        steps=counter.steps,
    )


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "--compare hf needs Hugging Face transformers, which is not installed: "
            "pip install 'stagemesh[test]' (or transformers>=5), or leave hf out of --compare"
        ) from None
    return transformers


def run_hf(model_dir: Path, requests: list[BenchRequest], *, device: str, dtype: str, bar) -> SystemRun:
    """One left-padded batch of every request through ``model.generate``: greedy,
    ``max_new_tokens`` = the longest output, ``min_new_tokens`` the same so no row stops early.
    Only each request's own ``output_len`` tokens count as useful output."""
    transformers = _import_transformers()
    import torch

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    _hf_generate(model, requests[:4], 2, device, None)  # warm-up
    longest = max(r.output_len for r in requests)
    with bar() as progress:
        t0 = time.time()
        out = _hf_generate(model, requests, longest, device, _progress_criteria(requests, progress))
        wall = time.time() - t0
    generated = out[:, -longest:].tolist()  # [B, longest]
    return SystemRun(
        name="hf",
        wall_s=wall,
        output_tokens=sum(r.output_len for r in requests),
        token_ids=[row[: r.output_len] for row, r in zip(generated, requests)],
        steps=longest,
    )


def _hf_generate(model, requests: list[BenchRequest], new_tokens: int, device: str, progress):
    import torch

    width = max(len(r.token_ids) for r in requests)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(r.token_ids)) + list(r.token_ids) for r in requests], device=device)  # [B, W]
    mask = torch.tensor([[0] * (width - len(r.token_ids)) + [1] * len(r.token_ids) for r in requests], device=device)
    criteria = [progress] if progress is not None else None
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=criteria,
        )


def _progress_criteria(requests: list[BenchRequest], progress):
    """A ``StoppingCriteria`` that never stops: it ticks the bar by the useful tokens of each step."""
    import torch
    from transformers import StoppingCriteria

    lengths = [r.output_len for r in requests]
    width = max(len(r.token_ids) for r in requests)

    class Ticker(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            step = input_ids.shape[1] - width  # tokens generated so far
            progress.update(sum(1 for n in lengths if n >= step))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Ticker()
