"""A chain's part of the gateway's start: wait until its stage workers serve and heartbeat, check
they are the stages the topology says, and build its engine (``build_chain``); ``retry`` is the
gateway's wait for what another process has not done yet (Redis, the topology, a stage)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, TypeVar

import grpc

from gateway.chain_client import STEP_DEADLINE, RemoteChain
from gateway.router import ChainHandle
from stagemesh.config import ModelConfig
from stagemesh.errors import StagemeshError
from stagemesh.mesh.store import Store, stage_worker_id
from stagemesh.mesh.topology import Chain
from stagemesh.runtime import health
from stagemesh.runtime import tls as mesh_tls
from stagemesh.runtime.deadline import Deadline
from stagemesh.runtime.health import HealthProbe
from stagemesh.runtime.tls import MeshTLS
from stagemesh.serving.engine import Engine
from stagemesh.serving.scheduler import SchedulerConfig
from stagemesh.tokenizer import Tokenizer, eos_token_ids
from stagemesh.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

if TYPE_CHECKING:
    from gateway.gateway import GatewayOptions

logger = logging.getLogger(__name__)

POLL_S = 0.5
LOG_EVERY_S = 10.0

T = TypeVar("T")


async def build_chain(
    chain: Chain, config: ModelConfig, tokenizer: Tokenizer | None, store: Store, opts: GatewayOptions, epoch: int = 0
) -> ChainHandle:
    """Wait until every stage of one chain serves and heartbeats, then build its engine, started."""
    chain_id, stages = chain.index, chain.stages
    addresses = tuple(s.address for s in stages)
    infos = await asyncio.gather(*(wait_for_stage(a, opts.tls) for a in addresses))
    for stage, info in zip(stages, infos):
        if (info.chain, info.stage) != (chain_id, stage.index):
            raise ValueError(
                f"the worker at {stage.address} serves chain {info.chain} stage {info.stage}, "
                f"but the topology puts chain {chain_id} stage {stage.index} there"
            )
    await retry(f"see every stage worker of chain {chain_id} heartbeat",
                lambda: _heartbeating(store, chain_id, len(stages)))
    sched = scheduler_config(infos, config, tokenizer, opts)

    deadline = Deadline(STEP_DEADLINE)  # one per chain: a chain that comes back keeps what it measured

    def renew() -> tuple[RemoteChain, Engine]:
        remote = RemoteChain(chain_id, addresses[0], epoch=epoch, deadline=deadline, tls=opts.tls)
        return remote, Engine(remote, sched, vocab_size=config.vocab_size, max_model_len=sched.max_model_len)

    remote, engine = renew()
    engine.start()
    logger.info("chain %d: %d stages, %d micro-batch(es) in flight, %d KV blocks of %d tokens", chain_id, len(stages),
                sched.num_slots, sched.num_blocks, sched.block_size)
    return ChainHandle(chain_id, remote, engine, addresses, renew)


def scheduler_config(
    infos: list[stage_pb2.StageInfo], config: ModelConfig, tokenizer: Tokenizer | None, opts: GatewayOptions
) -> SchedulerConfig:
    """One chain's limits: the KV blocks every stage holds, one micro-batch slot per stage unless
    ``opts.micro_batches`` asks for fewer (plus a lookahead one with overlap scheduling)."""
    block_sizes = {info.block_size for info in infos}
    if len(block_sizes) != 1:
        raise ValueError(f"the stages of a chain must share one KV block size, got {sorted(block_sizes)}")
    return SchedulerConfig(
        block_size=block_sizes.pop(),
        num_blocks=min(info.num_kv_blocks for info in infos),
        max_num_seqs=opts.max_num_seqs,
        max_num_batched_tokens=opts.max_num_batched_tokens,
        max_waiting=opts.max_waiting,
        num_slots=min(opts.micro_batches or len(infos), len(infos)),
        max_model_len=config.max_position_embeddings,
        eos_token_ids=eos_token_ids(config, tokenizer),
        overlap=opts.overlap,
    )


async def wait_for_stage(address: str, tls: MeshTLS | None = None) -> stage_pb2.StageInfo:
    """The stage's Info, once its health check answers SERVING (retried until it does).

    NOTE: the checks go over a ``HealthProbe``: one channel while the stage answers (NOT_SERVING
    while it loads: a check costs a third of one on a new channel), a new one after a failed
    check, since a channel that found the port closed waits out gRPC's reconnect backoff (1 s,
    then longer) before it dials again, long after the stage serves."""
    probe = HealthProbe(timeout_s=2.0, tls=tls)

    async def ready() -> stage_pb2.StageInfo:
        if not await probe.serving(address):
            raise LookupError("it does not answer SERVING yet")
        async with mesh_tls.aio_channel(address, tls) as channel:
            return await stage_pb2_grpc.StageStub(channel).Info(tensor_pb2.InfoRequest(), timeout=5.0)

    try:
        return await retry(f"reach the stage worker at {address}", ready)
    finally:
        await probe.close()


async def _heartbeating(store: Store, chain_id: int, num_stages: int) -> None:
    alive = {w.worker_id for w in await store.list_workers() if w.alive}
    ids = (stage_worker_id(chain_id, stage) for stage in range(num_stages))
    missing = [worker_id for worker_id in ids if worker_id not in alive]
    if missing:
        raise LookupError(f"no heartbeat yet from {', '.join(missing)}")


# --- waiting -----------------------------------------------------------------------------


async def retry(what: str, attempt) -> T:
    """``await attempt()`` until it succeeds, logging why not every LOG_EVERY_S seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_log = start + LOG_EVERY_S
    while True:
        try:
            return await attempt()
        except (StagemeshError, LookupError, grpc.RpcError) as err:
            if loop.time() >= next_log:
                logger.info("still waiting to %s: %s", what, _reason(err))
                next_log = loop.time() + LOG_EVERY_S
        await asyncio.sleep(health.retry_after(loop.time() - start, POLL_S))


def _reason(err: Exception) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)
