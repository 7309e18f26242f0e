"""Signed control documents: nothing in the mesh acts on a Redis value it cannot check.

Whoever can write to Redis could otherwise steer the mesh: a forged topology sends a restarted
worker's activations to an address of the writer's choosing, a forged expert placement sends a
stage's rows to the wrong worker, a forged journal entry makes a restarted gateway generate
what nobody asked for. So every document a process *acts on* carries an HMAC-SHA256 under the
mesh key, and a reader refuses one whose MAC is missing or wrong (``Store`` does the reading;
this module knows no Redis).

NOTE: what the MAC covers. ``DocumentId`` = (deployment, kind, name), e.g. ``("prod",
"placement", "0")``, is bound into the MAC with the body, so a genuine document cannot be
replayed under another deployment, as another kind, or in another slot (chain 1's placement as
chain 0's, one worker's registration as another's, one request's journal as another's). A
replay of an *older* genuine document into its own slot is not caught by the MAC; the documents
signed here change rarely (topology, placement, registration), and the gateway's store keeper
writes its own copies back when it finds others (``gateway.keeper``).

The key: 32 random bytes, hex, in ``<tls dir>/mesh.key`` (``stagemesh certs DIR`` writes it with
the certificates, ``stagemesh.deploy.certs``). Without a key (``--insecure``) documents are written and
read unsigned, as before signing existed; such a reader strips the signature of a signed one it
meets (it cannot check it, and trusts Redis anyway).

The signed form is ``hmac-sha256:<64 hex>\\n<body>``: the body stays readable in ``redis-cli``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from stagemesh.errors import Internal

log = logging.getLogger(__name__)

KEY_FILE = "mesh.key"
"""The mesh key's file name inside the tls dir."""
KEY_BYTES = 32
PREFIX = "hmac-sha256:"
KINDS = ("topology", "placement", "worker", "journal")
"""The kinds of signed documents, as refusals are counted (a journal's tokens count as ``journal``)."""
MAX_REMEMBERED = 10_000
"""Refused keys remembered so that one read again is not counted again."""
_DOMAIN = b"stagemesh-doc-v1"
"""Bound into every MAC, so a MAC of this scheme is never valid for any other use of the key."""


@dataclass(frozen=True)
class DocumentId:
    """Which document a body is: bound into its MAC with the body."""

    deployment: str
    """The mesh's name (its Redis key prefix)."""
    kind: str
    """``topology``, ``placement``, ``worker``, ``journal``, ``journal-tokens``."""
    name: str = ""
    """The slot within the kind: a chain, a worker id, a request id ("" when there is one)."""

    def message(self, body: str) -> bytes:
        """What the MAC covers: every field, NUL-separated (none of the ids holds a NUL), body last."""
        return b"\0".join((_DOMAIN, *(s.encode() for s in (self.deployment, self.kind, self.name, body))))


class Forged(ValueError):
    """A document whose MAC is missing or wrong; the message says which."""


class Signer:
    """Signs and checks documents under the mesh key (HMAC-SHA256)."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"the mesh key has {len(key)} bytes: must be {KEY_BYTES} (64 hex digits)")
        self._key = key

    def mac(self, doc: DocumentId, body: str) -> str:
        """The hex MAC of ``body`` as the document ``doc``."""
        return hmac.new(self._key, doc.message(body), hashlib.sha256).hexdigest()

    def check(self, doc: DocumentId, body: str, mac: str | None) -> None:
        """Forged unless ``mac`` is ``body``'s MAC as ``doc``."""
        if not mac:
            raise Forged("it is not signed (written by a process without the mesh key, or forged)")
        if not hmac.compare_digest(mac, self.mac(doc, body)):
            raise Forged("its signature does not match (forged, altered, or signed with another mesh key)")

    def seal(self, doc: DocumentId, body: str) -> str:
        """``body`` in its signed form."""
        return f"{PREFIX}{self.mac(doc, body)}\n{body}"

    def unseal(self, doc: DocumentId, text: str) -> str:
        """The body of a signed form; Forged when it is unsigned or does not verify as ``doc``."""
        body, mac = split(text)
        self.check(doc, body, mac)
        return body


def split(text: str) -> tuple[str, str | None]:
    """``(body, mac)`` of a signed form; ``(text, None)`` of an unsigned one."""
    if not text.startswith(PREFIX):
        return text, None
    mac, _, body = text[len(PREFIX):].partition("\n")
    return body, mac


def load_signer(tls_dir: str | os.PathLike | None) -> Signer | None:
    """The signer of the key in ``<tls_dir>/mesh.key``; None without a tls dir (``--insecure``).

    ValueError, saying what to do, when the tls dir has no readable key or a malformed one."""
    if tls_dir is None or str(tls_dir) == "":
        return None
    path = Path(tls_dir) / KEY_FILE
    try:
        text = path.read_text().strip()
    except OSError as err:
        raise ValueError(f"cannot read the mesh key {path} ({err.strerror}); "
                         f"`stagemesh certs {tls_dir}` writes it") from None
    try:
        return Signer(bytes.fromhex(text))
    except ValueError as err:
        raise ValueError(f"the mesh key {path} is malformed ({err}): it must hold {KEY_BYTES * 2} hex digits; "
                         f"`stagemesh certs {tls_dir}` writes one") from None


class RefusedDocument(Internal):
    """A document in Redis was refused: its signature is missing or wrong. The message names its
    Redis key and what was wrong; the reader keeps the last good copy it has, if any."""

    def __init__(self, kind: str, key: str, why: str):
        super().__init__(f"refused the {kind} at Redis key {key!r}: {why}")
        self.kind, self.key, self.why = kind, key, why


@dataclass(frozen=True)
class Refusal:
    """One forged document as a reader met it."""

    kind: str
    key: str
    why: str
    at: float
    """Unix time it was first met."""

    def to_json(self) -> dict:
        return {"kind": self.kind, "key": self.key, "why": self.why, "at": self.at}


class Refusals:
    """The documents one process refused: counted once each (however often it is read again),
    logged as an error when first met, and reported (``gateway.status``, ``gateway.metrics``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        """kind -> distinct documents refused."""
        self.last: Refusal | None = None
        self._seen: dict[str, str] = {}
        """Redis key -> digest of the last refused text there (a document read again is not counted again)."""

    def refuse(self, kind: str, key: str, text: str, err: Forged) -> RefusedDocument:
        """Note one refused document (``text`` as read at ``key``); the error to raise."""
        refused = RefusedDocument(kind, key, str(err))
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self._seen.get(key) != digest:
            if len(self._seen) >= MAX_REMEMBERED:
                self._seen.clear()  # a flood of forged keys costs recounting, never unbounded memory
            self._seen[key] = digest
            self.counts[kind] += 1
            self.last = Refusal(kind, key, str(err), time.time())
            log.error("%s; it is ignored", refused.message)
        return refused

    def to_json(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "total": sum(self.counts.values()),
                "last": None if self.last is None else self.last.to_json()}
