"""Tracker rules over real sockets and a real SQLite file: forged, replayed and expired announces are
refused; a restart keeps the table; several trackers merge; garbage never stops a tracker or a seed."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gtorrent.discovery import TrackerClient, TrackerRejected, discover
from gtorrent.identity import Identity
from gtorrent.protocol import ModelInfo, PeerRecord, encode
from gtorrent.runtime import LanguageModel
from gtorrent.seed import SeedService
from gtorrent.tracker import TrackerService, TrackerTable
from gtorrent.transport import Connection, new_context

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

    @property
    def url(self) -> str:
        return self.service.url

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.service.close()


async def start(db: Path | None, identity: Identity | None = None, bind: str = "tcp://127.0.0.1:0") -> Running:
    service = TrackerService(identity or Identity.generate(), db)
    service.bind(bind)
    return Running(service, asyncio.create_task(service.serve()))


@pytest.fixture
async def ctx() -> AsyncIterator[object]:
    context = new_context()
    yield context
    context.destroy(linger=0)


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
                await conn.sock.send_multipart(frames)
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
    models = tuple(ModelInfo(f"{i:02x}" * 32, "x" * 100 + str(i), 512) for i in range(8))
    for _ in range(130):  # ~1.9 KB each: ~250 KB in all, over the 192 KB budget
        peer = Identity.generate()
        await client.announce(PeerRecord.sign(peer, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=models,
                                              seq=1, expires=time.time() + 60))
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
