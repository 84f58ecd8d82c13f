"""Peer identity: created once, private on disk, stable, and never silently replaced."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gtorrent.errors import IdentityError
from gtorrent.identity import (
    KEY_FILE_NAME,
    Identity,
    load_identity,
    load_or_create_identity,
    peer_id_for,
    verify_signature,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_private_and_stable(gtorrent_home: Path) -> None:
    first, created = load_or_create_identity(gtorrent_home)
    assert created
    assert mode(gtorrent_home) == 0o700
    assert mode(gtorrent_home / KEY_FILE_NAME) == 0o600
    second, created_again = load_or_create_identity(gtorrent_home)
    assert not created_again
    assert second.peer_id == first.peer_id
    assert second.onion_public == first.onion_public
    assert second.curve_public == first.curve_public


def test_peer_id_is_self_certifying() -> None:
    identity = Identity.generate()
    assert identity.peer_id == peer_id_for(identity.signing_public)
    assert len(identity.peer_id) == 26 and identity.peer_id.isalnum()
    other = Identity.generate()
    assert other.peer_id != identity.peer_id
    message = b"record"
    signature = identity.sign(message)
    assert verify_signature(identity.signing_public, signature, message)
    assert not verify_signature(identity.signing_public, signature, message + b"!")
    assert not verify_signature(other.signing_public, signature, message)


def test_created_with_private_mode_even_under_permissive_umask(gtorrent_home: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_identity(gtorrent_home)
    finally:
        os.umask(old)
    assert mode(gtorrent_home / KEY_FILE_NAME) == 0o600
    assert mode(gtorrent_home) == 0o700


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o666])
def test_readable_key_file_is_refused(gtorrent_home: Path, bits: int) -> None:
    identity, _ = load_or_create_identity(gtorrent_home)
    path = gtorrent_home / KEY_FILE_NAME
    path.chmod(bits)
    with pytest.raises(IdentityError, match="readable by other users") as info:
        load_or_create_identity(gtorrent_home)
    assert info.value.hint and "chmod 600" in info.value.hint
    path.chmod(0o600)
    assert load_identity(gtorrent_home).peer_id == identity.peer_id


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],
        lambda text: "not json at all",
        lambda text: text.replace('"gtorrent-identity-v1"', '"other"'),
        lambda text: json.dumps({**json.loads(text), "peer_id": "a" * 26}),
        lambda text: json.dumps({**json.loads(text), "onion_key": "AAAA"}),
    ],
)
def test_corrupted_key_file_is_refused_and_kept(gtorrent_home: Path, damage) -> None:  # type: ignore[no-untyped-def]
    load_or_create_identity(gtorrent_home)
    path = gtorrent_home / KEY_FILE_NAME
    damaged = damage(path.read_text())
    path.write_text(damaged)
    with pytest.raises(IdentityError, match="corrupted"):
        load_or_create_identity(gtorrent_home)
    assert path.read_text() == damaged  # never silently replaced


def test_cli_id_json_is_stable(cli, gtorrent_home: Path) -> None:  # type: ignore[no-untyped-def]
    first = cli("id", "--json")
    assert first.code == 0, first
    doc = json.loads(first.out)
    assert doc["home"] == str(gtorrent_home)
    assert doc["created"] is True
    for key in ("peer_id", "signing_key", "onion_key", "curve_key"):
        assert doc[key]
    again = json.loads(cli("id", "--json").out)
    assert again["peer_id"] == doc["peer_id"] and again["created"] is False
    human = cli("id")
    assert doc["peer_id"] in human.out


def test_cli_id_refuses_readable_key(cli, gtorrent_home: Path) -> None:  # type: ignore[no-untyped-def]
    cli("id")
    (gtorrent_home / KEY_FILE_NAME).chmod(0o644)
    result = cli("id")
    assert result.code == 1
    assert "error:" in result.err and "readable by other users" in result.err
    assert "hint:" in result.err and "Traceback" not in result.err


def test_cli_unwritable_home(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv("GTORRENT_HOME", str(locked / "home"))
    if os.geteuid() == 0:
        # root ignores directory permissions; a regular file in the way fails for root too
        monkeypatch.setenv("GTORRENT_HOME", str(_a_file(tmp_path) / "home"))
    result = cli("id")
    assert result.code == 1
    assert "error: cannot create directory" in result.err
    assert "hint: set GTORRENT_HOME" in result.err
    assert "Traceback" not in result.err


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path
