"""The secrets of one `stagemesh up`: its certificates, its Redis password, and how its children get them.

``stagemesh up`` (unless ``--insecure``) makes a run directory (0700, ``stagemesh-run-*`` in the
temp dir, removed when it stops)::

    tls/         the mesh CA and one certificate per role (`stagemesh certs`), unless --tls-dir names some
    redis.conf   ``requirepass`` for the local redis-server (0600; never on its command line)
    redis-url    the URL with the password (0600): what a tool or test that reads Redis needs

and hands each child ``STAGEMESH_TLS_DIR`` and ``STAGEMESH_REDIS_URL`` in its environment, never on
its command line: every local user reads every process's argv (``ps``), while a process's
environment is its owner's. The ready line prints the run directory, never the password.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stagemesh.runtime.startup import REDIS_URL_ENV
from stagemesh.runtime.tls import TLS_DIR_ENV, MeshTLS

REDIS_URL_FILE = "redis-url"


@dataclass(frozen=True)
class RunSecrets:
    """Where one run's secrets are, and the launcher's own identity (``admin``) for its probes."""

    directory: Path
    """The run directory (0700), removed by ``remove``."""
    tls_dir: Path
    """The certificates the children use: ``directory / "tls"``, or the ``--tls-dir`` given."""
    tls: MeshTLS
    """The launcher's identity (role ``admin``): its health probes and topology writes."""
    redis_password: str
    """For a Redis the launcher starts itself."""

    @classmethod
    def create(cls, tls_dir: Path | None = None) -> RunSecrets:
        """A new run directory; certificates made for the run unless ``tls_dir`` names some.
        ValueError when ``tls_dir`` lacks what the launcher needs (its ``admin`` certificate)."""
        directory = Path(tempfile.mkdtemp(prefix="stagemesh-run-"))  # mkdtemp: 0700
        try:
            if tls_dir is None:
                from stagemesh.deploy.certs import make_secrets  # cryptography: only when certificates are made

                tls_dir = directory / "tls"
                make_secrets(tls_dir, redis=False)
            tls = MeshTLS.load(tls_dir, "admin")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory, Path(tls_dir).resolve(), tls, secrets.token_urlsafe(32))

    def write_redis_url(self, url: str) -> Path:
        """``redis-url`` (0600): the URL with the password, for whoever reads this run's Redis."""
        path = self.directory / REDIS_URL_FILE
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(url + "\n")
        return path

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def child_env(redis_url: str | None, run: RunSecrets | None) -> dict[str, str]:
    """A child's environment: this one's, with the Redis URL and (unless insecure) the certificates."""
    env = dict(os.environ)
    if redis_url is not None:
        env[REDIS_URL_ENV] = redis_url
    env.pop(TLS_DIR_ENV, None)  # an --insecure mesh must not pick up certificates from the caller's environment
    if run is not None:
        env[TLS_DIR_ENV] = str(run.tls_dir)
    return env
