"""Addresses and ports of the mesh's processes: which port is free, where a worker binds.

Standard library only, so the launcher and the CLI import it without gRPC.
"""

from __future__ import annotations

import socket

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


_HANDED_OUT: set[int] = set()
"""Ports ``free_port`` returned in this process."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not returned before by this
    process. NOTE: the kernel may hand out the same ephemeral port again as soon as it is
    closed, and a plan takes its workers' ports before any of them binds: a planned mesh got
    two workers on one port that way (1 in ~several hundred plans)."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free TCP port that this process has not handed out already")


def reserve(port: int) -> None:
    """Never return ``port`` from ``free_port`` in this process: a port chosen elsewhere (``up
    --port``, often picked by another process that closed it a moment ago) that a child will bind
    later. NOTE: the kernel handed such a client port to a worker the launcher planned; the worker and
    the frontends then shared it (SO_REUSEPORT) and the kernel sent every other client connection
    to the worker, whose mTLS port closed it."""
    _HANDED_OUT.add(port)


def port_of(address: str) -> int:
    """The port of ``host:port`` (``[v6]:port`` included)."""
    _, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return int(port)


def default_host(address: str) -> str:
    """Bind where the topology says peers reach us: loopback stays loopback, else every interface."""
    host = address.rpartition(":")[0].strip("[]")
    if host not in LOOPBACK_HOSTS:
        return "[::]"
    return f"[{host}]" if ":" in host else host


def bind_address(host: str | None, address: str) -> str:
    """Where a worker listens: ``host`` (its ``--host``) or ``default_host``, on its topology address's port."""
    return f"{host or default_host(address)}:{port_of(address)}"


def port_in_use(host: str, port: int) -> bool:
    """Whether a process listens on ``host:port``, even one that lets others share the port
    (SO_REUSEPORT, as gRPC servers do): a plain bind fails then."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False
