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
one module, and the five groups are a handful of short methods each over shared key helpers
(and the signing helpers, whose MACs are in ``stagemesh.mesh.signing``).

Every key starts with ``stagemesh:<deployment>:`` so two meshes can share one Redis. Callers
never see a redis exception: an unreachable server raises ``Unavailable``, anything else
``Internal`` (both from ``stagemesh.errors``).

Signed documents (``stagemesh.mesh.signing``): a store given a ``Signer`` signs the documents
processes act on (the topology, each worker's registration, each chain's placement, each journal
entry and its tokens) and refuses one it reads whose MAC is missing or wrong: it logs an error
naming the key, counts it in ``refusals``, and answers its last good copy of that document
(topology, placement) or leaves it out (a registration, a journal entry); with no good copy it
raises ``RefusedDocument``. Not signed, because nothing acts on them beyond display or a hint
the gateway checks itself: the heartbeat keys, the id sets, the metrics. A store without a
signer (``--insecure``) writes and reads unsigned documents, as before signing.

Key layout (``P`` = ``stagemesh:<deployment>``)::

    P:workers                   set of worker ids
    P:worker:<id>               JSON WorkerInfo (no TTL)
    P:alive:<id>                "1", expires ttl_s after the last heartbeat
    P:topology                  JSON Topology (signed)
    P:journal:<rid>             hash: prompt (JSON list), params (JSON), chain, mac (signed: of
                                prompt and params)
    P:journal:<rid>:tokens      string: the emitted token ids, each followed by a comma; signed,
                                each appended chunk ends ``#<mac>;`` (its MAC binds its offset)
    P:chain:<c>:requests        set of request ids journaled on chain c
    P:metrics                   set of worker ids that have put metrics
    P:metrics:<id>              hash: figure name -> JSON value, expires with a TTL
    P:placement:<c>             JSON {"replicas": [{worker, address, experts, live}]} (signed)

(signed) values are ``hmac-sha256:<mac>\n<JSON>`` when the store has a signer; so is
``P:worker:<id>``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import AuthorizationError as RedisAuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stagemesh.errors import Internal, Unavailable
from stagemesh.mesh.signing import DocumentId, Forged, Refusals, RefusedDocument, Signer, split
from stagemesh.mesh.topology import Topology

ROLES = ("stage", "expert", "gateway")
_APPEND_ALL = """
local keys, pos, n = ARGV[1], 1, 0
local lengths = string.gmatch(ARGV[2], "(%d+),")
for value in string.gmatch(ARGV[3], "([^\\n]*)\\n") do
  local len = tonumber(lengths())
  redis.call('APPEND', string.sub(keys, pos, pos + len - 1), value)
  pos, n = pos + len, n + 1
end
return n
"""
"""Lua: APPEND each value to its key (``Store.journal_append_many``). ARGV[1]: the keys back to
back; ARGV[2]: each key's length in bytes followed by a comma; ARGV[3]: the values, each
followed by a newline (a value is digits, ``,``, ``#``, hex and ``;``: never a newline)."""
DEFAULT_METRICS_TTL_S = 30.0


def _key_of(prefix: str, *parts: object) -> str:
    """A deployment's Redis key: ``prefix:part:part...`` (``Store._key``)."""
    return ":".join((prefix, *map(str, parts)))


@functools.lru_cache(maxsize=16_384)
def _tokens_key(prefix: str, request_id: str) -> tuple[str, str]:
    """A request's journal tokens key and its length in UTF-8 bytes followed by a comma, as
    ``_APPEND_ALL`` takes them: worked out once per request, not at every flush."""
    key = _key_of(prefix, "journal", request_id, "tokens")
    return key, f"{len(key.encode())},"


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

    def to_doc(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "address": self.address, "experts": self.experts, "live": self.live}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ExpertReplica:
        experts = {int(layer): list(ids) for layer, ids in doc["experts"].items()}  # JSON keys are strings
        return cls(doc["worker"], doc["address"], experts, bool(doc["live"]))


def _translate_errors(method):
    """Turn redis exceptions into the project's own errors, naming the Redis URL."""

    @functools.wraps(method)
    async def wrapper(self: Store, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except (RedisAuthenticationError, RedisAuthorizationError) as err:
            raise Unavailable(f"Redis at {self.url} refused the password ({err}): give the mesh's Redis password in "
                              "the URL, redis://:PASSWORD@host:port/db (`stagemesh up` keeps its run's in the "
                              "secrets dir of its ready line, file redis-url)") from err
        except (RedisConnectionError, RedisTimeoutError) as err:
            raise Unavailable(f"Redis at {self.url} is unreachable ({err}); is redis-server running?") from err
        except RedisError as err:
            raise Internal(f"Redis at {self.url} failed in {method.__name__}: {err}") from err

    return wrapper


def redacted(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: what messages and logs may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class Store:
    """Typed access to one deployment's control state in Redis. Use ``await Store.connect(url)``."""

    def __init__(self, client: aioredis.Redis, url: str, deployment: str = "default", signer: Signer | None = None):
        if not deployment or ":" in deployment:
            raise ValueError(f"deployment={deployment!r}: must be non-empty and contain no ':'")
        self._r = client
        self.url = redacted(url)
        """Where it is, for messages: the URL without its password."""
        self.deployment = deployment
        self._prefix = f"stagemesh:{deployment}"
        self._signer = signer
        self.refusals = Refusals()
        """The documents this store refused (their signature missing or wrong), for status and metrics."""
        self._good: dict[str, Any] = {}
        """Redis key -> the last document read there that verified (the topology, placements)."""
        self._journaled: dict[str, int] = {}
        """Request id -> tokens this store appended to its journal entry (signed: each chunk's offset)."""

    @classmethod
    async def connect(
        cls, url: str, deployment: str = "default", *, timeout_s: float = 5.0, signer: Signer | None = None
    ) -> Store:
        """Connect to ``url`` (``redis://host:port/db``) and check it answers PING; ``signer``: sign and
        check the documents (``stagemesh.mesh.signing.load_signer``), None for unsigned ones."""
        client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        store = cls(client, url, deployment, signer)
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
        return _key_of(self._prefix, *parts)

    # --- signed documents -------------------------------------------------------------------

    @property
    def signed(self) -> bool:
        """Whether this store signs and checks its documents (it has the mesh key)."""
        return self._signer is not None

    def _seal(self, kind: str, name: object, body: str) -> str:
        """``body`` as written: signed when the store has a signer."""
        return body if self._signer is None else self._signer.seal(DocumentId(self.deployment, kind, str(name)), body)

    def _unseal(self, kind: str, name: object, key: str, text: str) -> str:
        """The body of the document read at ``key``; RefusedDocument (noted in ``refusals``) when it
        does not verify. Without a signer, any signature is stripped unchecked."""
        if self._signer is None:
            return split(text)[0]
        try:
            return self._signer.unseal(DocumentId(self.deployment, kind, str(name)), text)
        except Forged as err:
            raise self.refusals.refuse(kind, key, text, err) from None

    def _good_copy(self, key: str, err: RefusedDocument) -> Any:
        """The last document at ``key`` that verified, in place of a refused one; ``err`` when there is none."""
        if key not in self._good:
            raise err
        return self._good[key]

    # --- registry -------------------------------------------------------------------------

    @_translate_errors
    async def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        """Record ``info`` and mark the worker alive for ``ttl_s`` seconds."""
        async with self._r.pipeline() as pipe:
            pipe.set(self._key("worker", info.worker_id), self._seal("worker", info.worker_id, info.to_json()))
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
        workers = []
        for worker_id, text, a in zip(ids, infos, alive):
            if text is None:
                continue
            try:
                body = self._unseal("worker", worker_id, self._key("worker", worker_id), text)
            except RefusedDocument:
                continue  # logged and counted: a forged registration is no worker
            workers.append(WorkerInfo.from_json(body, bool(a)))
        return workers

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
        await self._r.set(self._key("topology"), self._seal("topology", "", topology.to_json()))

    @_translate_errors
    async def set_topology_if_absent(self, topology: Topology) -> bool:
        """Write ``topology`` unless one is there (Redis came back empty) that verifies (signed: a
        refused one is replaced); whether it wrote it."""
        if await self._r.set(self._key("topology"), self._seal("topology", "", topology.to_json()), nx=True):
            return True
        if self._signer is None or await self.has_topology():
            return False
        await self.set_topology(topology)
        return True

    @_translate_errors
    async def has_topology(self) -> bool:
        """Whether a topology is written (False: never written, Redis lost it, or signed: it is refused)."""
        if self._signer is None:
            return bool(await self._r.exists(self._key("topology")))
        key = self._key("topology")
        text = await self._r.get(key)
        try:
            return text is not None and bool(self._unseal("topology", "", key, text))
        except RefusedDocument:
            return False

    @_translate_errors
    async def get_topology(self) -> Topology | None:
        """The deployment's topology; None before one is written. ValueError when it is malformed;
        a refused one (signed) gives the last good copy, else RefusedDocument."""
        key = self._key("topology")
        text = await self._r.get(key)
        if text is None:
            return None
        try:
            body = self._unseal("topology", "", key, text)
        except RefusedDocument as err:
            return self._good_copy(key, err)
        topology = self._good[key] = Topology.from_json(body)
        return topology

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
                pipe.hset(self._key("journal", request_id), mapping=self._journal_meta(request_id, prompt_token_ids,
                                                                                      params, chain))
                pipe.sadd(self._key("chain", chain, "requests"), request_id)
            await pipe.execute()
        if self._signer is not None:
            self._journaled.update(dict.fromkeys(entries, 0))

    def _journal_meta(self, request_id: str, prompt_token_ids: list[int], params: dict[str, Any],
                      chain: int) -> dict[str, Any]:
        """The fields of a journal entry; signed: with the MAC of its prompt and parameters.

        NOTE: the chain is left out of the MAC: it only says which chain's set lists the request
        (``journal_move`` rewrites it), and a gateway takes over the requests of every chain."""
        meta = {"prompt": json.dumps(list(prompt_token_ids)), "params": json.dumps(params), "chain": chain}
        if self._signer is not None:
            meta["mac"] = self._signer.mac(self._journal_id(request_id), _journal_body(meta))
        return meta

    def _journal_id(self, request_id: str, offset: int | None = None) -> DocumentId:
        """A journal entry's prompt and parameters; with ``offset``, its tokens chunk from that index."""
        if offset is None:
            return DocumentId(self.deployment, "journal", request_id)
        return DocumentId(self.deployment, "journal-tokens", f"{request_id}@{offset}")

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
        the gateway's largest cost (py-spy). The script's keys and values also go as three
        arguments, not two per request: redis-py packs each argument in Python too (a flush of 128
        requests cost the gateway 0.85-1.06 ms of CPU so, 0.44-0.57 ms now; BENCHMARKS.md,
        "Session 15", ``scripts/journal_micro.py``). The keys
        are not declared in KEYS, which only Redis Cluster needs (one deployment's keys would
        need one hash slot there anyway). A request id may hold any character, so the keys are
        cut by their lengths, never at a separator. Each request's tokens are text, ``"101,102,"``."""
        items = [(*_tokens_key(self._prefix, rid), self._token_chunk(rid, ids))
                 for rid, ids in tokens_by_request.items() if ids]
        if items:
            keys, lengths, chunks = zip(*items)
            await self._r.eval(_APPEND_ALL, 0, "".join(keys), "".join(lengths), "\n".join(chunks) + "\n")
            if self._signer is not None:
                for rid, ids in tokens_by_request.items():
                    self._journaled[rid] = self._journaled.get(rid, 0) + len(ids)

    def _token_chunk(self, request_id: str, token_ids: list[int]) -> str:
        """Tokens as appended: ``"101,102,"``; signed, ``"101,102,#<mac>;"`` where the MAC binds the
        chunk's offset (the tokens this store appended before), so chunks cannot be reordered,
        dropped from the middle or moved to another request.

        NOTE: the offset is this store's count since it opened the entry (``journal_open_many``);
        an append that never reached Redis (a dropped batch) leaves Redis behind that count, and
        the entry is then refused on read, which failover already survives (the gateway's own
        record wins)."""
        csv = ",".join(map(str, token_ids)) + ","
        if self._signer is None:
            return csv
        return f"{csv}#{self._signer.mac(self._journal_id(request_id, self._journaled.get(request_id, 0)), csv)};"

    @_translate_errors
    async def journal_get(self, request_id: str) -> JournalEntry | None:
        """The request's entry, or None when it was never opened or is closed."""
        async with self._r.pipeline() as pipe:
            pipe.hgetall(self._key("journal", request_id))
            pipe.get(self._key("journal", request_id, "tokens"))
            meta, tokens = await pipe.execute()
        if not meta:
            return None
        try:
            self._check_journal(request_id, meta)
            token_ids = self._journal_tokens(request_id, tokens or "")
        except RefusedDocument:
            return None  # logged and counted: the gateway's own record, or the frontend's resubmission, wins
        return JournalEntry(
            request_id=request_id,
            prompt_token_ids=tuple(json.loads(meta["prompt"])),
            params=json.loads(meta["params"]),
            chain=int(meta["chain"]),
            token_ids=token_ids,
        )

    def _check_journal(self, request_id: str, meta: dict[str, str]) -> None:
        """RefusedDocument unless the entry's prompt and parameters verify (signed)."""
        if self._signer is not None:
            body = _journal_body(meta)
            try:
                self._signer.check(self._journal_id(request_id), body, meta.get("mac"))
            except Forged as err:
                raise self.refusals.refuse("journal", self._key("journal", request_id), body, err) from None

    def _journal_tokens(self, request_id: str, text: str) -> tuple[int, ...]:
        """The token ids of a tokens string; RefusedDocument when a chunk does not verify (signed)."""
        token_ids: list[int] = []
        for chunk in filter(None, text.split(";")):
            csv, _, mac = chunk.partition("#")
            if self._signer is not None:
                try:
                    self._signer.check(self._journal_id(request_id, len(token_ids)), csv, mac)
                except Forged as err:
                    raise self.refusals.refuse("journal", self._key("journal", request_id, "tokens"), text,
                                               err) from None
            token_ids.extend(int(t) for t in csv.split(",") if t)
        return tuple(token_ids)

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
        for request_id in request_ids:
            self._journaled.pop(request_id, None)

    @_translate_errors
    async def journal_by_chain(self, chain: int) -> list[str]:
        """Ids of the requests journaled on ``chain``, sorted."""
        return sorted(await self._r.smembers(self._key("chain", chain, "requests")))

    # --- placement ------------------------------------------------------------------------

    @_translate_errors
    async def set_placement(self, chain: int, replicas: list[ExpertReplica]) -> None:
        """Replace chain ``chain``'s expert placement, each replica with its liveness (one document,
        rewritten whole when a replica goes down or up: the gateway holds it all)."""
        body = json.dumps({"replicas": [r.to_doc() for r in sorted(replicas, key=lambda r: r.worker_id)]})
        await self._r.set(self._key("placement", chain), self._seal("placement", chain, body))

    @_translate_errors
    async def get_placement(self, chain: int) -> list[ExpertReplica]:
        """Chain ``chain``'s expert workers, sorted by id, with ``live``; empty when none is placed.
        A refused one (signed) gives the last good copy, else RefusedDocument."""
        key = self._key("placement", chain)
        text = await self._r.get(key)
        if text is None:
            return []
        try:
            body = self._unseal("placement", chain, key, text)
        except RefusedDocument as err:
            return list(self._good_copy(key, err))
        replicas = self._good[key] = [ExpertReplica.from_doc(r) for r in json.loads(body)["replicas"]]
        return list(replicas)

    @_translate_errors
    async def has_placement(self, chain: int) -> bool:
        """Whether chain ``chain`` has a placement that verifies (False: none, or signed: it is refused)."""
        key = self._key("placement", chain)
        text = await self._r.get(key)
        try:
            return text is not None and bool(self._unseal("placement", chain, key, text))
        except RefusedDocument:
            return False

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


def _journal_body(meta: dict[str, Any]) -> str:
    """What a journal entry's MAC covers: its prompt and parameters, as stored."""
    return f"{meta.get('prompt', '')}\n{meta.get('params', '')}"


def _ms(seconds: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses 0)."""
    if seconds <= 0:
        raise ValueError(f"ttl_s={seconds}: must be > 0")
    return max(1, round(seconds * 1000))
