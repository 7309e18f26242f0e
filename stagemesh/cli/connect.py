"""How the client commands (`generate --addr`, `status`, `bench --addr`) reach a running mesh: the
API key they send and the TLS of its client port. Torch-free."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stagemesh.runtime.api_keys import ENV_KEY

if TYPE_CHECKING:
    from stagemesh.client import AsyncClient


@dataclass(frozen=True)
class Connect:
    """What every client of one command is opened with."""

    api_key: str | None = field(default=None, repr=False)
    """The key sent with every call; None: ``$STAGEMESH_API_KEY`` (the SDK's default)."""
    ca_file: Path | None = None
    """For a client port that serves TLS: the CA certificate (PEM) to trust."""
    tls: bool = False
    """TLS trusting the system's roots (without ``ca_file``)."""

    def client(self, addr: str, **kwargs) -> AsyncClient:
        """An ``AsyncClient`` of ``addr`` with this key and TLS (``kwargs``: its other arguments)."""
        from stagemesh.client import AsyncClient  # grpc only once a command talks to a mesh

        return AsyncClient(addr, api_key=self.api_key, ca_file=self.ca_file, tls=self.tls, **kwargs)


DEFAULT = Connect()
"""The key of ``$STAGEMESH_API_KEY`` (if any), plaintext."""


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """``--api-key``, ``--ca-file``, ``--tls``."""
    g = p.add_argument_group("reaching the mesh (API key, TLS)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"the key of a mesh started with API keys (default: ${ENV_KEY}, which `ps` does not show)")
    g.add_argument("--ca-file", type=Path, default=None,
                   help="the CA certificate (PEM) of a client port that serves TLS (`stagemesh up --tls-cert`)")
    g.add_argument("--tls", action="store_true", help="TLS to the client port, trusting the system's CAs")


def connect_from_args(args: argparse.Namespace) -> Connect:
    return Connect(api_key=args.api_key, ca_file=args.ca_file, tls=args.tls)
