"""Reputation rules (pure, with the paper's constants) and the SQLite store that feeds them."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gtorrent import reputation as rep
from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord
from gtorrent.store import DB_NAME, Store


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([], 0.5),
        ([0.2], 0.300),  # paper-notes §4.2: 0.5 -> 0.300 -> 0.191
        ([0.2, 0.2], 0.191),
        ([0.7], 0.62),  # honest: 0.62 -> 0.668 -> 0.687
        ([0.7, 0.7], 0.668),
        ([0.7, 0.7, 0.7], 0.687),
    ],
)
def test_paper_reputation_rule(scores: list[float], expected: float) -> None:
    assert rep.quality_from_verdicts(scores) == pytest.approx(expected, abs=1e-3)


def test_punishment_factor_applies_when_window_is_abnormal() -> None:
    # one abnormal epoch out of one: c = 1, fraction 1 > 0.2 -> factor 6/(5 + 5 + 2) = 0.5
    assert rep.quality_from_verdicts([0.3]) == pytest.approx(0.4 * 0.5 + 0.5 * 0.3)


def test_reliability_and_trust() -> None:
    assert rep.reliability_from_outcomes([]) == 0.5
    assert rep.reliability_from_outcomes([True] * 10) > 0.9
    failing = rep.combined(0.5, rep.reliability_from_outcomes([False] * 10))
    assert not rep.trusted(failing)
    assert rep.trusted(rep.combined(0.5, 0.5))


def test_backoff_doubles_and_is_capped() -> None:
    assert rep.avoid_until(0, 100.0) == 0.0
    assert rep.avoid_until(1, 100.0) == 100.0 + rep.BACKOFF_BASE_S
    assert rep.avoid_until(2, 100.0) == 100.0 + 2 * rep.BACKOFF_BASE_S
    assert rep.avoid_until(30, 100.0) == 100.0 + rep.BACKOFF_MAX_S


def signed(identity: Identity) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), seq=1, expires=time.time() + 60)


def test_store_migrates_once_wal_and_survives_reopen(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    peer = Identity.generate()
    store.saw_peers([signed(peer)], now=10.0)
    store.observe(peer.peer_id, "ok", ttft_s=0.1, tokens_per_s=50.0, now=11.0)
    store.close()
    again = Store.open(tmp_path)
    assert again.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    applied = again.db.execute("select count(*) from _sqlite_migrations").fetchone()[0]
    assert applied == 3  # m001_peers_and_observations, m002_verdicts, m003_guards
    assert [r.peer_id for r in again.known_records()] == [peer.peer_id]
    assert again.standing(peer.peer_id).asks_ok == 1
    again.saw_peers([signed(peer)], now=20.0)
    row = again.db["peers"].get(peer.peer_id)
    assert row["first_seen"] == 10.0 and row["last_seen"] == 20.0
    again.close()
    # readable by plain sqlite3 too: nothing exotic on disk
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("select count(*) from observations").fetchone()[0] == 1


def test_failures_are_avoided_then_forgiven(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    peer = Identity.generate().peer_id
    store.observe(peer, "ok", now=100.0)
    store.observe(peer, "timeout", now=200.0)
    store.observe(peer, "failed", now=201.0)
    standing = store.standing(peer)
    assert standing.consecutive_failures == 2 and standing.asks_failed == 2 and standing.asks_ok == 1
    assert standing.avoided(210.0) and not standing.avoided(201.0 + 2 * rep.BACKOFF_BASE_S + 1)
    store.observe(peer, "ok", now=300.0)
    forgiven = store.standing(peer)
    assert forgiven.consecutive_failures == 0 and not forgiven.avoided(300.0)
    assert forgiven.reputation < rep.combined(0.5, rep.reliability_from_outcomes([True, True, True, True]))
    with pytest.raises(ValueError):
        store.observe(peer, "exploded")
    store.close()


def test_choice_prefers_usable_reputable_idle(tmp_path: Path) -> None:
    good = rep.PeerStanding("a", 0.8, 5, 0, 0, 0.0, None, None)
    avoided = rep.PeerStanding("b", 0.9, 5, 1, 1, 1e12, None, None)
    untrusted = rep.PeerStanding("c", 0.1, 0, 9, 0, 0.0, None, None)
    now = time.time()
    assert rep.choice_key(good, 0, now) < rep.choice_key(avoided, 0, now) < rep.choice_key(untrusted, 0, now)
    assert rep.choice_key(good, 0, now) < rep.choice_key(good, 3, now)
    assert rep.choice_key(None, 0, now) < rep.choice_key(avoided, 0, now)
