"""stagemesh.mesh.signing: the MAC of a document binds its body, deployment, kind and slot."""

from __future__ import annotations

import logging
import secrets

import pytest

from stagemesh.mesh.signing import (
    KEY_FILE,
    PREFIX,
    DocumentId,
    Forged,
    Refusals,
    RefusedDocument,
    Signer,
    load_signer,
    split,
)

KEY = bytes(range(32))
DOC = DocumentId("prod", "placement", "0")
BODY = ('{"replicas": [{"worker": "expert-c0-e0", "address": "127.0.0.1:41005", "experts": {"1": [0, 2]}, '
        '"live": true}]}')


def test_a_sealed_document_round_trips_and_keeps_its_body_readable():
    sealed = Signer(KEY).seal(DOC, BODY)
    assert sealed.startswith(PREFIX) and sealed.endswith("\n" + BODY)
    assert Signer(KEY).unseal(DOC, sealed) == BODY
    assert split(sealed) == (BODY, sealed[len(PREFIX):len(PREFIX) + 64])
    assert split(BODY) == (BODY, None)


def test_changing_any_byte_of_a_sealed_document_gets_it_refused():
    signer = Signer(KEY)
    sealed = signer.seal(DOC, BODY)
    for i, char in enumerate(sealed):
        for other in {chr(ord(char) ^ 1), "x" if char != "x" else "y"}:
            tampered = sealed[:i] + other + sealed[i + 1:]
            with pytest.raises(Forged):
                signer.unseal(DOC, tampered)
    with pytest.raises(Forged):
        signer.unseal(DOC, sealed + " ")  # appended to
    with pytest.raises(Forged):
        signer.unseal(DOC, sealed[:-1])  # cut short


@pytest.mark.parametrize("elsewhere", [
    DocumentId("staging", "placement", "0"),  # another deployment sharing the key and the Redis
    DocumentId("prod", "topology", "0"),  # another kind
    DocumentId("prod", "placement", "1"),  # another chain's slot
])
def test_a_genuine_document_replayed_under_another_id_is_refused(elsewhere):
    sealed = Signer(KEY).seal(DOC, BODY)
    with pytest.raises(Forged, match="does not match"):
        Signer(KEY).unseal(elsewhere, sealed)


def test_another_key_or_no_signature_is_refused_with_a_message_saying_which():
    with pytest.raises(Forged, match="does not match"):
        Signer(KEY).unseal(DOC, Signer(secrets.token_bytes(32)).seal(DOC, BODY))
    with pytest.raises(Forged, match="not signed"):
        Signer(KEY).unseal(DOC, BODY)
    with pytest.raises(Forged, match="not signed"):
        Signer(KEY).check(DOC, BODY, None)


def test_the_id_fields_cannot_be_shifted_into_each_other():
    """("a", "b:c") and ("a:b", "c") are different documents: the fields are NUL-separated."""
    signer = Signer(KEY)
    assert signer.mac(DocumentId("a", "kind", "x"), "y") != signer.mac(DocumentId("a", "kind", "xy"), "")
    assert signer.mac(DocumentId("a", "kind", "x"), "y") != signer.mac(DocumentId("a", "kindx", ""), "y")


def test_load_signer_reads_the_key_of_the_tls_dir(tmp_path):
    assert load_signer(None) is None
    with pytest.raises(ValueError, match=rf"cannot read the mesh key .*{KEY_FILE}.*stagemesh certs"):
        load_signer(tmp_path)
    (tmp_path / KEY_FILE).write_text("abc\n")
    with pytest.raises(ValueError, match="malformed"):
        load_signer(tmp_path)
    (tmp_path / KEY_FILE).write_text("00" * 16 + "\n")
    with pytest.raises(ValueError, match="16 bytes: must be 32"):
        load_signer(tmp_path)
    (tmp_path / KEY_FILE).write_text(KEY.hex() + "\n")
    assert load_signer(tmp_path).mac(DOC, BODY) == Signer(KEY).mac(DOC, BODY)


def test_a_refused_document_is_logged_and_counted_once_however_often_it_is_read(caplog):
    refusals = Refusals()
    caplog.set_level(logging.ERROR, logger="stagemesh.mesh.signing")
    for _ in range(3):
        err = refusals.refuse("placement", "stagemesh:prod:placement:0", "forged", Forged("it is not signed"))
    assert isinstance(err, RefusedDocument) and err.code == "INTERNAL"
    assert err.message == "refused the placement at Redis key 'stagemesh:prod:placement:0': it is not signed"
    refusals.refuse("placement", "stagemesh:prod:placement:0", "forged again", Forged("it is not signed"))
    assert refusals.counts == {"placement": 2}, "a new forgery at the same key counts again"
    assert [r.getMessage() for r in caplog.records].count(err.message + "; it is ignored") == 2
    doc = refusals.to_json()
    assert doc["total"] == 2 and doc["last"]["key"] == "stagemesh:prod:placement:0"
