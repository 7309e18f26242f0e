"""The key set: where keys come from, what a key may hold, and the check itself."""

from __future__ import annotations

import argparse
import os
import re

import pytest

from stagemesh.runtime import api_keys
from stagemesh.runtime.api_keys import NO_KEYS, ApiKeys, read_key_file


def test_no_key_means_no_check():
    assert not NO_KEYS.enabled
    assert NO_KEYS.accepts(None) and NO_KEYS.accepts("anything")
    assert ApiKeys.gather(env={}) == NO_KEYS


def test_every_key_of_every_source_is_accepted_and_nothing_else(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team A\nkey-a1\n\n   key-a2   \n# key-commented-out\n")
    os.chmod(keyfile, 0o600)
    keys = ApiKeys.gather(["key-flag"], [keyfile], env={"STAGEMESH_API_KEYS": " key-env1 ,key-env2,, "})
    assert keys.enabled
    for good in ("key-flag", "key-a1", "key-a2", "key-env1", "key-env2"):
        assert keys.accepts(good), good
    for bad in (None, "", "key-a", "key-a1 ", "KEY-A1", "key-commented-out", "# team A", "key-flag\n"):
        assert not keys.accepts(bad), bad


def test_the_flags_read_the_same_sources(tmp_path, monkeypatch):
    keyfile = tmp_path / "keys"
    keyfile.write_text("from-file\n")
    os.chmod(keyfile, 0o600)
    monkeypatch.setenv("STAGEMESH_API_KEYS", "from-env")
    p = argparse.ArgumentParser()
    api_keys.add_arguments(p)
    keys = ApiKeys.from_args(p.parse_args(["--api-key", "one", "--api-key", "two", "--api-key-file", str(keyfile)]))
    assert all(keys.accepts(k) for k in ("one", "two", "from-file", "from-env"))
    monkeypatch.delenv("STAGEMESH_API_KEYS")
    assert not ApiKeys.from_args(p.parse_args([])).enabled


@pytest.mark.parametrize("text, message", [
    ("", "holds no key"),
    ("# only a comment\n\n", "holds no key"),
    ("good\nwith space\n", "line 2 holds ' '"),
    ("tab\there\n", "line 1 holds '\\t'"),
    ("ünïcode\n", "printable ASCII"),
])
def test_a_key_file_that_would_turn_the_check_off_or_cannot_be_sent_is_refused(tmp_path, text, message):
    keyfile = tmp_path / "keys"
    keyfile.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        read_key_file(keyfile)
    assert "good" not in str(info.value)  # a key is never shown


def test_a_missing_key_file_and_an_empty_key_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read the API key file .*nope"):
        ApiKeys.gather(files=[tmp_path / "nope"], env={})
    with pytest.raises(ValueError, match="API key #1 is empty"):
        ApiKeys(("",))


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog):
    keyfile = tmp_path / "keys"
    keyfile.write_text("k\n")
    os.chmod(keyfile, 0o644)
    read_key_file(keyfile)
    assert "can be read by other users (mode 644)" in caplog.text


def test_keys_never_show_in_a_repr_and_go_to_a_file_only_their_owner_reads(tmp_path):
    keys = ApiKeys(("secret-1", "secret-2"))
    assert "secret" not in repr(keys)
    path = keys.to_file(tmp_path / "keys")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert ApiKeys.gather(files=[path], env={}) == keys
