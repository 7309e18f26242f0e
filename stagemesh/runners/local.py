"""The in-process chain: stage runners called one after another, behind the engine's Chain interface."""

from __future__ import annotations

from pathlib import Path

from stagemesh.config import ModelConfig
from stagemesh.mesh.layout import split_layers
from stagemesh.model import torch_thread
from stagemesh.runners.stage import StageRunner
from stagemesh.serving.types import StepPlan, StepResult


class LocalChain:
    """Every stage of one chain in this process; ``step`` runs a micro-batch through all of them."""

    def __init__(self, runners: list[StageRunner]):
        self.runners = runners

    @classmethod
    def load(cls, model_dir: str | Path, num_stages: int = 1, **runner_kwargs) -> "LocalChain":
        specs = split_layers(ModelConfig.from_dir(model_dir), num_stages)
        # NOTE: built on the thread that will step them: see ``stagemesh.model.torch_thread``.
        return cls(torch_thread.call(lambda: [StageRunner(model_dir, spec, **runner_kwargs) for spec in specs]))

    @property
    def num_kv_blocks(self) -> int:
        """Blocks every stage can hold: the scheduler's KV budget."""
        return min(r.cache.num_blocks for r in self.runners)

    @property
    def block_size(self) -> int:
        return self.runners[0].cache.block_size

    async def step(self, plan: StepPlan) -> StepResult:
        # NOTE: the torch work runs off the event loop so the loop stays free to take requests,
        # on ONE thread (the process's torch thread), so that steps run in the order they came
        # (overlap scheduling needs it).
        return await torch_thread.run(self.run, plan)

    def run(self, plan: StepPlan) -> StepResult:
        x = None
        for runner in self.runners:
            x = runner.step(plan, x)
        return x
