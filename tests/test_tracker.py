"""Tracker rules over real sockets and a real SQLite file: forged, replayed and expired announces are
refused; a restart keeps the table; several trackers merge; garbage never stops a tracker or a seed.

A full disk is simulated by SQLite itself: `PRAGMA max_page_count` set to the database's current size
makes every write that needs a new page fail with SQLITE_FULL ("database or disk is full"), exactly as
on a full disk; `PRAGMA query_only` makes every write fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gtorrent.discovery import TrackerClient, TrackerRejected, discover
from gtorrent.identity import Identity
from gtorrent.protocol import MAX_MESSAGE_BYTES, ModelInfo, PeerRecord, ProtocolError, encode
from gtorrent.runtime import LanguageModel
from gtorrent.runtime.files import bundled_model_path
from gtorrent.seed import SeedService
from gtorrent.tracker import TrackerDatabase, TrackerService, TrackerTable
from gtorrent.transport import Connection

pytestmark = pytest.mark.timeout(60)

MODEL = ModelInfo("cd" * 32, "demo", 512)


def record(identity: Identity, seq: int = 1, ttl_s: float = 60.0, **extra: object) -> PeerRecord:
    return PeerRecord.sign(
        identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=(MODEL,), seq=seq,
        expires=time.time() + ttl_s, **extra,  # type: ignore[arg-type]
    )


class Running:
    def __init__(self, service: TrackerService, task: asyncio.Task[None]) -> None:
        self.service, self.task = service, task
        self.stopped = False

    @property
    def url(self) -> str:
        return self.service.url

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.service.close()


async def start(db: Path | None = None, identity: Identity | None = None, bind: str = "tcp://127.0.0.1:0", **options: Any) -> Running:
    service = TrackerService(identity or Identity.generate(), db, **options)
    # any free CurveZMQ port: a restart on a known bootstrap port would otherwise take that port + 1, which
    # another test's socket may hold (test_tracker_ports covers the default)
    service.bind(bind, curve_port=0)
    return Running(service, asyncio.create_task(service.serve()))


def test_table_rules_with_injected_clock() -> None:
    now = [1000.0]
    table = TrackerTable(clock=lambda: now[0])
    peer = Identity.generate()
    first = PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=5, expires=1060.0)
    table.accept(first)
    for bad, code in [
        (PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=5, expires=1070.0), "replay"),
        (PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=4, expires=1070.0), "replay"),
        (PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=9, expires=999.0), "expired"),
        (PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=9, expires=1e9), "ttl"),
    ]:
        with pytest.raises(Exception) as info:
            table.accept(bad)
        assert getattr(info.value, "code", None) == code
    stop = PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=6, expires=1060.0, stopped=True)
    table.accept(stop)
    assert table.query() == []
    with pytest.raises(Exception, match="not above"):
        table.accept(first)  # the stopped peer's old record cannot be replayed back in
    now[0] = 2000.0
    assert table.expire() == 1 and table.entries == {}


async def test_forged_replayed_expired_announces_refused(tmp_path: Path, ctx) -> None:  # type: ignore[no-untyped-def]
    tracker = await start(tmp_path / "t.db")
    client = TrackerClient(ctx, tracker.url)
    peer = Identity.generate()
    good = record(peer, seq=10)
    assert (await client.announce(good))["peers"] == 1
    with pytest.raises(TrackerRejected) as replay:
        await client.announce(good)
    assert replay.value.code == "replay"
    with pytest.raises(TrackerRejected) as old:
        await client.announce(record(peer, seq=3))
    assert old.value.code == "replay"
    with pytest.raises(TrackerRejected) as expired:
        await client.announce(record(peer, seq=11, ttl_s=-1))
    assert expired.value.code == "expired"
    forged = good.to_wire()
    forged["endpoint"] = "tcp://127.0.0.1:6666"  # a tracker or a man in the middle redirecting traffic
    forged["seq"] = 99
    tracker_record = await client._tracker_record()
    async with Connection(ctx, tracker_record.endpoint, server_key=tracker_record.curve_key) as conn:
        reply = await conn.request("announce", {"record": forged}, frozenset({"error", "announce_ok"}), 3)
    assert reply.kind == "error" and reply["code"] == "invalid"
    listed = await client.query(model="demo")
    assert [r.endpoint for r in listed] == ["tcp://127.0.0.1:9"]
    assert tracker.service.counters["dropped"] == 4
    await tracker.stop()


async def test_restart_keeps_records(tmp_path: Path, ctx) -> None:  # type: ignore[no-untyped-def]
    identity = Identity.generate()
    tracker = await start(tmp_path / "t.db", identity)
    peers = [Identity.generate() for _ in range(3)]
    client = TrackerClient(ctx, tracker.url)
    for peer in peers:
        await client.announce(record(peer, seq=7))
    await client.announce(record(peers[2], seq=8, stopped=True))
    url = tracker.url
    await tracker.stop()
    again = await start(tmp_path / "t.db", identity, bind=url)
    assert again.service.loaded == 3  # two records and one tombstone
    found = await TrackerClient(ctx, url).query()
    assert sorted(r.peer_id for r in found) == sorted(p.peer_id for p in peers[:2])
    with pytest.raises(TrackerRejected):  # the sequence survived the restart too
        await TrackerClient(ctx, url).announce(record(peers[0], seq=7))
    await again.stop()


async def test_two_trackers_merged_and_pinned(tmp_path: Path, ctx) -> None:  # type: ignore[no-untyped-def]
    one, two = await start(None), await start(None)
    a, b, both = Identity.generate(), Identity.generate(), Identity.generate()
    await TrackerClient(ctx, one.url).announce(record(a))
    await TrackerClient(ctx, two.url).announce(record(b))
    await TrackerClient(ctx, one.url).announce(record(both, seq=1))
    newer = PeerRecord.sign(both, endpoint="tcp://127.0.0.1:77", roles=("seed",), models=(MODEL,), seq=2, expires=time.time() + 60)
    await TrackerClient(ctx, two.url).announce(newer)
    found = await discover(ctx, [one.url, two.url], model="demo")
    assert set(found.records) == {a.peer_id, b.peer_id, both.peer_id}
    assert found.records[both.peer_id].endpoint == "tcp://127.0.0.1:77"  # highest sequence wins
    pinned = f"{one.url}#{one.service.identity.peer_id}"
    assert len(await TrackerClient(ctx, pinned).query()) == 2
    wrong = f"{one.url}#{two.service.identity.peer_id}"
    with pytest.raises(Exception, match="not the pinned"):
        await TrackerClient(ctx, wrong).query()
    await one.stop()
    await two.stop()


def tcp_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def send_raw_tcp(port: int, payloads: list[bytes]) -> None:
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            try:
                sock.sendall(payload)
                sock.settimeout(0.2)
                sock.recv(64)
            except OSError:
                pass


def garbage(rng: random.Random) -> list[bytes]:
    valid = encode("query", {"model": "demo"})[0]
    return [
        rng.randbytes(rng.randint(1, 2000)),
        b"\xff" + rng.randbytes(9) + b"\x7f",  # a ZMTP greeting, truncated
        valid[: len(valid) // 2],
        b"\x00" * 70_000,
    ]


async def test_garbage_frames_leave_tracker_and_seed_serving(tmp_path: Path, ctx) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    tracker = await start(tmp_path / "t.db")
    model = LanguageModel.load(None)
    seed = SeedService(Identity.generate(), model, trackers=[tracker.url])
    seed.bind("tcp://127.0.0.1:0")
    serving = asyncio.create_task(seed.serve())
    await seed.announce()
    tracker_record = await TrackerClient(ctx, tracker.url)._tracker_record()
    # 1) raw bytes at the TCP level, on every port
    for port in (tcp_port(tracker.url), tcp_port(tracker_record.endpoint), tcp_port(seed.server.endpoint)):
        await asyncio.to_thread(send_raw_tcp, port, garbage(rng))
    # 2) well-framed but malformed, truncated, unknown or oversized messages over real (Curve) links
    bad_messages = [
        [rng.randbytes(100)],
        [b'{"v":1,"t":"announce"}'],
        [
            b'{"v":1,"t":"generate","id":"x","model":"demo","prompt":"hi","max_tokens":-5,'
            b'"temperature":0,"top_k":0,"top_p":1}'
        ],
        [json.dumps({"v": 2, "t": "ping"}).encode()],
        [b'{"v":1,"t":"query","model":"' + b"x" * 300_000 + b'"}'],
        [b"{}"] * 20,
        [b'{"v":1,"t":"hello","x":' + b"1" * 5000 + b"}"],  # int() limit: a ValueError, not JSON error
    ]
    targets = [
        (tracker.url, None),
        (tracker_record.endpoint, tracker_record.curve_key),
        (seed.server.endpoint, seed.identity.curve_public),
    ]
    for endpoint, key in targets:
        async with Connection(ctx, endpoint, server_key=key) as conn:
            for frames in bad_messages:
                if len(frames[0]) > MAX_MESSAGE_BYTES:
                    continue  # sent last, on its own: the transport may cut a connection that sends it
                await conn.sock.send_multipart(frames)
            assert (await conn.request("ping" if key else "hello", {}, frozenset({"pong", "hello_ok"}), 5)).kind
        async with Connection(ctx, endpoint, server_key=key) as conn:
            await conn.sock.send_multipart([frames for frames in bad_messages if len(frames[0]) > MAX_MESSAGE_BYTES][0])
        async with Connection(ctx, endpoint, server_key=key) as conn:  # the node still serves new ones
            assert (await conn.request("ping" if key else "hello", {}, frozenset({"pong", "hello_ok"}), 5)).kind
    # both still serve real requests
    found = await discover(ctx, [tracker.url], model="gtorrent-demo")
    assert seed.identity.peer_id in found.records
    async with Connection(ctx, seed.server.endpoint, server_key=seed.identity.curve_public) as conn:
        body = {"id": "r1", "model": "gtorrent-demo", "prompt": "The", "max_tokens": 3, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
        kinds = frozenset({"accepted", "token", "done", "error"})
        assert (await conn.request("generate", body, kinds, 5)).kind == "accepted"
        while (await conn.recv(10, kinds)).kind != "done":
            pass
    assert tracker.service.counters["dropped"] + tracker.service.counters.get("bootstrap_dropped", 0) >= 4
    assert seed.server.counters["dropped"] >= 4
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    seed.close()
    await tracker.stop()


async def test_query_answer_stays_bounded_with_many_large_records(tmp_path: Path, ctx) -> None:  # type: ignore[no-untyped-def]
    tracker = await start(None)
    client = TrackerClient(ctx, tracker.url)
    models = tuple(ModelInfo(f"{i:02x}" * 32, "x" * 62 + f"{i:02d}", 512) for i in range(8))  # longest names
    load = {f"{i:02d}" + "k" * 30: 1.0 for i in range(16)}
    for _ in range(130):  # ~2.5 KB each: ~320 KB in all, over the 192 KB budget
        peer = Identity.generate()
        await client.announce(PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=models,
                                              load=load, seq=1, expires=time.time() + 60))
    found = await client.query()
    assert 50 <= len(found) < 130  # answered, truncated to the byte budget
    await tracker.stop()


def test_database_files_are_private(tmp_path: Path) -> None:
    from gtorrent.store import Store
    from gtorrent.tracker import TrackerDatabase

    store = Store.open(tmp_path / "home")
    store.observe("p", "ok")
    db = TrackerDatabase(tmp_path / "home" / "tracker.db")
    for path in (tmp_path / "home").iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    store.close()
    db.close()


async def test_seed_stops_generating_for_an_asker_that_left(ctx) -> None:  # type: ignore[no-untyped-def]
    seed = SeedService(Identity.generate(), LanguageModel.load(None), trackers=[])
    seed.bind("tcp://127.0.0.1:0")
    serving = asyncio.create_task(seed.serve())
    kinds = frozenset({"accepted", "token", "done", "error"})
    body = {"id": "r1", "model": "gtorrent-demo", "prompt": "The for statement", "max_tokens": 450,
            "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    conn = Connection(ctx, seed.server.endpoint, server_key=seed.identity.curve_public)
    assert (await conn.request("generate", body, kinds, 5)).kind == "accepted"
    assert (await conn.recv(10, kinds)).kind == "token"
    conn.close()  # the asker goes away mid-answer
    deadline = asyncio.get_running_loop().time() + 10
    while seed.cancelled == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)  # waits on the seed's state, bounded; nothing to await directly
    assert seed.cancelled == 1 and seed.load.running == 0
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    seed.close()


# --------------------------------------------------------------------------- full disk

BIG_MODELS = tuple(ModelInfo(f"{i:02x}" * 32, "m" * 62 + f"{i:02d}", 512) for i in range(8))


def big_record(identity: Identity, seq: int = 1, stopped: bool = False) -> PeerRecord:
    """A ~2 KB record: a few fill a database page, so a capped database fills up quickly."""
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=BIG_MODELS, seq=seq,
                           expires=time.time() + 600, stopped=stopped)


def fill_disk(db: TrackerDatabase) -> None:
    """Let the database grow no further: writes that need a new page fail with SQLITE_FULL."""
    pages = db.db.execute("PRAGMA page_count").fetchone()[0]
    db.db.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(db: TrackerDatabase) -> None:
    db.db.execute("PRAGMA max_page_count = 1073741823")


async def ids_listed(ctx: object, url: str) -> set[str]:
    return {r.peer_id for r in await TrackerClient(ctx, url).query()}  # type: ignore[arg-type]


async def poll(condition: Any, timeout_s: float = 10.0) -> None:
    """Wait for a condition of the tracker's state, bounded (nothing to await directly)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_staged_changes_are_undone_when_the_commit_fails() -> None:
    now = [1000.0]
    table = TrackerTable(clock=lambda: now[0])
    p, q, r = (Identity.generate() for _ in range(3))

    def signed(peer: Identity, seq: int, stopped: bool = False) -> PeerRecord:
        return PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=seq, expires=1060.0, stopped=stopped)

    table.accept(signed(p, 1))
    table.accept(signed(q, 1))
    table.dirty = {q.peer_id}  # as if q's last save had failed
    before = dict(table.entries)
    with pytest.raises(sqlite3.OperationalError):
        with table.staged():
            table.accept(signed(p, 2, stopped=True))  # a tombstone
            table.accept(signed(r, 1))  # a new peer
            table.accept(signed(q, 2))  # a refresh
            raise sqlite3.OperationalError("database or disk is full")  # the commit of the burst
    assert table.entries == before and table.live == 2
    assert table.dirty == {q.peer_id}  # the failed burst's marks are gone, the earlier one is kept
    assert {rec.peer_id for rec in table.query()} == {p.peer_id, q.peer_id}
    table.accept(signed(p, 2, stopped=True))  # its sequence was not consumed by the undone burst
    assert table.live == 1


def test_failed_flush_keeps_what_was_dirty_for_the_next_try(tmp_path: Path) -> None:
    db = TrackerDatabase(tmp_path / "t.db")
    table = TrackerTable()
    peers = [Identity.generate() for _ in range(20)]
    for peer in peers:
        table.accept(big_record(peer))
    fill_disk(db)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        db.flush(table)
    assert table.dirty == {peer.peer_id for peer in peers}
    free_disk(db)
    db.flush(table)  # the next successful commit persists them
    assert not table.dirty
    db.close()
    again = TrackerTable()
    assert TrackerDatabase(tmp_path / "t.db").load_into(again) == 20 and again.live == 20


async def test_announce_refused_on_a_full_disk_is_not_served(tmp_path: Path, ctx, caplog, launch) -> None:  # type: ignore[no-untyped-def]
    identity = Identity.generate()
    tracker = await launch(tmp_path / "t.db", identity)
    assert tracker.service.database is not None
    client = TrackerClient(ctx, tracker.url)
    acknowledged = []
    for _ in range(3):
        peer = Identity.generate()
        await client.announce(big_record(peer))
        acknowledged.append(peer.peer_id)
    fill_disk(tracker.service.database)
    refused: tuple[PeerRecord, TrackerRejected] | None = None
    with caplog.at_level(logging.ERROR, logger="gtorrent.tracker"):
        for _ in range(50):  # the pages already allocated may hold a few more
            candidate = big_record(Identity.generate())
            try:
                await client.announce(candidate)
            except TrackerRejected as exc:
                refused = (candidate, exc)
                break
            acknowledged.append(candidate.peer_id)
    assert refused is not None
    record_refused, error = refused
    assert error.code == "storage" and "the tracker's disk is full" in error.message
    assert "disk is full" in caplog.text
    # memory agrees with the disk: the refused record is not served, the acknowledged ones still are
    assert await ids_listed(ctx, tracker.url) == set(acknowledged)
    assert tracker.service.table.active_count() == len(acknowledged) and not tracker.service.table.dirty
    free_disk(tracker.service.database)
    await client.announce(record_refused)  # no trace was left: not even its sequence
    acknowledged.append(record_refused.peer_id)
    url = tracker.url
    await tracker.stop()
    again = await launch(tmp_path / "t.db", identity, bind=url)
    assert await ids_listed(ctx, url) == set(acknowledged)
    await again.stop()


async def test_expiry_loop_survives_a_failing_flush(tmp_path: Path, ctx, launch) -> None:  # type: ignore[no-untyped-def]
    now = [time.time()]
    identity = Identity.generate()
    tracker = await launch(tmp_path / "t.db", identity, clock=lambda: now[0], expire_interval_s=0.02)
    database = tracker.service.database
    assert database is not None
    client = TrackerClient(ctx, tracker.url)
    short, long = Identity.generate(), Identity.generate()
    await client.announce(record(short, ttl_s=30))
    await client.announce(record(long, ttl_s=3000))
    database.db.execute("PRAGMA query_only = 1")  # from now on every write fails (SQLITE_READONLY)
    now[0] += 60  # `short` expires: the next sweep must delete it and cannot
    await poll(lambda: tracker.service.storage_errors >= 2)  # the loop went round after a failure
    assert not tracker.task.done()
    assert await ids_listed(ctx, tracker.url) == {long.peer_id}  # still answering
    with pytest.raises(TrackerRejected) as refused:
        await client.announce(record(Identity.generate()))
    assert refused.value.code == "storage"
    assert short.peer_id in tracker.service.table.dirty  # kept for the next try
    database.db.execute("PRAGMA query_only = 0")
    await poll(lambda: not tracker.service.table.dirty)  # the loop retried and saved the expiry
    url = tracker.url
    await tracker.stop()
    again = await launch(tmp_path / "t.db", identity, bind=url)
    assert again.service.loaded == 1  # `short` is gone from the disk too (its record would still verify)
    await again.stop()


async def test_restart_after_a_full_disk_has_exactly_what_was_acknowledged(tmp_path: Path, ctx, launch) -> None:  # type: ignore[no-untyped-def]
    identity = Identity.generate()
    tracker = await launch(tmp_path / "t.db", identity)
    assert tracker.service.database is not None
    early = [Identity.generate() for _ in range(4)]
    for peer in early:
        await TrackerClient(ctx, tracker.url).announce(big_record(peer))
    fill_disk(tracker.service.database)

    async def announce(rec: PeerRecord) -> bool:
        try:
            await TrackerClient(ctx, tracker.url).announce(rec)
        except TrackerRejected as exc:
            assert exc.code == "storage"
            return False
        return True

    late = [Identity.generate() for _ in range(30)]
    results = await asyncio.gather(
        *(announce(big_record(peer)) for peer in late),
        announce(big_record(early[0], seq=2, stopped=True)),
        announce(big_record(early[1], seq=2)),
    )
    assert not all(results[:-2])
    acknowledged = {peer.peer_id for peer in early[1:]} | {peer.peer_id for peer, ok in zip(late, results, strict=False) if ok}
    if not results[-2]:  # the withdrawal was refused: early[0] is still listed
        acknowledged.add(early[0].peer_id)
    assert await ids_listed(ctx, tracker.url) == acknowledged
    url = tracker.url
    await tracker.stop()  # close() on a full disk does not raise
    again = await launch(tmp_path / "t.db", identity, bind=url)
    assert await ids_listed(ctx, url) == acknowledged
    for peer, ok in zip(late, results, strict=False):
        if not ok:  # a refused announce left nothing behind, its sequence included
            await TrackerClient(ctx, url).announce(big_record(peer))
    assert await ids_listed(ctx, url) == acknowledged | {peer.peer_id for peer in late}
    await again.stop()


async def test_table_size_is_capped(ctx, launch) -> None:  # type: ignore[no-untyped-def]
    tracker = await launch(None, max_entries=3)
    client = TrackerClient(ctx, tracker.url)
    peers = [Identity.generate() for _ in range(4)]
    for peer in peers[:3]:
        await client.announce(record(peer, seq=1))
    with pytest.raises(TrackerRejected) as full:
        await client.announce(record(peers[3], seq=1))
    assert full.value.code == "capacity" and "maximum of 3 peers" in full.value.message
    await client.announce(record(peers[0], seq=2))  # known peers still refresh
    await client.announce(record(peers[1], seq=2, stopped=True))  # and withdraw (the tombstone holds its slot)
    with pytest.raises(TrackerRejected):
        await client.announce(record(peers[3], seq=1))
    assert await ids_listed(ctx, tracker.url) == {peers[0].peer_id, peers[2].peer_id}
    await tracker.stop()


# --------------------------------------------------------------------------- model names

BAD_NAMES = ["[/x]", "evil\x1b]0;pwned\x07", "red\x1b[31m", "two\nlines", "trailing\n", "", "x" * 65, " lead", "-flag", "naïve"]
BAD_IDS = ["CD" * 32, "cd" * 31, "zz" * 32, "cd" * 31 + "c\n"]  # the last: 64 characters, ending in a newline


@pytest.mark.parametrize("name", BAD_NAMES)
def test_record_with_a_bad_model_name_is_dropped(name: str) -> None:
    bad = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",),
                          models=(ModelInfo("cd" * 32, name, 512),), seq=1, expires=time.time() + 60)
    with pytest.raises(ProtocolError, match="name"):
        PeerRecord.from_wire(bad.to_wire())


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_record_with_a_bad_model_id_is_dropped(model_id: str) -> None:
    bad = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",),
                          models=(ModelInfo(model_id, "demo", 512),), seq=1, expires=time.time() + 60)
    with pytest.raises(ProtocolError, match="model_id"):
        PeerRecord.from_wire(bad.to_wire())


def test_record_endpoint_with_a_final_newline_is_dropped() -> None:
    bad = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9\n", roles=("seed",), seq=1,
                          expires=time.time() + 60)
    with pytest.raises(ProtocolError, match="endpoint"):
        PeerRecord.from_wire(bad.to_wire())


async def test_tracker_refuses_bad_model_names_and_keeps_good_ones(ctx, launch) -> None:  # type: ignore[no-untyped-def]
    tracker = await launch(None)
    client = TrackerClient(ctx, tracker.url)
    for name in ["[/x]", "evil\x1b]0;pwned\x07", "two\nlines"]:
        bad = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",),
                              models=(ModelInfo("cd" * 32, name, 512),), seq=1, expires=time.time() + 60)
        with pytest.raises(TrackerRejected) as refused:
            await client.announce(bad)
        assert refused.value.code == "invalid"
    good = Identity.generate()
    odd_but_fine = "Qwen/Qwen2.5-0.5B_v1.2@org+q4:8b"
    await client.announce(PeerRecord.sign(good, endpoint="tcp://127.0.0.1:9", roles=("seed",),
                                          models=(ModelInfo("cd" * 32, odd_but_fine, 512),), seq=1,
                                          expires=time.time() + 60))
    assert [r.peer_id for r in await client.query()] == [good.peer_id]
    assert [r.peer_id for r in await client.query(model=odd_but_fine)] == [good.peer_id]
    await tracker.stop()


@pytest.mark.parametrize("name", ["[/x]", "evil\x1b]0;x\x07", "two\nlines"])
def test_seed_refuses_a_bad_name_before_loading(cli, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("seed", str(tmp_path / "no-such-model"), "--name", name)
    assert result.code == 2, result
    assert "error: cannot announce the model name" in result.err and "hint: pass --name" in result.err
    assert "no-such-model" not in result.err  # refused before the model was looked for
    assert "\x1b" not in result.err and "\x07" not in result.err


def test_seed_refuses_a_folder_name_that_is_not_a_model_name(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "my model [v2]"
    folder.mkdir()
    for file in bundled_model_path().iterdir():
        (folder / file.name).symlink_to(file)
    result = cli("seed", str(folder))
    assert result.code == 2, result
    assert "cannot announce the folder name" in result.err and "--name" in result.err


def test_close_does_not_raise_when_the_last_flush_fails(tmp_path: Path) -> None:
    now = [time.time()]
    service = TrackerService(Identity.generate(), tmp_path / "t.db", clock=lambda: now[0])
    assert service.database is not None
    peer = Identity.generate()
    service.table.accept(record(peer, ttl_s=30))
    service.database.flush(service.table)
    service.database.db.execute("PRAGMA query_only = 1")  # the disk cannot take the last write
    now[0] += 60
    assert service.table.expire() == 1  # a deletion left for close() to save
    service.close()  # logs, does not raise
    again = TrackerService(Identity.generate(), tmp_path / "t.db", clock=lambda: now[0])
    assert again.loaded == 1 and again.table.query() == [] and not again.table.dirty  # expired at start
    again.close()
    last = TrackerService(Identity.generate(), tmp_path / "t.db", clock=lambda: now[0])
    assert last.loaded == 0  # and the deletion was saved then
    last.close()
