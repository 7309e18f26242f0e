"""The secrets of a compose deployment: the mesh's certificates, its HMAC key and the Redis password
(from `stagemesh certs DIR` on the compose host), as compose ``secrets:`` — files mounted under
``/run/secrets`` in the services that need them, never in the compose file, an environment value
or a command line.

Each mesh service gets the CA, its own role's key and certificate and ``mesh.key`` in
``/run/secrets/stagemesh-tls`` (its ``--tls-dir``), and the Redis password as a file
(``--redis-password-file``); its health check presents its own certificate. Redis reads
``requirepass`` from ``redis.conf`` on its standard input (opened by the image's root shell, so
the password file may stay unreadable to the ``redis`` user and never reaches an argv).

NOTE: compose mounts file secrets as they are on the host (``uid``/``gid``/``mode`` are Swarm's):
the image runs as uid 10001, so the secrets directory's files must be readable by it —
``sudo chown -R 10001 DIR`` on each host (README.md, Security).
"""

from __future__ import annotations

from typing import Any

from stagemesh.deploy.certs import MESH_KEY_FILE, REDIS_CONF_FILE, REDIS_PASSWORD_FILE

TLS_TARGET = "/run/secrets/stagemesh-tls"
"""Every mesh service's ``--tls-dir`` inside its container."""
PASSWORD_TARGET = f"/run/secrets/{REDIS_PASSWORD_FILE}"
REDIS_CONF_TARGET = f"/run/secrets/{REDIS_CONF_FILE}"
DEFAULT_DIR = "./secrets"
"""Where `stagemesh compose` expects `stagemesh certs DIR`'s output (relative: to the compose file)."""


def _files(role: str | None) -> dict[str, tuple[str, str]]:
    """secret name -> (file in the secrets dir, target in the container) that a service of ``role`` mounts."""
    files = {"redis_password": (REDIS_PASSWORD_FILE, PASSWORD_TARGET),
             "mesh_key": (MESH_KEY_FILE, f"{TLS_TARGET}/{MESH_KEY_FILE}")}
    if role is not None:
        files |= {"mesh_ca": ("ca.pem", f"{TLS_TARGET}/ca.pem"),
                  f"mesh_{role}_cert": (f"{role}.pem", f"{TLS_TARGET}/{role}.pem"),
                  f"mesh_{role}_key": (f"{role}.key", f"{TLS_TARGET}/{role}.key")}
    return files


def secure(service: dict[str, Any], role: str | None, *, probe: bool = True) -> dict[str, Any]:
    """``service`` (a mesh process: ``python -m ... --redis-url URL ...`` or the planner) with its
    secrets mounted and the flags that read them after ``--redis-url URL``. ``role``: whose
    certificate it holds (None: the planner, which needs only Redis and ``mesh.key``); ``probe``: its
    health check reaches a mesh port (a worker's, the gateway's), so it presents that certificate."""
    command = list(service["command"])
    at = command.index("--redis-url") + 2
    flags = ["--redis-password-file", PASSWORD_TARGET, "--tls-dir", TLS_TARGET]
    out = {**service, "command": command[:at] + flags + command[at:]}
    out["secrets"] = [*service.get("secrets", ()), *({"source": name, "target": target}
                                                    for name, (_, target) in _files(role).items())]
    health = service.get("healthcheck", {}).get("test")
    if role and probe and health and health[:3] == ["CMD", "stagemesh", "health"]:
        out["healthcheck"] = {**service["healthcheck"], "test": [*health, "--tls-dir", TLS_TARGET, "--tls-role", role]}
    return out


def secure_redis(service: dict[str, Any]) -> dict[str, Any]:
    """Redis asking for the password: ``requirepass`` from ``redis.conf`` on stdin; the health check
    gives it through ``REDISCLI_AUTH`` (an environment variable of the check's shell, not an argv)."""
    command = " ".join(service["command"]).replace("redis-server", "redis-server -", 1)
    return {
        **service,
        "command": ["sh", "-c", f"exec docker-entrypoint.sh {command} < {REDIS_CONF_TARGET}"],
        "secrets": [{"source": "redis_conf", "target": REDIS_CONF_TARGET},
                    {"source": "redis_password", "target": PASSWORD_TARGET}],
        "healthcheck": {**service["healthcheck"], "test": [
            "CMD-SHELL", f'REDISCLI_AUTH="$$(cat {PASSWORD_TARGET})" redis-cli ping | grep -q PONG']},
    }


def top_level(services: dict[str, Any], secrets_dir: str) -> dict[str, Any]:
    """The file of every secret the services mount (api keys and the like are the caller's)."""
    files = {"redis_conf": REDIS_CONF_FILE}
    for role in ("gateway", "frontend", "stage", "expert", None):
        files |= {name: file for name, (file, _) in _files(role).items()}
    used = {s["source"] if isinstance(s, dict) else s for service in services.values()
            for s in service.get("secrets", ())}
    return {name: {"file": f"{secrets_dir.rstrip('/')}/{files[name]}"} for name in sorted(used) if name in files}
