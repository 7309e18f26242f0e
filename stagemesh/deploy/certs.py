"""`stagemesh certs DIR`: the mesh's secrets — a CA, one key and certificate per role, the HMAC key
of the Redis documents and the Redis password — in one directory that only its owner can read.

What lands in DIR (0700; every key and password 0600, certificates 0644)::

    ca.pem  ca.key                  the mesh CA (its key stays, so more certificates can be issued)
    gateway.pem  gateway.key        one per role of ``stagemesh.runtime.tls.ROLES``:
    frontend.* stage.* expert.*     subject CN = the holder's name, OU = its role;
    admin.pem  admin.key            SAN DNS ``stagemesh-mesh`` (``tls.MESH_SERVER_NAME``)
    mesh.key                        32 random bytes, hex: the key that signs the Redis documents
    redis-password                  a random password, and the same as a redis.conf line
    redis.conf                      (``requirepass ...``) for a Redis that compose starts

NOTE: every certificate names the same DNS SAN, whatever address its holder listens on, and every
client dials with ``grpc.ssl_target_name_override`` set to it: the addresses of a mesh (loopback,
compose service names, host names, ports picked at start) are not known when the certificates
are made, and what a peer proves is "signed by this mesh's CA, for this role", not its address.
Keys are ECDSA P-256: a handshake costs a fraction of an RSA one, and ``stagemesh up`` makes a
fresh set at every start.
"""

from __future__ import annotations

import datetime
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stagemesh.deploy.redis_server import requirepass_line
from stagemesh.runtime.tls import MESH_SERVER_NAME, ORGANIZATION, ROLES

DAYS = 365
"""How long the certificates of `stagemesh certs` are valid (``--days``)."""
MESH_KEY_FILE = "mesh.key"
REDIS_PASSWORD_FILE = "redis-password"
REDIS_CONF_FILE = "redis.conf"


def make_secrets(directory: Path, *, force: bool = False, days: int = DAYS, redis: bool = True) -> list[Path]:
    """Create ``directory`` (0700) with the CA, every role's certificate, ``mesh.key`` and (with
    ``redis``) the Redis password; the files written. ValueError when it exists and is not empty,
    unless ``force``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ValueError(f"{directory} is not empty: give --force to replace the secrets in it "
                         "(every process of the mesh then needs the new ones)")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, days)
    written = [_write(directory / "ca.pem", _pem(ca_cert), 0o644), _write(directory / "ca.key", _key_pem(ca_key))]
    for role in ROLES:
        written += issue(directory, role, role, days=days, ca=(ca_cert, ca_key))
    written.append(_write(directory / MESH_KEY_FILE, (secrets.token_hex(32) + "\n").encode()))
    if redis:
        written += write_redis_password(directory, secrets.token_urlsafe(32))
    return written


def issue(directory: Path, name: str, role: str, *, days: int = DAYS,
          ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None) -> list[Path]:
    """``NAME.pem`` and ``NAME.key`` in ``directory``: a certificate for ``role`` signed by the CA
    there (``ca.pem``, ``ca.key``), e.g. a second admin certificate for an operator."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    ca_cert, ca_key = ca if ca is not None else load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of the mesh's hosts differ a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(MESH_SERVER_NAME)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return [_write(directory / f"{name}.pem", _pem(cert), 0o644), _write(directory / f"{name}.key", _key_pem(key))]


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key of ``directory``; ValueError naming what is missing."""
    try:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    except OSError as err:
        raise ValueError(f"{directory} holds no mesh CA ({err.strerror}: {err.filename}); "
                         f"make one with `stagemesh certs {directory}`") from None
    return cert, key


def write_redis_password(directory: Path, password: str) -> list[Path]:
    """``redis-password`` and ``redis.conf`` (``requirepass``), both 0600."""
    return [_write(directory / REDIS_PASSWORD_FILE, (password + "\n").encode()),
            _write(directory / REDIS_CONF_FILE, requirepass_line(password).encode())]


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{ORGANIZATION} CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """``data`` into ``path`` with ``mode`` from the first byte on (a key is never readable by others, even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have taken bits off a 0644
    return path
