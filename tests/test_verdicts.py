"""Signed verdicts (protocol.Verdict) and their local storage (store m004): every check `from_wire`
makes, tampering, keys that do not match, duplicates, bounded storage, and the median consensus that
keeps one lying verifier of three from framing a seed. Real SQLite files throughout."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from gtorrent import store as store_module
from gtorrent.identity import Identity, b64
from gtorrent.protocol import VERDICT_LABEL, ProtocolError, Verdict, canonical
from gtorrent.store import DB_NAME, VERDICT_EPOCHS_KEPT, Store

MODEL = "ab" * 32
EVIDENCE = "cd" * 32
VERIFIER = Identity.generate()
SEED = Identity.generate().peer_id


def make(verifier: Identity = VERIFIER, seed: str = SEED, epoch: int = 7, credibility: float = 0.75,
         challenges: int = 3) -> Verdict:
    return Verdict.sign(verifier, seed=seed, model_id=MODEL, epoch=epoch, credibility=credibility,
                        challenges=challenges, evidence=EVIDENCE)


def wire(**changes: Any) -> dict[str, Any]:
    doc = make().to_wire()
    doc.update(changes)
    return doc


def resigned(doc: dict[str, Any], identity: Identity = VERIFIER) -> dict[str, Any]:
    """`doc` with a valid signature by `identity` over exactly its fields (to reach the bounds checks)."""
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    return {**unsigned, "signature": b64(identity.sign(VERDICT_LABEL + canonical(unsigned)))}


# ------------------------------------------------------------------ format and signature


def test_round_trip_and_the_signed_bytes() -> None:
    verdict = make()
    doc = verdict.to_wire()
    assert set(doc) == {"verifier", "verifier_key", "seed", "model_id", "epoch", "credibility", "challenges",
                        "evidence", "signature"}
    assert Verdict.from_wire(doc) == verdict
    assert verdict.signed_bytes().startswith(b"gtorrent/verdict/v1\n")
    assert verdict.verifier == VERIFIER.peer_id and verdict.verifier_key == VERIFIER.signing_public
    # an integer credibility is signed as the float it means: 1 and 1.0 verify alike
    whole = make(credibility=1)
    assert whole.to_wire()["credibility"] == 1.0 and type(whole.to_wire()["credibility"]) is float
    assert Verdict.from_wire({**whole.to_wire(), "credibility": 1}) == whole


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", Identity.generate().peer_id),
        ("model_id", "ef" * 32),
        ("epoch", 8),
        ("credibility", 0.25),
        ("challenges", 4),
        ("evidence", "00" * 32),
    ],
)
def test_tampering_with_any_field_breaks_the_signature(field: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match="bad signature"):
        Verdict.from_wire(wire(**{field: value}))


def test_signature_from_another_key_is_refused() -> None:
    other = Identity.generate()
    bad = make(verifier=other).to_wire()["signature"]
    with pytest.raises(ProtocolError, match="bad signature"):
        Verdict.from_wire(wire(signature=bad))


def test_verifier_id_must_match_the_key_it_carries() -> None:
    other = Identity.generate()
    # another verifier's key and a valid signature by it, under this verifier's name: framing in its name
    doc = resigned(wire(verifier_key=b64(other.signing_public)), other)
    with pytest.raises(ProtocolError, match="does not match its signing key"):
        Verdict.from_wire(doc)
    # and the other way round: another's name on this key
    with pytest.raises(ProtocolError, match="does not match its signing key"):
        Verdict.from_wire(resigned(wire(verifier=other.peer_id)))


def test_label_is_part_of_the_signature() -> None:
    doc = make().to_wire()
    unsigned = {k: v for k, v in doc.items() if k != "signature"}
    unlabelled = b64(VERIFIER.sign(canonical(unsigned)))  # the same fields signed without the label
    with pytest.raises(ProtocolError, match="bad signature"):
        Verdict.from_wire({**doc, "signature": unlabelled})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"credibility": 1.0000001}, "credibility"),
        ({"credibility": -0.1}, "credibility"),
        ({"credibility": float("nan")}, "credibility"),
        ({"credibility": "0.5"}, "credibility"),
        ({"credibility": True}, "credibility"),
        ({"epoch": -1}, "epoch"),
        ({"epoch": 1 << 53}, "epoch"),
        ({"epoch": 1.0}, "epoch"),
        ({"epoch": True}, "epoch"),
        ({"challenges": 0}, "challenges"),
        ({"challenges": 1001}, "challenges"),
        ({"evidence": "CD" * 32}, "evidence"),
        ({"evidence": "cd" * 31}, "evidence"),
        ({"model_id": "zz" * 32}, "model_id"),
        ({"seed": "A" * 26}, "seed"),
        ({"seed": "a" * 27}, "seed"),
        ({"verifier": 5}, "verifier"),
        ({"verifier_key": "x" * 42}, "verifier_key"),
        ({"signature": "=" * 86}, "signature"),
        ({"extra": 1}, "unknown fields"),
    ],
)
def test_shape_and_bounds(changes: dict[str, Any], reason: str) -> None:
    doc = wire(**changes)
    if "signature" not in changes:
        try:  # a valid signature over the bad value: refused for the value itself
            doc = resigned(doc)
        except ValueError:  # NaN has no canonical JSON, so no signer could sign it
            pass
    with pytest.raises(ProtocolError, match=reason):
        Verdict.from_wire(doc)


def test_missing_field_and_not_an_object() -> None:
    doc = wire()
    del doc["evidence"]
    with pytest.raises(ProtocolError, match="missing"):
        Verdict.from_wire(doc)
    with pytest.raises(ProtocolError, match="not an object"):
        Verdict.from_wire([wire()])


def test_bounds_at_their_edges_are_accepted() -> None:
    for credibility in (0.0, 1.0):
        assert make(credibility=credibility).credibility == credibility
    for challenges in (1, 1000):
        assert make(challenges=challenges).challenges == challenges
    assert make(epoch=0).epoch == 0 and make(epoch=(1 << 53) - 1).epoch == (1 << 53) - 1


def test_sign_refuses_what_clients_would_refuse() -> None:
    with pytest.raises(ProtocolError):
        make(credibility=1.5)
    with pytest.raises(ProtocolError):
        make(challenges=0)


def test_non_canonical_base64_is_refused() -> None:
    doc = wire()
    key = doc["verifier_key"]
    # the last of 43 characters carries 2 spare bits; setting one gives the same key bytes, another text
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = key[:-1] + alphabet[alphabet.index(key[-1]) ^ 1]
    with pytest.raises(ProtocolError, match="non-canonical"):
        Verdict.from_wire(resigned({**doc, "verifier_key": twin}))


# ------------------------------------------------------------------ the store


def test_store_keeps_verdicts_with_signatures_in_real_sqlite(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    verdicts = [make(epoch=epoch, credibility=0.5 + epoch / 10) for epoch in range(3)]
    assert store.add_verdicts(reversed(verdicts), now=5.0) == 3
    assert store.verdicts(SEED) == verdicts  # oldest epoch first, re-verified
    assert store.verdicts(SEED, epoch=1) == verdicts[1:2]
    assert store.verdicts(Identity.generate().peer_id) == []
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        rows = conn.execute("select verifier, seed, epoch, verifier_key, signature, received_at from verdicts "
                            "order by epoch").fetchall()
    assert [row[2] for row in rows] == [0, 1, 2]
    assert all(row[:2] == (VERIFIER.peer_id, SEED) and row[5] == 5.0 for row in rows)
    assert rows[0][3] == b64(VERIFIER.signing_public) and rows[0][4] == verdicts[0].to_wire()["signature"]


def test_duplicate_triple_keeps_the_first(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    first = make(epoch=3, credibility=0.9)
    assert store.add_verdicts([first]) == 1
    assert store.add_verdicts([first]) == 0  # the same verdict through a second tracker: idempotent
    # an equivocating verifier's second opinion on the same epoch does not replace the first
    assert store.add_verdicts([make(epoch=3, credibility=0.0)]) == 0
    assert store.verdicts(SEED) == [first]
    # another verifier, or another epoch, is another verdict
    assert store.add_verdicts([make(verifier=Identity.generate(), epoch=3), make(epoch=4)]) == 2
    store.close()


def test_only_verified_verdicts_are_stored_and_a_bad_one_writes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    forged = replace(make(epoch=1), credibility=0.0)  # built without from_wire: the signature no longer fits
    with pytest.raises(ProtocolError, match="bad signature"):
        store.add_verdicts([make(epoch=0), forged])
    assert store.verdicts(SEED) == []
    with pytest.raises(TypeError):
        store.add_verdicts([make().to_wire()])  # type: ignore[list-item]
    store.close()


def test_a_damaged_row_is_left_out(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.add_verdicts([make(epoch=0), make(epoch=1)])
    store.db.execute("update verdicts set credibility = 0.0 where epoch = 1")
    store.db.conn.commit()
    assert [v.epoch for v in store.verdicts(SEED)] == [0]
    store.close()


def test_storage_is_bounded_per_verifier_and_seed(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    other = Identity.generate()
    extra = 10
    store.add_verdicts([make(epoch=epoch) for epoch in range(VERDICT_EPOCHS_KEPT + extra)])
    store.add_verdicts([make(verifier=other, epoch=epoch) for epoch in range(5)])
    held = store.verdicts(SEED)
    mine = [v.epoch for v in held if v.verifier == VERIFIER.peer_id]
    assert mine == list(range(extra, VERDICT_EPOCHS_KEPT + extra))  # the newest epochs
    assert [v.epoch for v in held if v.verifier == other.peer_id] == list(range(5))  # others untouched
    # an epoch older than all kept is not let back in for long
    store.add_verdicts([make(epoch=0)])
    assert min(v.epoch for v in store.verdicts(SEED) if v.verifier == VERIFIER.peer_id) == extra
    (count,) = store.db.execute("select count(*) from verdicts").fetchone()
    assert count == VERDICT_EPOCHS_KEPT + 5
    store.close()


def test_one_lying_verifier_of_three_frames_no_one(tmp_path: Path) -> None:
    honest = [Identity.generate(), Identity.generate()]
    liar = Identity.generate()
    seed = Identity.generate().peer_id
    store = Store.open(tmp_path)
    for epoch in range(6):
        store.add_verdicts([make(verifier=v, seed=seed, epoch=epoch, credibility=0.8) for v in honest])
        store.add_verdicts([make(verifier=liar, seed=seed, epoch=epoch, credibility=0.0)])
    held = store.standing(seed)
    assert held.state == "trusted" and held.reputation > 0.75
    assert held.last_epoch is not None and held.last_epoch.consensus == 0.8
    assert (held.last_epoch.agreed, held.last_epoch.verifiers) == (2, 3)
    # the same liar alone would have framed it: the median is what protects the seed
    alone = Store.open(tmp_path, trusted_verifiers={liar.peer_id})
    assert alone.standing(seed).state == "untrusted"
    alone.close()
    store.close()


def test_upgrade_replaces_the_unused_verdicts_table(tmp_path: Path) -> None:
    # a home made before m004: the first three migrations, and a row in the old table (never written in
    # practice; if one were there it carried no signature, so it cannot be kept)
    old = Migrations("gtorrent")
    for function in (store_module.m001_peers_and_observations, store_module.m002_verdicts, store_module.m003_guards):
        old()(function)
    db = Database(tmp_path / DB_NAME)
    old.apply(db)
    db["verdicts"].insert({"peer_id": SEED, "model_id": MODEL, "epoch": 1, "credibility": 0.0, "signer": "x", "at": 1.0})
    db.close()
    store = Store.open(tmp_path)
    columns = {column.name for column in store.db["verdicts"].columns}
    assert {"verifier", "verifier_key", "signature", "evidence", "challenges"} <= columns and "signer" not in columns
    assert store.verdicts(SEED) == [] and store.standing(SEED).state == "unverified"
    assert store.add_verdicts([make()]) == 1
    store.close()
