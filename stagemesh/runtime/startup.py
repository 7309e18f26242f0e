"""What every worker process does before it can serve: reach Redis, then find its place in
the topology the launcher (or compose's planner) wrote there.

NOTE: both steps wait, until one deadline (``wait_s`` after the start), for a Redis that is down
or restarting: one that refuses connections, dies between the two steps, or comes back empty
(no topology until the launcher or the gateway's ``StoreKeeper`` writes it again). So a worker
restarted while Redis is down starts once Redis is back. The limit is the worker's
``--topology-wait-s``: `stagemesh up` passes ``launch.REDIS_WAIT_S`` (60 s); past it the worker
exits with a StartupError, and the launcher restarts it with its growing backoff, at most
``RestartPolicy.max_quick_deaths`` times in a row.

A topology whose signature is missing or wrong (``stagemesh.mesh.signing``; the store was given
the mesh key) is refused like one not written yet, until the deadline; then the worker exits
saying which key was refused and why.

Torch-free; shared by the stage and expert workers and the frontends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Awaitable, Callable, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from stagemesh.errors import StagemeshError, Unavailable
from stagemesh.mesh.signing import RefusedDocument, Signer, load_signer
from stagemesh.mesh.store import Store
from stagemesh.mesh.topology import Topology
from stagemesh.runtime.tls import MeshTLS, tls_from_args

Place = TypeVar("Place")

REDIS_URL_ENV = "STAGEMESH_REDIS_URL"
"""The environment's ``--redis-url``: how `stagemesh up` hands its children a URL that carries the
Redis password (the environment of a process is its owner's to read; its argv is everybody's)."""
REDIS_PASSWORD_FILE_ENV = "STAGEMESH_REDIS_PASSWORD_FILE"
"""The environment's ``--redis-password-file`` (compose mounts the password as a secret file)."""


class StartupError(Exception):
    """The worker cannot start; the message says what to fix."""


def env_choice(env: str, choices: tuple[str, ...]) -> str:
    """The one of ``choices`` the environment variable ``env`` names (case and spaces ignored;
    unset or empty: the first); a StartupError naming the choices for anything else."""
    choice = os.environ.get(env, "").strip().lower() or choices[0]
    if choice not in choices:
        raise StartupError(f"{env}={choice!r}: expected one of {', '.join(choices)}")
    return choice


async def connect_store(url: str, deployment: str, deadline: float, signer: Signer | None = None) -> Store:
    """The store, retried until ``deadline`` (time.monotonic) while Redis comes up."""
    while True:
        try:
            return await Store.connect(url, deployment, signer=signer)
        except StagemeshError as err:
            if time.monotonic() > deadline:
                raise StartupError(str(err)) from err
            await asyncio.sleep(0.5)


async def find_place(
    store: Store, deployment: str, wait_s: float, deadline: float, find: Callable[[Topology], Place]
) -> Place:
    """``find(topology)`` once the topology is in Redis; StartupError when it never comes (or
    Redis stays unreachable) until ``deadline``, is malformed or has no such place."""
    try:
        while (topology := await _topology(store, deadline)) is None:
            if time.monotonic() > deadline:
                raise StartupError(
                    f"no topology in Redis at {store.url} (deployment {deployment!r}) after "
                    f"{wait_s:.0f} s; `stagemesh up` writes it (Store.set_topology)"
                )
            await asyncio.sleep(0.2)
        return find(topology)
    except ValueError as err:
        raise StartupError(f"the topology in Redis at {store.url}: {err}") from err


async def _topology(store: Store, deadline: float) -> Topology | None:
    """The topology; None while there is none, Redis is unreachable or the topology is refused
    (until ``deadline``)."""
    try:
        return await store.get_topology()
    except (Unavailable, RefusedDocument) as err:
        if time.monotonic() > deadline:
            raise StartupError(err.message) from err
        return None


async def start_worker(
    url: str,
    deployment: str,
    wait_s: float,
    find: Callable[[Topology], Place],
    serve: Callable[[Place, Store], Awaitable[int]],
    signer: Signer | None = None,
) -> int:
    """Reach Redis and this worker's place (both within ``wait_s``), then ``serve(place, store)``;
    its exit code. The store is closed after. ``signer``: the mesh key's (signed documents), None
    under ``--insecure``."""
    deadline = time.monotonic() + wait_s
    store = await connect_store(url, deployment, deadline, signer)
    try:
        return await serve(await find_place(store, deployment, wait_s, deadline, find), store)
    finally:
        await store.close()


def add_redis_args(p: argparse.ArgumentParser) -> None:
    """``--redis-url`` (default ``$STAGEMESH_REDIS_URL``; required without it) and ``--redis-password-file``."""
    env = os.environ.get(REDIS_URL_ENV) or None
    p.add_argument("--redis-url", default=env, required=env is None,
                   help=f"Redis holding the topology, e.g. redis://127.0.0.1:6379/0 (default: ${REDIS_URL_ENV}; "
                        "a URL with a password, redis://:PASSWORD@host:port/0, belongs there, not on the command line)")
    p.add_argument("--redis-password-file", type=Path, default=os.environ.get(REDIS_PASSWORD_FILE_ENV) or None,
                   help=f"the Redis password, read from this file into --redis-url (default: ${REDIS_PASSWORD_FILE_ENV})")


def redis_url_from_args(args: argparse.Namespace) -> str:
    """``--redis-url`` with the password of ``--redis-password-file`` in it (when given)."""
    if args.redis_password_file is None:
        return args.redis_url
    try:
        password = args.redis_password_file.read_text().strip()
    except OSError as err:
        raise StartupError(f"--redis-password-file {args.redis_password_file}: {err.strerror}") from None
    return with_password(args.redis_url, password)


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (replacing any it had); the user name, host, port and db kept."""
    parts = urlsplit(url)
    user = quote(parts.username or "", safe="")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def signer_from_args(args: argparse.Namespace) -> Signer | None:
    """The signer of the mesh key in ``--tls-dir`` (``<dir>/mesh.key``): the process signs and
    checks the documents it shares in Redis; None without a tls dir (``--insecure``). StartupError
    saying what is missing."""
    try:
        return load_signer(args.tls_dir)
    except ValueError as err:
        raise StartupError(str(err)) from None


def mesh_args(args: argparse.Namespace, role: str) -> tuple[str, MeshTLS | None]:
    """The Redis URL (``add_redis_args``) and the mesh identity of ``role`` (``tls.add_tls_args``) a
    process's flags give; StartupError saying what is missing."""
    try:
        return redis_url_from_args(args), tls_from_args(args, role)
    except ValueError as err:
        raise StartupError(str(err)) from None
