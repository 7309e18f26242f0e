"""The API keys a mesh's client-facing ports accept, and the one check of a presented key.

Keys come from ``--api-key KEY`` (repeatable), ``--api-key-file FILE`` (one key a line, ``#``
comments and blank lines skipped) and the environment variable ``STAGEMESH_API_KEYS``
(comma-separated); all of them count. Checking is on when any key is given, as with
``vllm serve --api-key``; with none, every caller is let in.

NOTE: ``accepts`` compares SHA-256 digests with ``hmac.compare_digest`` against every key, without
stopping at the first match, so neither a key's length nor which key matched shows in the time
a refusal takes.

Standard library only: the launcher, `stagemesh compose` and the frontends all read keys here.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ENV_KEYS = "STAGEMESH_API_KEYS"
"""Server side: the keys a frontend (or `stagemesh up`) accepts, comma-separated."""
ENV_KEY = "STAGEMESH_API_KEY"
"""Client side: the one key the SDK and the CLI send when none is passed."""
KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
"""What a key may hold: printable ASCII without spaces, so it travels unchanged in a gRPC
metadata value and an HTTP header (``Bearer KEY``)."""


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys; empty: no check (every caller is let in)."""

    keys: tuple[str, ...] = field(default=(), repr=False)
    """The keys themselves (never shown in a repr or a log)."""

    def __post_init__(self) -> None:
        for n, key in enumerate(self.keys, 1):
            check_key(key, f"API key #{n}")
        digests = tuple(_digest(k) for k in dict.fromkeys(self.keys))
        object.__setattr__(self, "_digests", digests)

    @property
    def enabled(self) -> bool:
        """Whether callers must present a key."""
        return bool(self.keys)

    def accepts(self, presented: str | None) -> bool:
        """Whether ``presented`` is one of the keys (constant time, module NOTE); always True when off."""
        if not self.enabled:
            return True
        if not presented:
            return False
        candidate, found = _digest(presented), False
        for digest in self._digests:
            found |= hmac.compare_digest(candidate, digest)
        return found

    @classmethod
    def gather(cls, keys: Iterable[str] = (), files: Iterable[str | Path] = (),
               env: Mapping[str, str] | None = None) -> ApiKeys:
        """The keys of ``keys``, of each file in ``files`` and of ``STAGEMESH_API_KEYS`` in ``env``
        (``os.environ`` when None); ValueError naming a file that cannot be read or holds no key."""
        env = os.environ if env is None else env
        found = [*keys]
        for path in files:
            found += read_key_file(path)
        found += [k.strip() for k in env.get(ENV_KEYS, "").split(",") if k.strip()]
        return cls(tuple(found))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ApiKeys:
        """The keys of ``add_arguments``'s flags and of the environment."""
        return cls.gather(args.api_key or (), args.api_key_file or ())

    def to_file(self, path: Path) -> Path:
        """Write the keys to ``path``, readable by this user alone (0600); a reader's ``--api-key-file``."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
            f.write("".join(f"{k}\n" for k in self.keys))
        return path


NO_KEYS = ApiKeys()
"""No check: every caller is let in (the default)."""


def check_key(key: str, what: str) -> None:
    """ValueError when ``key`` is empty or holds a character a header cannot carry (the key itself is not shown)."""
    if not key:
        raise ValueError(f"{what} is empty")
    bad = sorted({c for c in key if c not in KEY_CHARS})
    if bad:
        raise ValueError(f"{what} holds {', '.join(repr(c) for c in bad)}: a key is printable ASCII without "
                         "spaces, so that it can travel in an HTTP header and in gRPC metadata")


def read_key_file(path: str | Path) -> list[str]:
    """The keys of a key file: one a line, blank lines and ``#`` comments skipped; ValueError when
    it cannot be read or holds no key (a file meant to turn checking on must not turn it off)."""
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read the API key file {path}: {err}") from None
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            check_key(line, f"{path} line {n}")
            keys.append(line)
    if not keys:
        raise ValueError(f"the API key file {path} holds no key (one key a line; # starts a comment)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the API key file %s can be read by other users (mode %o): chmod 600 it", path, mode & 0o777)
    return keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--api-key`` and ``--api-key-file``: the server side's flags (`stagemesh up`, ``python -m frontend``)."""
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="a key clients must present (repeatable); with any key given, calls without a valid one "
                        f"get UNAUTHENTICATED / 401. NOTE: visible in `ps`; prefer --api-key-file or {ENV_KEYS}")
    p.add_argument("--api-key-file", action="append", default=None, metavar="FILE",
                   help=f"a file of accepted keys, one a line, # comments (repeatable); {ENV_KEYS} "
                        "(comma-separated) adds more")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
