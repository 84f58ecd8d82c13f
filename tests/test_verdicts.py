"""Signed verdicts (protocol.Verdict, v2) and their local storage (store m005): every check `from_wire`
makes, tampering, keys that do not match, integer millionths in the signed bytes, time bounds,
equivocation proofs, one verdict per (verifier, seed, model, epoch), trusted-only and bounded storage,
and the median consensus that keeps one lying verifier of three from framing a seed. Real SQLite files
throughout."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from gtorrent import store as store_module
from gtorrent.identity import Identity, b64
from gtorrent.protocol import (
    MAX_VERDICT_EPOCH_MS,
    VERDICT_CLOCK_SKEW_S,
    VERDICT_LABEL,
    VERDICT_MAX_AGE_S,
    Equivocation,
    ProtocolError,
    Verdict,
    canonical,
)
from gtorrent.store import DB_NAME, VERDICT_EPOCHS_KEPT, Store

MODEL = "ab" * 32
EVIDENCE = "cd" * 32
VERIFIER = Identity.generate()
SEED = Identity.generate().peer_id


def make(verifier: Identity = VERIFIER, seed: str = SEED, epoch: int = 7, credibility: float = 0.75,
         challenges: int = 3, model_id: str = MODEL, **timing: Any) -> Verdict:
    return Verdict.sign(verifier, seed=seed, model_id=model_id, epoch=epoch, credibility=credibility,
                        challenges=challenges, evidence=EVIDENCE, **timing)


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
    assert set(doc) == {"verifier", "verifier_key", "seed", "model_id", "epoch", "epoch_start_ms", "epoch_ms",
                        "credibility", "challenges", "evidence", "signature"}
    assert Verdict.from_wire(doc) == verdict
    assert verdict.signed_bytes().startswith(b"gtorrent/verdict/v2\n")
    assert verdict.verifier == VERIFIER.peer_id and verdict.verifier_key == VERIFIER.signing_public
    assert verdict.key == (VERIFIER.peer_id, SEED, MODEL, 7)


def test_credibility_is_integer_millionths_on_the_wire_and_in_the_signed_bytes() -> None:
    # JSON writers spell floats differently (1.0, 1, 1e-05, 0.30000000000000004): none in signed bytes
    verdict = make(credibility=0.123456789)
    doc = verdict.to_wire()
    assert doc["credibility"] == 123457 and type(doc["credibility"]) is int
    assert verdict.credibility == 0.123457  # the Python field stays a float in [0, 1], as signed
    signed = json.loads(verdict.signed_bytes()[len(VERDICT_LABEL):])
    assert all(type(value) in (str, int) for value in signed.values())  # no float anywhere
    assert b"." not in verdict.signed_bytes()
    whole = make(credibility=1)
    assert whole.to_wire()["credibility"] == 1_000_000 and whole.credibility == 1.0
    assert make(credibility=0.0).to_wire()["credibility"] == 0
    # a float on the wire is refused, even one that means a whole number of millionths
    for spelled in (1.0, 0.5, 500000.0):
        with pytest.raises(ProtocolError, match="credibility"):
            Verdict.from_wire(resigned({**make(credibility=0.5).to_wire(), "credibility": spelled}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", Identity.generate().peer_id),
        ("model_id", "ef" * 32),
        ("epoch", 8),
        ("credibility", 250_000),
        ("epoch_start_ms", 1),
        ("epoch_ms", 1000),
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
        ({"credibility": 1_000_001}, "credibility"),
        ({"credibility": -1}, "credibility"),
        ({"credibility": 0.5}, "credibility"),
        ({"credibility": float("nan")}, "credibility"),
        ({"credibility": "500000"}, "credibility"),
        ({"credibility": True}, "credibility"),
        ({"epoch_start_ms": -1}, "epoch_start_ms"),
        ({"epoch_start_ms": 1 << 53}, "epoch_start_ms"),
        ({"epoch_start_ms": 1.5}, "epoch_start_ms"),
        ({"epoch_ms": 0}, "epoch_ms"),
        ({"epoch_ms": MAX_VERDICT_EPOCH_MS + 1}, "epoch_ms"),
        ({"epoch_ms": 60_000.0}, "epoch_ms"),
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
    assert make(epoch_ms=1, epoch_start_ms=0).epoch_ms == 1
    assert make(epoch_ms=MAX_VERDICT_EPOCH_MS, epoch_start_ms=(1 << 53) - 1).epoch_start_ms == (1 << 53) - 1
    for challenges in (1, 1000):
        assert make(challenges=challenges).challenges == challenges
    assert make(epoch=0).epoch == 0 and make(epoch=(1 << 53) - 1).epoch == (1 << 53) - 1


def test_sign_refuses_what_clients_would_refuse() -> None:
    with pytest.raises(ProtocolError):
        make(credibility=1.5)
    with pytest.raises(ProtocolError):
        make(credibility=float("nan"))
    with pytest.raises(ProtocolError):
        make(challenges=0)
    with pytest.raises(ProtocolError):
        make(epoch_ms=0)


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
    now = time.time()
    assert store.add_verdicts(reversed(verdicts), now=now) == 3
    assert store.verdicts(SEED) == verdicts  # oldest epoch first, re-verified
    assert store.verdicts(SEED, epoch=1) == verdicts[1:2]
    assert store.verdicts(Identity.generate().peer_id) == []
    store.close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        rows = conn.execute("select verifier, seed, epoch, verifier_key, signature, received_at, credibility, "
                            "model_id from verdicts order by epoch").fetchall()
    assert [row[2] for row in rows] == [0, 1, 2]
    assert all(row[:2] == (VERIFIER.peer_id, SEED) and row[5] == now and row[7] == MODEL for row in rows)
    assert rows[0][3] == b64(VERIFIER.signing_public) and rows[0][4] == verdicts[0].to_wire()["signature"]
    assert [row[6] for row in rows] == [500_000, 600_000, 700_000]  # millionths, as signed


def test_duplicates_are_idempotent_and_another_model_is_another_verdict(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    first = make(epoch=3, credibility=0.9)
    assert store.add_verdicts([first]) == 1
    assert store.add_verdicts([first, first]) == 0  # the same verdict through more trackers: idempotent
    # a verdict is about one model of one seed: another model of the same seed, same epoch, is kept too
    other_model = make(epoch=3, credibility=0.2, model_id="ef" * 32)
    assert store.add_verdicts([other_model]) == 1
    assert store.verdicts(SEED) == sorted([first, other_model], key=lambda v: v.model_id)
    assert store.verdicts(SEED, 3, model_id="ef" * 32) == [other_model]
    # another verifier, or another epoch, is another verdict
    assert store.add_verdicts([make(verifier=Identity.generate(), epoch=3), make(epoch=4)]) == 2
    assert store.equivocators() == set()
    store.close()


def test_a_good_model_does_not_launder_a_bad_one(tmp_path: Path) -> None:
    # a seed serving two models, one honestly and one not: its standing is that of its worst model, in
    # whatever order the verdicts arrive (one row per (verifier, seed, model, epoch) keeps both)
    store = Store.open(tmp_path)
    good, bad = "ab" * 32, "ef" * 32
    for epoch in range(4):
        store.add_verdicts([make(epoch=epoch, credibility=0.95, model_id=good),
                            make(epoch=epoch, credibility=0.0, model_id=bad)])
    assert len(store.verdicts(SEED)) == 8
    assert store.standing(SEED).state == "untrusted"
    store.close()


def test_an_equivocating_verifier_is_proven_and_counts_for_nothing(tmp_path: Path) -> None:
    honest = [Identity.generate(), Identity.generate()]
    liar = Identity.generate()
    store = Store.open(tmp_path)
    for epoch in range(3):
        store.add_verdicts([make(verifier=v, epoch=epoch, credibility=0.9) for v in (*honest, liar)])
    before = store.standing(SEED).last_epoch
    assert before is not None and before.verifiers == 3
    # the liar signs a second, different verdict for an epoch it judged: the store keeps the proof
    assert store.add_verdicts([make(verifier=liar, epoch=2, credibility=0.0)]) == 0
    assert store.equivocators() == {liar.peer_id}
    (proof,) = store.equivocations()
    assert proof.verifier == liar.peer_id
    assert (proof.first.credibility, proof.second.credibility) == (0.9, 0.0)
    # its verdicts are gone and none is taken again; the honest verifiers still make the standing
    assert {v.verifier for v in store.verdicts(SEED)} == {v.peer_id for v in honest}
    assert store.add_verdicts([make(verifier=liar, epoch=9, credibility=0.0)]) == 0
    held = store.standing(SEED)
    assert held.state == "trusted" and held.last_epoch is not None and held.last_epoch.verifiers == 2
    store.close()
    # a proof met on the wire (a tracker served it) does the same, re-checked on the way in
    store = Store.open(tmp_path / "other")
    store.add_verdicts([make(verifier=liar, epoch=1)])
    assert store.add_equivocations([proof]) == 1 and store.add_equivocations([proof]) == 0
    assert store.verdicts(SEED) == [] and store.equivocators() == {liar.peer_id}
    forged = Equivocation(proof.first, replace(proof.second, credibility=0.5))
    with pytest.raises(ProtocolError):
        store.add_equivocations([forged])
    store.close()


def test_equivocation_needs_two_different_claims_on_one_key() -> None:
    first = make(epoch=3, credibility=0.9)
    assert Equivocation.of(first, first) is None  # a copy is no lie
    assert Equivocation.of(first, make(epoch=4, credibility=0.0)) is None  # another epoch
    assert Equivocation.of(first, make(epoch=3, model_id="ef" * 32)) is None  # another model
    assert Equivocation.of(first, make(verifier=Identity.generate(), epoch=3, credibility=0.0)) is None
    proof = Equivocation.of(first, make(epoch=3, credibility=0.0))
    assert proof is not None and Equivocation.from_wire(proof.to_wire()) == proof
    # the same claim at another time of signing is another claim too (the epoch's start is signed)
    assert Equivocation.of(make(epoch=3, epoch_start_ms=1000), make(epoch=3, epoch_start_ms=2000)) is not None
    for bad in ([first.to_wire(), first.to_wire()], [first.to_wire()], {"a": 1},
                [first.to_wire(), {**proof.second.to_wire(), "credibility": 5}]):
        with pytest.raises(ProtocolError):
            Equivocation.from_wire(bad)


def test_time_bounds_of_a_verdict() -> None:
    now = 1_800_000_000.0
    at = int(now * 1000)
    current = make(epoch_start_ms=at - 30_000, epoch_ms=60_000)
    assert current.time_problem(now) is None
    # starting within the clock-skew allowance ahead is fine; further ahead is from the future
    assert make(epoch_start_ms=at + int(VERDICT_CLOCK_SKEW_S * 1000)).time_problem(now) is None
    future = make(epoch_start_ms=at + int(VERDICT_CLOCK_SKEW_S * 1000) + 1)
    problem = future.time_problem(now)
    assert problem is not None and problem[0] == "invalid"
    # ended up to VERDICT_MAX_AGE_S ago: kept; longer ago: stale
    edge = at - int(VERDICT_MAX_AGE_S * 1000) - 60_000
    assert make(epoch_start_ms=edge, epoch_ms=60_000).time_problem(now) is None
    stale = make(epoch_start_ms=edge - 1, epoch_ms=60_000).time_problem(now)
    assert stale is not None and stale[0] == "stale"
    # a long epoch that began long ago but ended recently is not stale
    assert make(epoch_start_ms=edge - 1, epoch_ms=MAX_VERDICT_EPOCH_MS).time_problem(now) is None
    # the default time of Verdict.sign is the epoch under way now: any caller that names none is current
    fresh = make()
    assert fresh.time_problem(time.time()) is None and fresh.epoch_start_ms % fresh.epoch_ms == 0


def test_the_store_ignores_verdicts_from_the_future_or_stale(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    now = time.time()
    at = int(now * 1000)
    future = make(epoch=1, epoch_start_ms=at + 3_600_000)
    stale = make(epoch=2, epoch_start_ms=at - int(VERDICT_MAX_AGE_S * 1000) - 3_600_000)
    current = make(epoch=3, epoch_start_ms=at - 60_000)
    assert store.add_verdicts([future, stale, current], now=now) == 1
    assert store.verdicts(SEED) == [current]
    store.close()


def test_the_store_keeps_only_trusted_verifiers_verdicts(tmp_path: Path) -> None:
    mine, stranger = Identity.generate(), Identity.generate()
    store = Store.open(tmp_path, trusted_verifiers={mine.peer_id})
    # a flood from identities the client does not trust writes nothing
    assert store.add_verdicts([make(verifier=Identity.generate(), epoch=e) for e in range(50)]) == 0
    assert store.add_verdicts([make(verifier=stranger), make(verifier=mine)]) == 1
    assert [v.verifier for v in store.verdicts(SEED)] == [mine.peer_id]
    stranger_proof = Equivocation.of(make(verifier=stranger, epoch=1),
                                     make(verifier=stranger, epoch=1, credibility=0.0))
    assert stranger_proof is not None and store.add_equivocations([stranger_proof]) == 0
    (count,) = store.db.execute("select count(*) from verdict_equivocations").fetchone()
    assert count == 0
    store.close()


def test_storage_is_bounded_per_seed_and_overall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_VERDICTS_PER_SEED", 6)
    monkeypatch.setattr(store_module, "MAX_VERDICTS_KEPT", 10)
    store = Store.open(tmp_path)
    base = int(time.time() * 1000) - 3_600_000
    verifiers = [Identity.generate() for _ in range(3)]
    # three verifiers on one seed, three epochs each, a minute apart: the per-seed bound keeps the newest
    store.add_verdicts([make(verifier=v, epoch=e, epoch_start_ms=base + e * 60_000)
                        for e in range(3) for v in verifiers])
    assert sorted(v.epoch for v in store.verdicts(SEED)) == [1, 1, 1, 2, 2, 2]
    # other seeds: the overall bound keeps the newest epochs of all
    seeds = [Identity.generate().peer_id for _ in range(3)]
    store.add_verdicts([make(seed=s, epoch=e, epoch_start_ms=base + e * 60_000)
                        for s in seeds for e in range(3, 5)])
    (count,) = store.db.execute("select count(*) from verdicts").fetchone()
    assert count == 10
    # the verifier holding the most rows gives them up first (its oldest epochs): VERIFIER held 6 of 12
    assert sorted(v.epoch for v in store.verdicts(SEED)) == [1, 1, 1, 2, 2, 2]
    assert sorted(v.epoch for s in seeds for v in store.verdicts(s)) == [3, 4, 4, 4]
    store.close()


def test_one_trusted_liar_cannot_push_the_others_verdicts_out(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Review fix: the bounds pruned the oldest epochs of anyone, so one trusted verifier signing many
    epoch numbers (dated at the edge of the future) on a seed, or on many seeds, pushed the other
    verifiers' history out of a client's store: a caught cheater went back to `unverified` (asks again)
    and an honest seed lost its trust. Now the verifier holding the most rows gives them up first."""
    monkeypatch.setattr(store_module, "MAX_VERDICTS_PER_SEED", 16)
    monkeypatch.setattr(store_module, "MAX_VERDICTS_KEPT", 40)
    honest, liar = [Identity.generate() for _ in range(3)], Identity.generate()
    store = Store.open(tmp_path, trusted_verifiers={*(v.peer_id for v in honest), liar.peer_id})
    now = time.time()
    base = int(now * 1000) - 3_600_000
    for epoch in range(4):  # four verifiers agree: C = 0 (a quorum is 3 of 4)
        store.add_verdicts([make(verifier=v, epoch=epoch, credibility=0.0, epoch_start_ms=base + epoch * 60_000)
                            for v in (*honest, liar)], now=now)
    assert store.standing(SEED).state == "untrusted"
    ahead = int(now * 1000) + 50_000  # within the clock skew: never the oldest
    store.add_verdicts([make(verifier=liar, epoch=10**6 + e, credibility=1.0, epoch_start_ms=ahead)
                        for e in range(20)], now=now)
    assert len(store.verdicts(SEED)) == 16
    assert sum(v.verifier != liar.peer_id for v in store.verdicts(SEED)) == 12  # the honest history stays
    assert store.standing(SEED).state == "untrusted"
    # the same over many seeds against the overall bound
    others = [Identity.generate().peer_id for _ in range(5)]
    store.add_verdicts([make(verifier=liar, seed=s, epoch=10**6 + e, credibility=1.0, epoch_start_ms=ahead)
                        for s in others for e in range(8)], now=now)
    (count,) = store.db.execute("select count(*) from verdicts").fetchone()
    assert count == 40
    assert sum(v.verifier != liar.peer_id for v in store.verdicts(SEED)) == 12
    assert store.standing(SEED).state == "untrusted"
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


def test_upgrade_from_v1_verdicts_drops_what_can_never_verify_again(tmp_path: Path) -> None:
    # a home at m004 holding a v1 verdict (float credibility, old label): under v2 its signature can
    # never verify, so m005 drops it and keys the new table per (verifier, seed, model, epoch)
    old = Migrations("gtorrent")
    for function in (store_module.m001_peers_and_observations, store_module.m002_verdicts, store_module.m003_guards,
                     store_module.m004_signed_verdicts):
        old()(function)
    db = Database(tmp_path / DB_NAME)
    old.apply(db)
    db["verdicts"].insert({"verifier": VERIFIER.peer_id, "seed": SEED, "epoch": 1, "verifier_key": "k",
                           "model_id": MODEL, "credibility": 0.0, "challenges": 3, "evidence": EVIDENCE,
                           "signature": "s", "received_at": 1.0})
    db.close()
    store = Store.open(tmp_path)
    assert store.db["verdicts"].pks == ["verifier", "seed", "model_id", "epoch"]
    assert store.verdicts(SEED) == [] and store.standing(SEED).state == "unverified"
    assert store.add_verdicts([make(), make(model_id="ef" * 32)]) == 2
    store.close()


# ------------------------------------------------------------------ review fixes


def test_trusted_verifiers_of_different_models_each_judge_their_own(tmp_path: Path) -> None:
    """A verifier loads one reference model, so in a swarm of two models each verifier judges one. On
    HEAD the quorum counted the whole trusted set (two verifiers: 2 of 2 needed) and no epoch ever had
    it: a cheater judged C = 0 on every epoch stayed `unverified` and kept getting asks. The quorum now
    counts the trusted verifiers that judge that model (store-wide), so a liar numbering epochs no one
    else judged still counts for nothing."""
    other_model = "ef" * 32
    judge_x, judge_y, liar = Identity.generate(), Identity.generate(), Identity.generate()
    cheater, honest, elsewhere = (Identity.generate().peer_id for _ in range(3))
    store = Store.open(tmp_path, trusted_verifiers={judge_x.peer_id, judge_y.peer_id})
    now = time.time()
    for epoch in range(4):
        store.add_verdicts([make(verifier=judge_x, seed=cheater, epoch=epoch, credibility=0.0),
                            make(verifier=judge_x, seed=honest, epoch=epoch, credibility=0.95),
                            make(verifier=judge_y, seed=elsewhere, epoch=epoch, credibility=0.95,
                                 model_id=other_model)], now=now)
    assert store.standing(cheater).state == "untrusted"
    assert store.standing(honest).state == "trusted" and store.standing(elsewhere).state == "trusted"
    store.close()
    # three trusted verifiers of one model: one of them alone, in epochs it numbered itself, counts for
    # nothing on a seed, even where the others' verdicts on that seed are withheld (they judged others)
    store = Store.open(tmp_path / "b", trusted_verifiers={judge_x.peer_id, judge_y.peer_id, liar.peer_id})
    for epoch in range(4):
        store.add_verdicts([make(verifier=v, seed=elsewhere, epoch=epoch, credibility=0.95)
                            for v in (judge_x, judge_y, liar)], now=now)
        store.add_verdicts([make(verifier=liar, seed=honest, epoch=10**6 + epoch, credibility=0.0)], now=now)
    assert store.standing(elsewhere).state == "trusted"
    assert store.standing(honest).state == "unverified"
    assert store.judges([MODEL]) == {MODEL: {judge_x.peer_id, judge_y.peer_id, liar.peer_id}}
    store.close()


def test_verdicts_a_tracker_serves_are_dropped_unless_on_a_model_the_seed_announces() -> None:
    """`read_verdicts` (discovery): a lying tracker may serve a trusted verifier's verdict on a model the
    seed does not serve (honest trackers refuse those); as a seed's R is its worst model's, it must not
    count. And a malformed verdict whose `seed` is a list must be dropped, not crash the ask: on HEAD it
    raised TypeError (unhashable) out of `discover`."""
    from gtorrent.discovery import read_verdicts

    other_model = "ef" * 32
    good, off_model = make(), make(model_id=other_model)
    served = [{"seed": [SEED]}, {"seed": SEED, "model_id": [MODEL]}, off_model.to_wire(), good.to_wire()]
    assert read_verdicts(served, {SEED: {MODEL}}) == [good]
    assert read_verdicts(served, {SEED: {MODEL, other_model}}) == [off_model, good]
    assert read_verdicts(served, {}) == []
