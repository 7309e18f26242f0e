"""The mesh's control state in Redis: the one module that imports ``redis``.

``Store`` is a small typed layer over ``redis.asyncio``, one group of methods per concern:

- **registry**: workers register once and heartbeat; a worker is alive while its heartbeat
  key (a Redis key with a TTL) exists; its registration stays until it is deregistered.
- **topology**: the deployment's layout document, as planned by ``stagemesh up``.
- **journal**: one entry per request (prompt, parameters, chain, tokens emitted so far), so a
  request whose chain fails is re-prefilled on another chain.
- **metrics**: per-worker figures for the dashboards, expiring with the worker.
- **placement**: per chain, which expert worker holds which (layer, expert), and which of
  them the gateway has marked down (stages route only to the live ones).

NOTE: this file passes 400 lines on purpose: STYLE.md keeps every Redis key and command in
one module, and the five groups are a handful of short methods each over shared key helpers.

Every key starts with ``stagemesh:<deployment>:`` so two meshes can share one Redis. Callers
never see a redis exception: an unreachable server raises ``Unavailable``, anything else
``Internal`` (both from ``stagemesh.errors``).

Key layout (``P`` = ``stagemesh:<deployment>``)::

    P:workers                   set of worker ids
    P:worker:<id>               JSON WorkerInfo (no TTL)
    P:alive:<id>                "1", expires ttl_s after the last heartbeat
    P:topology                  JSON Topology
    P:journal:<rid>             hash: prompt (JSON list), params (JSON), chain
    P:journal:<rid>:tokens      string: the emitted token ids, each followed by a comma
    P:chain:<c>:requests        set of request ids journaled on chain c
    P:metrics                   set of worker ids that have put metrics
    P:metrics:<id>              hash: figure name -> JSON value, expires with a TTL
    P:placement:<c>             hash: expert worker id -> JSON {address, experts}
    P:placement:<c>:down        set of expert worker ids marked down
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stagemesh.errors import Internal, Unavailable
from stagemesh.mesh.topology import Topology

ROLES = ("stage", "expert", "gateway")
_APPEND_ALL = "for i, key in ipairs(KEYS) do redis.call('APPEND', key, ARGV[i]) end return #KEYS"
"""Lua: APPEND ARGV[i] to KEYS[i] for every i (``Store.journal_append_many``)."""
DEFAULT_METRICS_TTL_S = 30.0


def stage_worker_id(chain: int, stage: int) -> str:
    """The registry id of the stage worker of chain ``chain``, stage ``stage``: ``stage-c0-s1``."""
    return f"stage-c{chain}-s{stage}"


def expert_worker_id(chain: int, worker: int) -> str:
    """The registry id of expert worker ``worker`` of chain ``chain``: ``expert-c0-e2``."""
    return f"expert-c{chain}-e{worker}"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells the mesh about itself when it registers."""

    worker_id: str
    """Unique within the deployment, e.g. ``stage-c0-s1`` (``stage_worker_id``) or ``expert-c0-e3``
    (``expert_worker_id``)."""
    role: str
    """One of ``stage``, ``expert``, ``gateway``."""
    chain: int | None = None
    """The data-parallel chain a stage belongs to; None for shared expert workers and the gateway."""
    stage: int | None = None
    """Pipeline stage index within its chain; None for non-stage roles."""
    start_layer: int | float | None = None
    """First global decoder layer held (stages only); ``x.5``: from layer x's MLP."""
    end_layer: int | float | None = None
    """One past the last global decoder layer held (stages only); ``x.5``: up to layer x's attention."""
    experts: dict[int, list[int]] = field(default_factory=dict)
    """Global layer -> expert ids held (expert workers only; empty for stages)."""
    address: str = ""
    """``host:port`` of the worker's gRPC server."""
    pid: int = field(default_factory=os.getpid)
    device: str = "cpu"
    """Torch device string, e.g. ``cuda:0``."""
    tp_size: int = 1
    """Tensor-parallel ranks behind this worker's one gRPC server."""
    started_at: float = field(default_factory=time.time)
    """Unix time the worker started."""
    alive: bool = True
    """Filled in by ``Store.list_workers`` from the heartbeat key; not stored."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"WorkerInfo.role={self.role!r}: must be one of {ROLES}")
        if not self.worker_id:
            raise ValueError("WorkerInfo.worker_id is empty: each worker needs a unique id")

    def to_json(self) -> str:
        doc = dataclasses.asdict(self)
        del doc["alive"]
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str, alive: bool) -> WorkerInfo:
        doc = json.loads(text)
        # JSON object keys are strings; layers are ints.
        doc["experts"] = {int(layer): list(ids) for layer, ids in doc["experts"].items()}
        return cls(**doc, alive=alive)


@dataclass(frozen=True)
class JournalEntry:
    """One request as journaled: enough to re-prefill it on another chain."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: dict[str, Any]
    """Sampling parameters as the gateway encoded them (JSON-compatible)."""
    chain: int
    """The chain now serving the request."""
    token_ids: tuple[int, ...]
    """Tokens emitted (and streamed to the client) so far, in order."""


@dataclass(frozen=True)
class ExpertReplica:
    """One expert worker's share of a chain's expert placement."""

    worker_id: str
    """Its registry id (``expert_worker_id``)."""
    address: str
    """``host:port`` of its ``Expert`` service."""
    experts: dict[int, list[int]]
    """Global MoE layer -> the expert ids it holds in that layer."""
    live: bool = True
    """False while the gateway has marked it down: stages send it no rows."""

    def to_json(self) -> str:
        return json.dumps({"address": self.address, "experts": self.experts})

    @classmethod
    def from_json(cls, worker_id: str, text: str, live: bool) -> ExpertReplica:
        doc = json.loads(text)
        experts = {int(layer): list(ids) for layer, ids in doc["experts"].items()}  # JSON keys are strings
        return cls(worker_id, doc["address"], experts, live)


def _translate_errors(method):
    """Turn redis exceptions into the project's own errors, naming the Redis URL."""

    @functools.wraps(method)
    async def wrapper(self: Store, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as err:
            raise Unavailable(f"Redis at {self.url} is unreachable ({err}); is redis-server running?") from err
        except RedisError as err:
            raise Internal(f"Redis at {self.url} failed in {method.__name__}: {err}") from err

    return wrapper


class Store:
    """Typed access to one deployment's control state in Redis. Use ``await Store.connect(url)``."""

    def __init__(self, client: aioredis.Redis, url: str, deployment: str = "default"):
        if not deployment or ":" in deployment:
            raise ValueError(f"deployment={deployment!r}: must be non-empty and contain no ':'")
        self._r = client
        self.url = url
        self.deployment = deployment
        self._prefix = f"stagemesh:{deployment}"

    @classmethod
    async def connect(cls, url: str, deployment: str = "default", *, timeout_s: float = 5.0) -> Store:
        """Connect to ``url`` (``redis://host:port/db``) and check it answers PING."""
        client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        store = cls(client, url, deployment)
        try:
            await store.ping()
        except BaseException:
            await client.aclose()
            raise
        return store

    @_translate_errors
    async def ping(self) -> None:
        await self._r.ping()

    @_translate_errors
    async def server_id(self) -> str:
        """The Redis server's ``run_id``: a new one each time the server starts, so a caller that
        saw another one before knows Redis restarted (and may have lost recent writes)."""
        return (await self._r.info("server"))["run_id"]

    async def close(self) -> None:
        await self._r.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _key(self, *parts: object) -> str:
        return ":".join((self._prefix, *map(str, parts)))

    # --- registry -------------------------------------------------------------------------

    @_translate_errors
    async def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        """Record ``info`` and mark the worker alive for ``ttl_s`` seconds."""
        async with self._r.pipeline() as pipe:
            pipe.set(self._key("worker", info.worker_id), info.to_json())
            pipe.sadd(self._key("workers"), info.worker_id)
            pipe.set(self._key("alive", info.worker_id), "1", px=_ms(ttl_s))
            await pipe.execute()

    @_translate_errors
    async def heartbeat(self, worker_id: str, ttl_s: float, figures: dict[str, Any] | None = None) -> bool:
        """Keep the worker alive ``ttl_s`` more seconds; store ``figures`` as its metrics.

        Returns False when the worker is not registered (it was deregistered, e.g. as dead
        while it was only slow): the worker should call ``register_worker`` again.
        """
        async with self._r.pipeline() as pipe:
            pipe.set(self._key("alive", worker_id), "1", px=_ms(ttl_s))
            pipe.sismember(self._key("workers"), worker_id)
            if figures:
                self._queue_metrics(pipe, worker_id, figures, ttl_s)
            results = await pipe.execute()
        return bool(results[1])

    @_translate_errors
    async def list_workers(self) -> list[WorkerInfo]:
        """Every registered worker, sorted by id, with ``alive`` from its heartbeat key."""
        ids = sorted(await self._r.smembers(self._key("workers")))
        async with self._r.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.get(self._key("worker", worker_id))
                pipe.exists(self._key("alive", worker_id))
            results = await pipe.execute()
        infos, alive = results[0::2], results[1::2]
        return [WorkerInfo.from_json(text, bool(a)) for text, a in zip(infos, alive) if text is not None]

    @_translate_errors
    async def mark_down(self, worker_id: str) -> None:
        """The worker is down as of now (no waiting for its heartbeat to expire); it stays
        registered, so that status lists it as unhealthy."""
        await self._r.delete(self._key("alive", worker_id))

    @_translate_errors
    async def deregister_worker(self, worker_id: str) -> None:
        """Forget the worker: registration, heartbeat and metrics."""
        async with self._r.pipeline() as pipe:
            pipe.srem(self._key("workers"), worker_id)
            pipe.delete(self._key("worker", worker_id), self._key("alive", worker_id))
            pipe.srem(self._key("metrics"), worker_id)
            pipe.delete(self._key("metrics", worker_id))
            await pipe.execute()

    # --- topology -------------------------------------------------------------------------

    @_translate_errors
    async def set_topology(self, topology: Topology) -> None:
        await self._r.set(self._key("topology"), topology.to_json())

    @_translate_errors
    async def set_topology_if_absent(self, topology: Topology) -> bool:
        """Write ``topology`` unless one is there (Redis came back empty); whether it wrote it."""
        return bool(await self._r.set(self._key("topology"), topology.to_json(), nx=True))

    @_translate_errors
    async def has_topology(self) -> bool:
        """Whether a topology is written (False: never written, or Redis lost it)."""
        return bool(await self._r.exists(self._key("topology")))

    @_translate_errors
    async def get_topology(self) -> Topology | None:
        """The deployment's topology; None before one is written. ValueError when it is malformed."""
        text = await self._r.get(self._key("topology"))
        return None if text is None else Topology.from_json(text)

    # --- journal --------------------------------------------------------------------------

    async def journal_open(
        self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any], chain: int
    ) -> None:
        """Journal a new request on ``chain``; an existing entry of that id is replaced."""
        await self.journal_open_many({request_id: (prompt_token_ids, params, chain)})

    @_translate_errors
    async def journal_open_many(self, entries: dict[str, tuple[list[int], dict[str, Any], int]]) -> None:
        """``journal_open`` for many requests (id -> (prompt, params, chain)) in two round trips."""
        old_chains = await self._journal_chains(list(entries))
        async with self._r.pipeline() as pipe:
            for (request_id, (prompt_token_ids, params, chain)), old_chain in zip(entries.items(), old_chains):
                if old_chain is not None:
                    pipe.srem(self._key("chain", old_chain, "requests"), request_id)
                pipe.delete(self._key("journal", request_id), self._key("journal", request_id, "tokens"))
                pipe.hset(
                    self._key("journal", request_id),
                    mapping={"prompt": json.dumps(list(prompt_token_ids)), "params": json.dumps(params),
                             "chain": chain},
                )
                pipe.sadd(self._key("chain", chain, "requests"), request_id)
            await pipe.execute()

    async def _journal_chains(self, request_ids: list[str]) -> list[str | None]:
        """The chain each request is journaled on (None: not journaled), in one round trip."""
        async with self._r.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hget(self._key("journal", request_id), "chain")
            return await pipe.execute()

    async def journal_append(self, request_id: str, token_ids: list[int]) -> None:
        """Append emitted tokens to one request (one round trip)."""
        await self.journal_append_many({request_id: token_ids})

    @_translate_errors
    async def journal_append_many(self, tokens_by_request: dict[str, list[int]]) -> None:
        """Append the emitted tokens of many requests: ONE command, however many requests.

        NOTE: one ``APPEND`` per request inside a Lua script, not one pipelined command per
        request: redis-py packs every command in Python, and at 128 streams those commands were
        the gateway's largest cost (py-spy). Each request's tokens are text, ``"101,102,"``."""
        items = [(self._key("journal", rid, "tokens"), "".join(f"{t}," for t in ids))
                 for rid, ids in tokens_by_request.items() if ids]
        if items:
            keys, values = zip(*items)
            await self._r.eval(_APPEND_ALL, len(keys), *keys, *values)

    @_translate_errors
    async def journal_get(self, request_id: str) -> JournalEntry | None:
        """The request's entry, or None when it was never opened or is closed."""
        async with self._r.pipeline() as pipe:
            pipe.hgetall(self._key("journal", request_id))
            pipe.get(self._key("journal", request_id, "tokens"))
            meta, tokens = await pipe.execute()
        if not meta:
            return None
        return JournalEntry(
            request_id=request_id,
            prompt_token_ids=tuple(json.loads(meta["prompt"])),
            params=json.loads(meta["params"]),
            chain=int(meta["chain"]),
            token_ids=tuple(int(t) for t in (tokens or "").split(",") if t),
        )

    @_translate_errors
    async def journal_move(self, request_id: str, chain: int) -> None:
        """Record that ``chain`` now serves the request (after its old chain failed)."""
        old_chain = await self._r.hget(self._key("journal", request_id), "chain")
        if old_chain is None:
            raise KeyError(f"request {request_id!r} is not journaled; cannot move it to chain {chain}")
        async with self._r.pipeline() as pipe:
            pipe.srem(self._key("chain", old_chain, "requests"), request_id)
            pipe.hset(self._key("journal", request_id), "chain", chain)
            pipe.sadd(self._key("chain", chain, "requests"), request_id)
            await pipe.execute()

    async def journal_close(self, request_id: str) -> None:
        """Delete the request's entry (finished, cancelled or failed for good); no-op if absent."""
        await self.journal_close_many([request_id])

    @_translate_errors
    async def journal_close_many(self, request_ids: list[str]) -> None:
        """``journal_close`` for many requests in two round trips."""
        old_chains = await self._journal_chains(request_ids)
        async with self._r.pipeline() as pipe:
            for request_id, old_chain in zip(request_ids, old_chains):
                if old_chain is not None:
                    pipe.srem(self._key("chain", old_chain, "requests"), request_id)
                pipe.delete(self._key("journal", request_id), self._key("journal", request_id, "tokens"))
            await pipe.execute()

    @_translate_errors
    async def journal_by_chain(self, chain: int) -> list[str]:
        """Ids of the requests journaled on ``chain``, sorted."""
        return sorted(await self._r.smembers(self._key("chain", chain, "requests")))

    # --- placement ------------------------------------------------------------------------

    @_translate_errors
    async def set_placement(self, chain: int, replicas: list[ExpertReplica]) -> None:
        """Replace chain ``chain``'s expert placement (and which replicas are down)."""
        async with self._r.pipeline() as pipe:
            pipe.delete(self._key("placement", chain), self._key("placement", chain, "down"))
            if replicas:
                pipe.hset(self._key("placement", chain), mapping={r.worker_id: r.to_json() for r in replicas})
            down = [r.worker_id for r in replicas if not r.live]
            if down:
                pipe.sadd(self._key("placement", chain, "down"), *down)
            await pipe.execute()

    @_translate_errors
    async def get_placement(self, chain: int) -> list[ExpertReplica]:
        """Chain ``chain``'s expert workers, sorted by id, with ``live``; empty when none is placed."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._key("placement", chain))
            pipe.smembers(self._key("placement", chain, "down"))
            held, down = await pipe.execute()
        return [ExpertReplica.from_json(w, held[w], w not in down) for w in sorted(held)]

    @_translate_errors
    async def set_replica_live(self, chain: int, worker_id: str, live: bool) -> None:
        """Mark one expert worker's replicas up (``live``) or down in chain ``chain``'s placement."""
        if live:
            await self._r.srem(self._key("placement", chain, "down"), worker_id)
        else:
            await self._r.sadd(self._key("placement", chain, "down"), worker_id)

    # --- metrics --------------------------------------------------------------------------

    @_translate_errors
    async def put_metrics(
        self, worker_id: str, figures: dict[str, Any], ttl_s: float = DEFAULT_METRICS_TTL_S
    ) -> None:
        """Replace the worker's figures (JSON values); they expire after ``ttl_s`` seconds."""
        async with self._r.pipeline() as pipe:
            self._queue_metrics(pipe, worker_id, figures, ttl_s)
            await pipe.execute()

    @_translate_errors
    async def get_metrics(self) -> dict[str, dict[str, Any]]:
        """worker_id -> figures, for every worker whose figures have not expired."""
        ids = sorted(await self._r.smembers(self._key("metrics")))
        async with self._r.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self._key("metrics", worker_id))
            hashes = await pipe.execute()
        expired = [worker_id for worker_id, h in zip(ids, hashes) if not h]
        if expired:
            await self._r.srem(self._key("metrics"), *expired)
        return {
            worker_id: {name: json.loads(value) for name, value in h.items()}
            for worker_id, h in zip(ids, hashes)
            if h
        }

    def _queue_metrics(self, pipe, worker_id: str, figures: dict[str, Any], ttl_s: float) -> None:
        key = self._key("metrics", worker_id)
        pipe.delete(key)
        if figures:
            pipe.hset(key, mapping={name: json.dumps(value) for name, value in figures.items()})
            pipe.pexpire(key, _ms(ttl_s))
            pipe.sadd(self._key("metrics"), worker_id)


def _ms(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses 0)."""
    if seconds <= 0:
        raise ValueError(f"ttl_s={seconds}: must be > 0")
    return max(1, round(seconds * 1000))
