"""`stagemesh certs DIR`: the mesh CA, one certificate per role, mesh.key and the Redis password,
readable by their owner alone (``stagemesh.deploy.certs``)."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stagemesh.cli.commands import main as cli_main
from stagemesh.deploy.certs import issue, make_secrets
from stagemesh.runtime.tls import MESH_SERVER_NAME, ROLES, MeshTLS


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_role_has_a_certificate_of_the_mesh_ca_for_the_mesh_name(tmp_path):
    secrets = tmp_path / "secrets"
    assert cli_main(["certs", str(secrets)]) == 0
    ca = _cert(secrets / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ROLES:
        cert = _cert(secrets / f"{role}.pem")
        cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed it
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == [MESH_SERVER_NAME]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        assert MeshTLS.load(secrets, role).role == role
    assert len(bytes.fromhex((secrets / "mesh.key").read_text().strip())) == 32
    password = (secrets / "redis-password").read_text().strip()
    assert len(password) >= 32 and (secrets / "redis.conf").read_text() == f'requirepass "{password}"\n'


def test_keys_and_passwords_are_the_owners_alone(tmp_path):
    secrets = tmp_path / "secrets"
    make_secrets(secrets)
    assert _mode(secrets) == 0o700
    private = ["ca.key", *(f"{role}.key" for role in ROLES), "mesh.key", "redis-password", "redis.conf"]
    assert {name: _mode(secrets / name) for name in private} == dict.fromkeys(private, 0o600)
    assert _mode(secrets / "ca.pem") == 0o644  # a certificate is public


def test_an_existing_directory_is_not_overwritten_without_force(tmp_path, capsys):
    secrets = tmp_path / "secrets"
    make_secrets(secrets)
    before = (secrets / "ca.pem").read_bytes()
    assert cli_main(["certs", str(secrets)]) == 1
    assert "is not empty: give --force" in capsys.readouterr().err
    assert (secrets / "ca.pem").read_bytes() == before
    assert cli_main(["certs", str(secrets), "--force"]) == 0
    assert (secrets / "ca.pem").read_bytes() != before
    (tmp_path / "empty").mkdir()
    assert cli_main(["certs", str(tmp_path / "empty")]) == 0  # an empty directory is fine


def test_the_kept_ca_key_issues_more_certificates(tmp_path):
    secrets = tmp_path / "secrets"
    make_secrets(secrets, redis=False)
    assert not (secrets / "redis-password").exists()
    issue(secrets, "alice", "admin")
    _cert(secrets / "alice.pem").verify_directly_issued_by(_cert(secrets / "ca.pem"))
    assert _mode(secrets / "alice.key") == 0o600
    with pytest.raises(ValueError, match="role 'root' is not one of gateway, frontend, stage, expert, admin"):
        issue(secrets, "bob", "root")
    with pytest.raises(ValueError, match=r"cannot read .*ca\.pem .* `stagemesh certs"):
        MeshTLS.load(tmp_path / "secrets-without-stage", "stage")
