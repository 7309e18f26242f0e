"""One pipeline stage (one TP rank of it): its layers, its KV cache, sampling on the last stage.

No gRPC here: the servicer decodes a micro-batch, calls ``step``, encodes the result; the
in-process engine calls ``step`` directly.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from stagemesh.config import ModelConfig, StageSpec
from stagemesh.errors import InvalidArgument, ResourceExhausted, Unavailable
from stagemesh.model.attention import AttnMetadata
from stagemesh.model.decoder import StageModel
from stagemesh.model.kv_cache import KVCache
from stagemesh.model.loader import CheckpointReader
from stagemesh.model.moe import Experts
from stagemesh.model.parallel import TPGroup
from stagemesh.model.sampling import SamplingBatch, sample, token_logprobs
from stagemesh.runners.step_checks import KVState, StageLimits, check_step
from stagemesh.serving.blocks import blocks_needed
from stagemesh.serving.params import SampleSpec
from stagemesh.serving.types import PENDING_TOKEN, StepPlan, StepResult, TokenLogprobs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_MEMORY = 512 * 2**20
MAX_SEQS_PER_STAGE = 256  # the KV cache never needs more blocks than this many full-length sequences
MAX_EPOCH_AHEAD_S = 300
"""A step whose epoch (a gateway's start time) is further ahead of this stage's clock is refused:
a forged far-future epoch would otherwise lock every real gateway out for good."""
IDLE_STEPS = 4096
"""A sequence that no step touched in this many steps is dropped when a step does not fit the
free KV blocks. NOTE: the gateway puts each running sequence in every step of its micro-batch
slot (one of stages + 1) and never preempts, so only an abandoned or forged sequence idles this
long; counted in steps, not seconds, so every TP rank drops the same ones."""


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
        progress: Callable[[int, int], None] | None = None,
    ):
        """``progress(done, total)``: called after each layer loaded."""
        self.config = ModelConfig.from_dir(model_dir)
        self.spec, self.device, self.tp = spec, torch.device(device), tp
        self.dtype = resolve_dtype(dtype, self.config)
        self.reader = CheckpointReader(model_dir)
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = StageModel(self.config, spec, tp, experts)
        self.model.load(self.reader, progress)
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
        self.limits = StageLimits(self.config.vocab_size, self.config.hidden_size, self.config.max_position_embeddings,
                                  block_size, spec.is_first, spec.is_last)
        self._steps = 0
        self._touched: dict[int, int] = {}
        """Sequence id -> the last step (of ``_steps``) that ran a chunk of it."""
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
        self._steps += 1
        self._check_fits(plan, hidden)  # the whole step, before any of it is applied
        if plan.epoch != self.epoch:
            self._enter_epoch(plan)
        for seq_id in plan.free:
            self._free(seq_id)
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
        self._touched.update((c.seq_id, self._steps) for c in chunks)
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

    def check(self, plan: StepPlan, hidden: torch.Tensor | None, *, before_fill: bool = False) -> None:
        """Refuses a step of another gateway incarnation (``_check_epoch``) or a malformed one
        (``step_checks``), before any of it runs; changes nothing. ``before_fill``: the worker
        checks a first stage's step before it fills in its pending tokens (and before it knows
        whether the KV blocks will fit), the runner once more as it runs it."""
        new_epoch = self._check_epoch(plan)
        cache = self.cache
        kv = (KVState({}, {}, cache.num_blocks) if new_epoch
              else KVState(cache.seq_tokens, cache.block_tables, cache.allocator.num_free))
        check_step(plan, hidden, self.limits, kv, fit=not before_fill)
        if self.spec.is_first and not before_fill:  # every pending token can be filled in
            for c in plan.chunks:
                if c.token_ids == (PENDING_TOKEN,):  # not with a sample this step frees, or an old epoch's
                    gone = new_epoch or c.seq_id in plan.free
                    self._own_sample(plan.step_id, c.seq_id, {} if gone else None)

    def _check_fits(self, plan: StepPlan, hidden: torch.Tensor | None) -> None:
        """``check``; a step that does not fit the free KV blocks first drops the sequences idle
        for ``IDLE_STEPS`` steps (abandoned, or forged), then is checked once more."""
        try:
            self.check(plan, hidden)
        except ResourceExhausted:
            keep = {c.seq_id for c in plan.chunks}
            idle = [s for s in self.cache.block_tables
                    if s not in keep and self._steps - self._touched.get(s, 0) > IDLE_STEPS]
            if not idle:
                raise
            log.warning("stage %s: KV cache full; dropped %d sequence(s) idle for over %d steps", self.spec, len(idle),
                        IDLE_STEPS)
            for seq_id in idle:
                self._free(seq_id)
            self.check(plan, hidden)

    def _check_epoch(self, plan: StepPlan) -> bool:
        """Whether ``plan`` starts a newer gateway incarnation; refuses one of another incarnation.

        NOTE: only the current incarnation's steps are taken. An older one is a gateway that a
        newer one replaced (UNAVAILABLE), an unstamped step (epoch 0) once a gateway drives the
        stage is no gateway's, and an epoch far ahead of this host's clock no real gateway's
        start time. The refusals do not say the current epoch: a sender that does not know it
        cannot learn it here."""
        if plan.epoch == self.epoch:
            return False
        if plan.epoch == 0:
            raise InvalidArgument(
                f"step {plan.step_id} has no epoch; a gateway drives this stage, and its steps carry one")
        if plan.epoch < self.epoch:
            raise Unavailable(f"step {plan.step_id} comes from an older gateway (epoch {plan.epoch}): "
                              "a newer gateway drives this stage")
        if plan.epoch > (time.time() + MAX_EPOCH_AHEAD_S) * 1e6:
            raise InvalidArgument(f"step {plan.step_id} has epoch {plan.epoch}, a gateway start time more than "
                                  f"{MAX_EPOCH_AHEAD_S} s ahead of this stage's clock")
        return True

    def _free(self, seq_id: int) -> None:
        self.cache.free(seq_id)
        self.sampled.pop(seq_id, None)
        self._touched.pop(seq_id, None)

    def _enter_epoch(self, plan: StepPlan) -> None:
        """A step of a newer gateway incarnation (``check`` refused any other). NOTE: it knows
        nothing of the sequences the old one left here, and its sequence ids start over: drop
        them all (it re-prefills what it took over)."""
        dropped = list(self.cache.block_tables)
        for seq_id in dropped:
            self._free(seq_id)
        self.sampled.clear()
        if self.epoch:
            log.warning("stage %s: a new gateway (epoch %d); dropped the %d sequence(s) of the old one",
                        self.spec, plan.epoch, len(dropped))
        self.epoch = plan.epoch

    def _own_sample(self, step_id: int, seq_id: int, sampled: dict[int, int] | None = None) -> int:
        """What a ``PENDING_TOKEN`` of ``seq_id`` stands for on a stage that samples itself (in
        ``sampled``, by default what it sampled last)."""
        if not self.spec.is_last:
            raise InvalidArgument(
                f"step {step_id}: sequence {seq_id} has a pending token ({PENDING_TOKEN}); only a stage "
                "that samples fills it in itself (on a longer chain the first stage's worker fills it in: "
                "overlap scheduling)"
            )
        token = (self.sampled if sampled is None else sampled).get(seq_id)
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
        specs = [c.sample for c, _ in picked]
        logits = self.model.logits(hidden[rows])  # [B, V] float32
        tokens = sample(logits, SamplingBatch.of(specs, self.device))  # [B]
        seq_ids = [c.seq_id for c, _ in picked]
        return StepResult(plan.step_id, dict(zip(seq_ids, tokens.tolist())),
                          _logprobs(specs, seq_ids, logits, tokens))

    def _empty_hidden(self) -> torch.Tensor:
        return torch.empty(0, self.config.hidden_size, dtype=self.dtype, device=self.device)


def _logprobs(specs: list[SampleSpec], seq_ids: list[int], logits: torch.Tensor, tokens: torch.Tensor
              ) -> dict[int, TokenLogprobs]:
    """seq_id -> its sampled token's log-probabilities, for the rows whose spec asks.

    NOTE: decided from the specs in Python, so a step where no row asks runs no log_softmax
    over the vocabulary and no device work at all; one that does computes the rows that ask,
    with the largest ``top_logprobs`` among them, each row keeping its own count."""
    asked = [i for i, spec in enumerate(specs) if spec.logprobs]
    if not asked:
        return {}
    top_n = max(specs[i].top_logprobs for i in asked)
    rows = torch.tensor(asked, device=logits.device)
    chosen, top_ids, top_values = (t.tolist() for t in token_logprobs(logits[rows], tokens[rows], top_n))
    out = {}
    for j, i in enumerate(asked):
        k = specs[i].top_logprobs
        out[seq_ids[i]] = TokenLogprobs(chosen[j], tuple(zip(top_ids[j][:k], top_values[j][:k])))
    return out
