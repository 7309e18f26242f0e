"""Two "hosts" on this machine: two Linux network namespaces joined by a veth link.

``HostPair`` creates them (names with a random suffix, so parallel runs never meet), gives host A
10.77.0.1/24 and host B 10.77.0.2/24 on the two ends of one veth pair (and each its own
loopback), runs processes inside one of them (``ip netns exec``), takes host B's end of the link
down and up, and deletes both namespaces on the way out, whatever happened. Nothing in them can
reach this machine's own network, and nothing outside reaches them: the traffic of a test stays
inside the namespaces it creates.

Needs root and iproute2's ``ip netns``; ``why_not()`` says why a machine cannot, for a skip.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from typing import Self

SUBNET_BITS = 24


@dataclass(frozen=True)
class Host:
    """One namespace: its name, its address on the link and its end of the veth pair."""

    ns: str
    ip: str
    veth: str

    def argv(self, *command: str) -> list[str]:
        """``command`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *command]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def why_not() -> str | None:
    """Why network namespaces cannot be made here (a skip's reason), or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` to create network namespaces"
    probe = f"smprobe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: `ip netns add` said {made.stderr.strip()!r}"
    _ip("netns", "del", probe, check=False)
    return None


class HostPair:
    """Hosts A and B (``with HostPair() as pair``): two namespaces and the veth link between them."""

    def __init__(self, prefix: str = "10.77.0"):
        suffix = secrets.token_hex(3)
        self.a = Host(f"smA-{suffix}", f"{prefix}.1", f"smva{suffix}")
        self.b = Host(f"smB-{suffix}", f"{prefix}.2", f"smvb{suffix}")

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def _create(self) -> None:
        for host in (self.a, self.b):
            _ip("netns", "add", host.ns)
        _ip("link", "add", self.a.veth, "type", "veth", "peer", "name", self.b.veth)
        for host in (self.a, self.b):
            _ip("link", "set", host.veth, "netns", host.ns)
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/{SUBNET_BITS}", "dev", host.veth)
            _ip("-n", host.ns, "link", "set", host.veth, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")

    def link_argv(self, up: bool) -> list[str]:
        """The command that takes host B's end of the link down (or up): run it from anywhere as root."""
        return ["ip", "-n", self.b.ns, "link", "set", self.b.veth, "up" if up else "down"]

    def set_link(self, up: bool) -> None:
        subprocess.run(self.link_argv(up), check=True, capture_output=True, timeout=10)

    def link_bytes(self, host: Host) -> dict[str, int]:
        """Bytes sent and received on ``host``'s end of the link (IP packets, headers included)."""
        out = _ip("-n", host.ns, "-s", "-j", "link", "show", host.veth).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"tx": stats["tx"]["bytes"], "rx": stats["rx"]["bytes"]}

    def delete(self) -> None:
        """Both namespaces (their processes' sockets and the veth pair go with them); quiet when gone."""
        for host in (self.a, self.b):
            _ip("netns", "del", host.ns, check=False)
