"""The in-process chain: stage runners called one after another, behind the engine's Chain interface."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stagemesh.config import ModelConfig
from stagemesh.plan import split_layers
from stagemesh.serving.types import StepPlan, StepResult

from .runner import StageRunner


class LocalChain:
    """Every stage of one chain in this process; ``step`` runs a micro-batch through all of them."""

    def __init__(self, runners: list[StageRunner]):
        self.runners = runners
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-chain")

    @classmethod
    def load(cls, model_dir: str | Path, num_stages: int = 1, **runner_kwargs) -> "LocalChain":
        specs = split_layers(ModelConfig.from_dir(model_dir), num_stages)
        return cls([StageRunner(model_dir, spec, **runner_kwargs) for spec in specs])

    @property
    def num_kv_blocks(self) -> int:
        """Blocks every stage can hold: the scheduler's KV budget."""
        return min(r.cache.num_blocks for r in self.runners)

    @property
    def block_size(self) -> int:
        return self.runners[0].cache.block_size

    async def step(self, plan: StepPlan) -> StepResult:
        # NOTE: the torch work runs off the event loop so the loop stays free to take requests,
        # on ONE thread, so that steps run in the order they came (overlap scheduling needs it).
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.run, plan)

    def run(self, plan: StepPlan) -> StepResult:
        x = None
        for runner in self.runners:
            x = runner.step(plan, x)
        return x
