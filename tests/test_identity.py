"""Peer identity: created once, private on disk, stable, and never silently replaced."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gtorrent.errors import IdentityError
from gtorrent.identity import (
    KEY_FILE_NAME,
    Identity,
    b64,
    load_identity,
    load_or_create_identity,
    peer_id_for,
    unb64,
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
    for key in ("peer_id", "signing_key", "curve_key"):
        assert doc[key]
    assert "onion_key" not in doc  # relays' onion keys rotate in memory; the file's is not theirs
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


def _flip_key_byte(text: str, field: str) -> str:
    """The key file with one byte of the private key `field` changed (still valid base64 and length)."""
    doc = json.loads(text)
    raw = bytearray(unb64(doc[field]))
    raw[7] ^= 0x01
    return json.dumps({**doc, field: b64(bytes(raw))}, indent=2) + "\n"


def test_new_key_file_has_a_checksum_over_all_keys(gtorrent_home: Path) -> None:
    load_or_create_identity(gtorrent_home)
    doc = json.loads((gtorrent_home / KEY_FILE_NAME).read_text())
    assert len(doc["checksum"]) == 64 and int(doc["checksum"], 16) >= 0


@pytest.mark.parametrize("field", ["onion_key", "curve_key", "signing_key"])
def test_one_flipped_key_byte_is_caught_and_file_kept(gtorrent_home: Path, field: str) -> None:
    load_or_create_identity(gtorrent_home)
    path = gtorrent_home / KEY_FILE_NAME
    damaged = _flip_key_byte(path.read_text(), field)
    path.write_text(damaged)
    with pytest.raises(IdentityError, match="corrupted") as info:
        load_or_create_identity(gtorrent_home)
    assert info.value.hint and "restore it from a backup" in info.value.hint
    assert path.read_text() == damaged  # never silently replaced


def test_damaged_checksum_is_caught(gtorrent_home: Path) -> None:
    load_or_create_identity(gtorrent_home)
    path = gtorrent_home / KEY_FILE_NAME
    doc = json.loads(path.read_text())
    for bad in ["0" * 64, doc["checksum"][:-1], 12345, None]:
        path.write_text(json.dumps({**doc, "checksum": bad}))
        with pytest.raises(IdentityError, match="corrupted"):
            load_identity(gtorrent_home)


def test_key_file_without_checksum_still_loads_and_is_not_rewritten(gtorrent_home: Path) -> None:
    # files written before the checksum existed are accepted as they are (checked by peer id only)
    identity, _ = load_or_create_identity(gtorrent_home)
    path = gtorrent_home / KEY_FILE_NAME
    doc = json.loads(path.read_text())
    del doc["checksum"]
    old = json.dumps(doc, indent=2) + "\n"
    path.write_text(old)
    again, created = load_or_create_identity(gtorrent_home)
    assert not created and again.public_info() == identity.public_info()
    assert path.read_text() == old


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_key_file_is_refused_without_blocking(gtorrent_home: Path, kind: str) -> None:
    gtorrent_home.mkdir(mode=0o700)
    path = gtorrent_home / KEY_FILE_NAME
    if kind == "fifo":
        os.mkfifo(path, 0o600)  # opening it to read would wait forever for a writer
    else:
        path.mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="not a regular file") as info:
        load_or_create_identity(gtorrent_home)
    assert info.value.hint and "mv " in info.value.hint
    assert stat.S_ISFIFO(path.lstat().st_mode) if kind == "fifo" else path.is_dir()  # left in place


@pytest.mark.timeout(60)
def test_cli_id_with_fifo_key_file_exits_instead_of_hanging(gtorrent_home: Path) -> None:
    gtorrent_home.mkdir(mode=0o700)
    os.mkfifo(gtorrent_home / KEY_FILE_NAME, 0o600)
    env = {**os.environ, "GTORRENT_HOME": str(gtorrent_home)}
    done = subprocess.run(
        [sys.executable, "-m", "gtorrent_cli", "id"], capture_output=True, text=True, env=env, timeout=45
    )
    assert done.returncode == 1, done
    assert "error:" in done.stderr and "not a regular file" in done.stderr and "hint:" in done.stderr
