"""The in-process engine: the serving scheduler over a chain of stage runners in this process.

It is the mesh minus the network: the same ``Engine`` (scheduler + step loop) drives a
``LocalChain`` here and a chain of gRPC stage workers in the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

from stagemesh.cli.requests_io import InputLine, Outcome
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.serving.engine import Engine
from stagemesh.serving.scheduler import SchedulerConfig
from stagemesh.serving.types import Request, StepPlan
from stagemesh.tokenizer import Tokenizer, encode_prompt, eos_token_ids


class InProcessEngine:
    """Loads a model (optionally split into in-process pipeline stages) and serves requests."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        pp: int = 1,
        device: str = "cpu",
        dtype: str | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        max_num_batched_tokens: int = 512,
        max_num_seqs: int = 256,
        overlap: bool = True,
    ):
        from stagemesh.runners.local import LocalChain  # torch is imported only when a model is loaded

        self.config = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.chain = LocalChain.load(
            model_dir, pp, device=device, dtype=dtype, num_kv_blocks=num_kv_blocks, block_size=block_size
        )
        self.scheduler_config = SchedulerConfig(
            block_size=block_size,
            num_blocks=self.chain.num_kv_blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=self.config.max_position_embeddings,
            eos_token_ids=eos_token_ids(self.config, self.tokenizer),
            overlap=overlap and pp == 1,  # the one stage embeds and samples: see the scheduler's NOTE
        )
        self._ids = itertools.count()

    async def run(self, lines: list[InputLine]) -> list[Outcome]:
        """Every line at once through continuous batching; outcomes in input order."""
        async with self._engine() as engine:
            return list(await asyncio.gather(*(self._one(engine, line) for line in lines)))

    async def stream(self, line: InputLine) -> AsyncIterator[tuple[int | None, str]]:
        """One request's tokens as they come: (token id, the text it adds). The text is decoded
        from all tokens so far, and held back while it ends in half a UTF-8 character."""
        async with self._engine() as engine:
            request = Request(f"local-{next(self._ids)}", self.encode(line), line.params)
            ids, shown = [], ""
            async for event in engine.generate(request):
                piece = ""
                if event.token_id is not None:
                    ids.append(event.token_id)
                    text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
                    if not text.endswith("\ufffd") and text.startswith(shown):
                        piece, shown = text[len(shown):], text
                yield event.token_id, piece

    @contextlib.asynccontextmanager
    async def _engine(self) -> AsyncIterator[Engine]:
        """A running engine over this chain; on exit, the KV cache it may have left in the chain is freed.

        NOTE: each ``run`` or ``stream`` has an engine of its own, whose scheduler numbers sequences
        from 0 again, while the chain's stages keep their KV cache: a sequence whose free had not
        gone out with a step before its engine stopped would meet the next engine's sequence of
        that id (a stage refuses a chunk that does not start where the sequence's cache ends). The
        free-only step queues behind any step still running on the torch thread."""
        engine = Engine(
            self.chain,
            self.scheduler_config,
            vocab_size=self.config.vocab_size,
            max_model_len=self.config.max_position_embeddings,
        )
        try:
            async with engine:
                yield engine
        finally:
            if left := tuple(engine.scheduler.cached_seq_ids()):
                await self.chain.step(StepPlan(0, (), left))

    async def _one(self, engine: Engine, line: InputLine) -> Outcome:
        try:
            ids = self.encode(line)
            request = Request(f"local-{next(self._ids)}", ids, line.params)
            out = Outcome([], logprobs=[] if line.params.logprobs else None)
            async for event in engine.generate(request):
                if event.token_id is not None:
                    out.token_ids.append(event.token_id)
                    if out.logprobs is not None:
                        out.logprobs.append(event.logprobs)
                out.finish_reason = event.finish_reason
        except StagemeshError as e:
            return Outcome([], error=e)
        out.text = self.tokenizer.decode(out.token_ids) if self.tokenizer is not None else None
        return out

    def encode(self, line: InputLine) -> tuple[int, ...]:
        if line.token_ids is not None:
            return line.token_ids
        return encode_prompt(self.tokenizer, line.prompt)
