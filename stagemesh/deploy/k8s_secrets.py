"""The secrets of a Kubernetes deployment: the mesh's certificates, its HMAC key, the Redis password
and the API keys, as Secrets that kustomize makes from files (``secretGenerator`` in
``kustomization.yaml``) — so no secret value is ever in a rendered manifest.

The files come from `stagemesh certs DIR` (DIR inside the kustomization's folder: kustomize reads
no file outside it). Each role gets a Secret of its own (``stagemesh-tls-<role>``: the CA, its key
and certificate, ``mesh.key``), mounted as its ``--tls-dir``; ``stagemesh-redis`` holds the
password (mesh pods mount only that key) and ``redis.conf`` (Redis's ``requirepass``). kustomize
adds a hash of the contents to each name and rewrites the pods' references, so new certificates
roll the pods that use them.

NOTE: a Secret volume's files are root's; the pods run as uid 10001 with ``fsGroup`` 10001, so
the files are mounted 0440 (group-readable by the pod's group, nobody else's).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from stagemesh.deploy.certs import MESH_KEY_FILE, REDIS_CONF_FILE, REDIS_PASSWORD_FILE
from stagemesh.deploy.compose_plan import K8S_PREFIX
from stagemesh.deploy.compose_secrets import TLS_TARGET

ROLES = ("gateway", "frontend", "stage", "expert")
"""The roles whose pods hold a certificate (the planner runs in the gateway's pod, with its Secret)."""
REDIS_SECRET = f"{K8S_PREFIX}redis"
API_KEYS_SECRET = f"{K8S_PREFIX}api-keys"
API_KEYS_FILE = "api-keys"
REDIS_DIR = "/run/secrets/redis"
"""Where a pod sees ``stagemesh-redis``'s files."""
PASSWORD_TARGET = f"{REDIS_DIR}/{REDIS_PASSWORD_FILE}"
API_KEYS_DIR = "/run/secrets/api-keys"
FILE_MODE = 0o440


def tls_secret(role: str) -> str:
    return f"{K8S_PREFIX}tls-{role}"


def secret_generator(secrets_dir: str, api_key_file: str | None) -> list[dict[str, Any]]:
    """The ``secretGenerator`` entries: one Secret per role, Redis's, and (with ``api_key_file``) the API keys'.
    Paths are relative to the kustomization's folder."""
    def path(name: str) -> str:
        return str(PurePosixPath(secrets_dir) / name)

    generated = [
        {"name": tls_secret(role), "type": "Opaque",
         "files": [f"{name}={path(name)}" for name in ("ca.pem", f"{role}.pem", f"{role}.key", MESH_KEY_FILE)]}
        for role in ROLES
    ]
    generated.append({"name": REDIS_SECRET, "type": "Opaque",
                      "files": [f"{name}={path(name)}" for name in (REDIS_PASSWORD_FILE, REDIS_CONF_FILE)]})
    if api_key_file:
        generated.append({"name": API_KEYS_SECRET, "type": "Opaque", "files": [f"{API_KEYS_FILE}={api_key_file}"]})
    return generated


def inside(path: str, what: str) -> str:
    """``path`` checked to be relative and inside the kustomization's folder (kustomize loads nothing else)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"{what} {path!r} must be a relative path inside --out (kustomize reads no file outside "
                         f"its folder): put the files there, e.g. `stagemesh certs OUT/secrets`")
    return str(pure)


# --- what a pod mounts ---------------------------------------------------------------------


def mesh_volumes(role: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of a mesh pod of ``role``: its ``--tls-dir`` and the Redis password."""
    volumes = [
        {"name": "tls", "secret": {"secretName": tls_secret(role), "defaultMode": FILE_MODE}},
        {"name": "redis-password", "secret": {"secretName": REDIS_SECRET, "defaultMode": FILE_MODE,
                                              "items": [{"key": REDIS_PASSWORD_FILE, "path": REDIS_PASSWORD_FILE}]}},
    ]
    mounts = [{"name": "tls", "mountPath": TLS_TARGET, "readOnly": True},
              {"name": "redis-password", "mountPath": REDIS_DIR, "readOnly": True}]
    return volumes, mounts


def mesh_flags(command: list[str]) -> list[str]:
    """``command`` (``... --redis-url URL ...``) reading the password and the certificates from their mounts."""
    at = command.index("--redis-url") + 2
    return [*command[:at], "--redis-password-file", PASSWORD_TARGET, "--tls-dir", TLS_TARGET, *command[at:]]


def probe_flags(role: str) -> list[str]:
    """What `stagemesh health` adds to present ``role``'s certificate."""
    return ["--tls-dir", TLS_TARGET, "--tls-role", role]


def redis_volume() -> dict[str, Any]:
    return {"name": "redis-secret", "secret": {"secretName": REDIS_SECRET, "defaultMode": FILE_MODE}}


def api_keys_volume() -> tuple[dict[str, Any], dict[str, Any], str]:
    """(volume, mount, the ``--api-key-file`` path) of the frontends' API keys."""
    return ({"name": "api-keys", "secret": {"secretName": API_KEYS_SECRET, "defaultMode": FILE_MODE}},
            {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}, f"{API_KEYS_DIR}/{API_KEYS_FILE}")
