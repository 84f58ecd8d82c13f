"""The local store under concurrency and on failing disks: real processes, real SQLite files, no mocks."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from gtorrent.errors import StoreError
from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord
from gtorrent.store import DB_NAME, Store

WORKERS = 50
OBSERVATIONS_EACH = 10
SHARED_PEERS = 5


def signed(identity: Identity, port: int = 9) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint=f"tcp://127.0.0.1:{port}", roles=("seed",), seq=1, expires=time.time() + 600)


def _worker(home: Path, index: int, shared: list[PeerRecord], own: PeerRecord, start: Any, errors: Any) -> None:
    """One process of the crowd: open the store on a new home with the others, then write and read."""
    try:
        start.wait(30)
        store = Store.open(home)
        try:
            for n in range(OBSERVATIONS_EACH):
                store.saw_peers([*shared, own], now=1000.0 + index)
                store.observe(own.peer_id, "ok" if n % 2 else "failed", ttft_s=0.1, detail=f"{index}/{n}")
                store.standing(own.peer_id)
        finally:
            store.close()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        errors.put(f"worker {index}: {traceback.format_exc()}")
        raise


@pytest.mark.timeout(180)
def test_fifty_processes_share_one_new_store(tmp_path: Path) -> None:
    """All open a store that does not exist yet (migrations race too) and write at once: no failure."""
    home = tmp_path / "shared"
    shared = [signed(Identity.generate()) for _ in range(SHARED_PEERS)]
    own = [signed(Identity.generate(), port=1000 + i) for i in range(WORKERS)]
    ctx = multiprocessing.get_context("fork")  # fork: 50 interpreters starting at once would dwarf the test
    start = ctx.Event()
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(home, i, shared, own[i], start, errors)) for i in range(WORKERS)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(150)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [], failures[0]
    assert [proc.exitcode for proc in procs] == [0] * WORKERS

    store = Store.open(home)
    try:
        db = store.db
        assert db.execute("select count(*) from observations").fetchall()[0][0] == WORKERS * OBSERVATIONS_EACH
        assert db.execute("select count(*) from peers").fetchall()[0][0] == WORKERS + SHARED_PEERS
        migrated = db.execute("select name from _sqlite_migrations order by rowid").fetchall()
        assert [name for (name,) in migrated] == ["m001_peers_and_observations", "m002_verdicts", "m003_guards",
                                                  "m004_signed_verdicts", "m005_verdicts_per_model",
                                                  "m006_verdict_judges"]  # once each
        for record in shared:  # first and last sightings survive any commit order
            row = db["peers"].get(record.peer_id)
            assert (row["first_seen"], row["last_seen"]) == (1000.0, 1000.0 + WORKERS - 1)
        for record in own:
            standing = store.standing(record.peer_id)
            assert (standing.asks_ok, standing.asks_failed) == (OBSERVATIONS_EACH // 2, OBSERVATIONS_EACH // 2)
    finally:
        store.close()


def test_sightings_keep_first_seen_and_newest_record(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    peer = Identity.generate()
    store.saw_peers([signed(peer, port=1)], now=20.0)
    store.saw_peers([signed(peer, port=2)], now=10.0)  # an older sighting committed late
    store.saw_peers(iter([signed(peer, port=3)]), now=30.0)  # any iterable
    row = store.db["peers"].get(peer.peer_id)
    assert (row["first_seen"], row["last_seen"], row["endpoint"]) == (10.0, 30.0, "tcp://127.0.0.1:3")
    store.saw_peers([signed(peer, port=4)], now=25.0)
    assert store.db["peers"].get(peer.peer_id)["endpoint"] == "tcp://127.0.0.1:3"
    store.close()


def test_a_full_database_is_a_store_error(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    pages = store.db.execute("pragma page_count").fetchall()[0][0]
    store.db.execute(f"pragma max_page_count = {pages}")  # SQLite's own limit: SQLITE_FULL as on a full disk
    with pytest.raises(StoreError) as caught:
        for n in range(10_000):
            store.observe("p" * 26, "ok", detail="x" * 400 + str(n))
    assert "is full" in caught.value.message and str(tmp_path / DB_NAME) in caught.value.message
    assert caught.value.hint is not None and "GTORRENT_HOME" in caught.value.hint
    assert not store.db.conn.in_transaction  # rolled back: the connection stays usable for reads
    store.standing("p" * 26)
    store.close()


def test_a_damaged_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not a database, just bytes " * 200)
    with pytest.raises(StoreError) as caught:
        Store.open(tmp_path)
    assert "is damaged" in caught.value.message and caught.value.hint is not None
    assert "move it aside" in caught.value.hint and "GTORRENT_HOME" in caught.value.hint


def test_a_lock_held_past_the_retries_is_a_store_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gtorrent.store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.05)
    monkeypatch.setattr(store_module, "BUSY_BACKOFF_S", 0.01)
    store = Store.open(tmp_path)
    holder = sqlite3.connect(tmp_path / DB_NAME)
    holder.execute("begin immediate")  # another process's writer that never finishes
    try:
        with pytest.raises(StoreError) as caught:
            store.observe("p" * 26, "ok")
        assert "stayed locked" in caught.value.message
    finally:
        holder.rollback()
        holder.close()
    store.observe("p" * 26, "ok")  # and works once the lock is gone
    assert store.standing("p" * 26).asks_ok == 1
    store.close()
