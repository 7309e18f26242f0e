"""One pipeline stage (one TP rank of it): its layers, its KV cache, sampling on the last stage.

No gRPC here: the servicer decodes a micro-batch, calls ``step``, encodes the result; the
in-process engine calls ``step`` directly.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from functools import partial
from pathlib import Path

import torch

from stagemesh.config import ModelConfig, StageSpec
from stagemesh.errors import InvalidArgument, Unavailable
from stagemesh.model.attention import AttnMetadata
from stagemesh.model.decoder import StageModel
from stagemesh.model.kv_cache import KVCache
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.moe import Experts
from stagemesh.model.parallel import TPGroup
from stagemesh.model.sampling import SamplingBatch, sample
from stagemesh.serving.blocks import blocks_needed
from stagemesh.serving.types import PENDING_TOKEN, StepPlan, StepResult

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_MEMORY = 512 * 2**20
MAX_SEQS_PER_STAGE = 256  # the KV cache never needs more blocks than this many full-length sequences


def resolve_dtype(name: str | None, config: ModelConfig) -> torch.dtype:
    name = name or config.dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class StageRunner:
    """Runs micro-batches through one stage: ``step(plan, hidden)``."""

    def __init__(
        self,
        model_dir: str | Path,
        spec: StageSpec,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        tp: TPGroup = TPGroup(),
        kv_memory_bytes: int | None = None,
        num_kv_blocks: int | None = None,
        block_size: int = 16,
        experts: Experts | None = None,
    ):
        self.config = ModelConfig.from_dir(model_dir)
        self.spec, self.device, self.tp = spec, torch.device(device), tp
        self.dtype = resolve_dtype(dtype, self.config)
        self.reader = CheckpointReader(model_dir)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = StageModel(self.config, spec, tp, experts)
        self.model.load(self.reader)
        self.model.eval()
        num_blocks = num_kv_blocks or self._blocks_for(kv_memory_bytes or DEFAULT_KV_MEMORY, block_size)
        self.cache = KVCache(
            len(spec.attention_layers), num_blocks, block_size, self.model.num_kv_heads, self.config.head_dim, self.dtype, self.device
        )
        self.sampled: dict[int, int] = {}
        """A single-stage runner's last sampled token per sequence (until freed): what a
        ``PENDING_TOKEN`` stands for (overlap scheduling; on a longer chain the first stage's
        worker fills it in before the step reaches a runner: ``stage_worker.feedback``)."""
        self.epoch = 0
        """The newest gateway incarnation whose steps this stage ran (``StepPlan.epoch``)."""
        log.info("stage %s on %s: %d KV blocks of %d tokens", spec, device, num_blocks, block_size)

    def _blocks_for(self, memory: int, block_size: int) -> int:
        per_block = KVCache.bytes_per_block(
            len(self.spec.attention_layers), block_size, self.model.num_kv_heads, self.config.head_dim, self.dtype
        )
        useful = MAX_SEQS_PER_STAGE * blocks_needed(self.config.max_position_embeddings, block_size)
        return min(memory // per_block, useful)

    def step(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
        """Free what the plan frees, run its chunks; returns hidden states [N, H] for the next
        stage, or — on the last stage — the sampled tokens. ``hidden`` (None on the first
        stage) may be on any device in any dtype, e.g. as it came off the wire."""
        if plan.epoch != self.epoch and plan.epoch:
            self._enter_epoch(plan)
        for seq_id in plan.free:
            self.cache.free(seq_id)
            self.sampled.pop(seq_id, None)
        if not plan.chunks:
            return StepResult(plan.step_id) if self.spec.is_last else self._empty_hidden()
        if self.spec.is_first:  # before any KV is touched: a refused pending token changes nothing
            plan = plan.fill_pending(partial(self._own_sample, plan.step_id))
            ids = list(itertools.chain.from_iterable(c.token_ids for c in plan.chunks))
            hidden = torch.tensor(ids, dtype=torch.int64, device=self.device)
        else:
            hidden = self._input(plan, hidden)
        chunks = plan.chunks
        tables = [self.cache.ensure(c.seq_id, c.end) for c in chunks]
        meta = AttnMetadata.build(
            [c.start for c in chunks],
            [len(c.token_ids) for c in chunks],
            tables,
            self.cache.block_size,
            self.device,
            self.config.sliding_window,
            self.dtype,
        )
        out = self.model(hidden, meta, self.cache)
        if not self.spec.is_last:
            return out
        result = self._sample(plan, out)
        if self.spec.is_first:
            self.sampled.update(result.tokens)
        return result

    def _enter_epoch(self, plan: StepPlan) -> None:
        """A step of another gateway incarnation. NOTE: a newer one (the gateway restarted)
        knows nothing of the sequences the old one left here, and its sequence ids start over:
        drop them all (it re-prefills what it took over). An older one is a gateway that a newer
        one replaced: refused, so it cannot touch the new one's sequences."""
        if plan.epoch < self.epoch:
            raise Unavailable(f"step {plan.step_id} comes from an older gateway (epoch {plan.epoch} < {self.epoch}): "
                              "a newer gateway drives this stage")
        dropped = list(self.cache.block_tables)
        for seq_id in dropped:
            self.cache.free(seq_id)
        self.sampled.clear()
        if self.epoch:
            log.warning("stage %s: a new gateway (epoch %d); dropped the %d sequence(s) of the old one",
                        self.spec, plan.epoch, len(dropped))
        self.epoch = plan.epoch

    def _own_sample(self, step_id: int, seq_id: int) -> int:
        """What a ``PENDING_TOKEN`` of ``seq_id`` stands for on a stage that samples itself."""
        if not self.spec.is_last:
            raise InvalidArgument(
                f"step {step_id}: sequence {seq_id} has a pending token ({PENDING_TOKEN}); only a stage "
                "that samples fills it in itself (on a longer chain the first stage's worker fills it in: "
                "overlap scheduling)"
            )
        token = self.sampled.get(seq_id)
        if token is None:
            raise InvalidArgument(
                f"step {step_id}: sequence {seq_id} asks for the token sampled for it before, "
                "and this stage has sampled none for it"
            )
        return token

    def _input(self, plan: StepPlan, hidden: torch.Tensor | None) -> torch.Tensor:
        """The previous stage's activations [N, H] on this stage's device and dtype; InvalidArgument
        (before any collective, on every TP rank alike) when they do not fit the plan."""
        want = [plan.num_tokens, self.config.hidden_size]
        if hidden is None or list(hidden.shape) != want:
            got = "none" if hidden is None else f"shape {list(hidden.shape)}"
            raise InvalidArgument(
                f"step {plan.step_id}: stage of layers {self.spec.label} got hidden states of {got}; it needs {want} "
                "(tokens, hidden_size)"
            )
        return hidden.to(self.device, self.dtype)

    def _sample(self, plan: StepPlan, hidden: torch.Tensor) -> StepResult:
        ends = list(itertools.accumulate(len(c.token_ids) for c in plan.chunks))
        picked = [(c, end - 1) for c, end in zip(plan.chunks, ends) if c.sample is not None]
        if not picked:
            return StepResult(plan.step_id)
        rows = torch.tensor([row for _, row in picked], device=self.device)
        params = SamplingBatch.of([c.sample for c, _ in picked], self.device)
        tokens = sample(self.model.logits(hidden[rows]), params).tolist()
        return StepResult(plan.step_id, {c.seq_id: t for (c, _), t in zip(picked, tokens)})

    def _empty_hidden(self) -> torch.Tensor:
        return torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.device)
