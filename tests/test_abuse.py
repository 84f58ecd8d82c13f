"""Floods and oversized input against bounded state: the replay caches of relays and seeds (a flood
costs the flooder, not everyone), a seed's incomplete private asks, and an asker's reply buffers."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

import gtorrent.seed as seed_module
from gtorrent.garlic import (
    MAX_REPLY_BUFFER_BYTES,
    REPLY_HEAD,
    REPLY_WINDOW_CHUNKS,
    ReplyAssembler,
    clove_payloads,
    reply_payloads,
)
from gtorrent.identity import Identity, b64
from gtorrent.onion import DATA, ReplayCache
from gtorrent.runtime import LanguageModel
from gtorrent.seed import SeedService
from gtorrent.sida import split

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- replay cache (pure)

# (operation, value, stamp or None, clock now, expected result)
STAMPED_FLOOD = [
    ("add", b"a", 100.0, 100.0, True),
    ("add", b"a", 100.0, 100.0, False),  # a replay
    ("add", b"b", 101.0, 101.0, True),
    ("add", b"c", 102.0, 102.0, True),
    ("add", b"d", 103.0, 103.0, True),  # full now (4)
    ("add", b"e", 104.0, 104.0, True),  # the oldest bucket (a) goes; the floor rises to its stamp, 100
    ("add", b"a", 100.0, 104.0, False),  # the replay of a dropped entry is at the floor: refused
    ("add", b"z", 100.5, 104.0, False),  # full, and older than everything kept: refused, nothing dropped
    ("add", b"b", 101.0, 104.0, False),  # b is still remembered
    ("add", b"f", 104.2, 104.2, True),  # a fresh stamp is served (b goes, the floor rises to 101)
    ("add", b"y", 101.0, 104.2, False),
    ("add", b"g", 200.0, 200.0, True),  # later: everything stamped before 190 expired (ttl 10 s)
    ("add", b"e", 104.0, 200.0, True),  # expired and forgotten (a relay's own window refuses so old a stamp)
    ("add", b"x", 100.9, 200.0, False),  # the floor stays where the flood pushed it
    ("add", b"h", 199.0, 200.0, True),
]

UNSTAMPED_FLOOD = [  # arrival time is the stamp; no floor: the oldest are evicted, new values always fit
    ("add", b"a", None, 0.0, True),
    ("add", b"a", None, 0.5, False),
    ("add", b"b", None, 1.0, True),
    ("add", b"c", None, 2.0, True),
    ("add", b"d", None, 3.0, True),
    ("add", b"e", None, 4.0, True),  # full: a (the oldest) is evicted
    ("add", b"d", None, 4.0, False),  # recent ones are still refused
    ("add", b"a", None, 4.0, True),  # a was evicted: accepted again (safe for late cloves: seconds apart)
    ("add", b"x", None, 20.0, True),  # everything older than 10 s expired
    ("add", b"e", None, 20.0, True),
]


@pytest.mark.parametrize("table", [STAMPED_FLOOD, UNSTAMPED_FLOOD], ids=["stamped", "unstamped"])
def test_replay_cache_table(table: list[tuple[str, bytes, float | None, float, bool]]) -> None:
    now = [0.0]
    cache = ReplayCache(ttl_s=10.0, max_entries=4, clock=lambda: now[0], bucket_s=1.0)
    for step, (_, value, stamp, clock, expected) in enumerate(table):
        now[0] = clock
        assert cache.check_and_add(value, stamp) is expected, f"step {step}: {value!r} at {clock}"
        assert len(cache) <= 4


def test_replay_cache_memory_is_bounded_under_a_long_flood() -> None:
    now = [1000.0]
    cache = ReplayCache(ttl_s=720.0, max_entries=1000, clock=lambda: now[0])
    served = 0
    for i in range(20_000):  # 20 floods' worth, 100 a second, each stamped with its arrival time
        now[0] = 1000.0 + i / 100
        served += cache.check_and_add(os.urandom(32), now[0])
        assert len(cache) <= 1000
    assert served == 20_000  # fresh stamps were never refused
    assert cache.evicted >= 19_000 and cache.floor_s > now[0] - 15


# --------------------------------------------------------------------------- relay: CREATE flood


async def test_a_create_flood_that_fills_the_replay_cache_leaves_fresh_creates_served() -> None:
    from gtorrent.circuit import CircuitClient
    from gtorrent.discovery import PeerDirectory
    from gtorrent.relaynode import RelayNode
    from gtorrent.transport import new_context

    ctx = new_context()
    node = RelayNode(Identity.generate(), ctx, [], directory=PeerDirectory())
    node.bind("tcp://127.0.0.1:0")
    await node.start()
    node.relay.replays = ReplayCache(ttl_s=720.0, max_entries=20)
    try:
        for _ in range(30):  # a flood: more fresh CREATEs than the cache holds
            flood = CircuitClient(ctx, [node.record()])
            await flood.build(timeout_s=5)
            await flood.close()
        assert len(node.relay.replays) <= 20 and node.relay.replays.evicted > 0
        honest = CircuitClient(ctx, [node.record()])
        await honest.build(timeout_s=5)  # today's main refused every CREATE once the cache was full
        await honest.close()
    finally:
        node.close()
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------- seed: private-ask flood


@dataclass(eq=False)
class FakeCircuit:
    """The end of a circuit as the seed's terminal handler sees it; records what the seed sends back."""

    terminal_state: Any = None
    closed: bool = False
    sent: list[bytes] = field(default_factory=list)

    async def send_back(self, command: int, data: bytes) -> None:
        assert command == DATA
        self.sent.append(data)


REQUEST = {"model": "gtorrent-demo", "prompt": "The for statement", "max_tokens": 4, "temperature": 0.0,
           "top_k": 0, "top_p": 1.0}


async def send_ask(seed: SeedService, ask_id: bytes, reply_key: bytes, n: int, k: int, cloves: int) -> list[FakeCircuit]:
    request = json.dumps({**REQUEST, "reply_key": b64(reply_key)}, separators=(",", ":")).encode()
    circuits = []
    for clove in split(request, n=n, k=k)[:cloves]:
        circuit = FakeCircuit()
        circuits.append(circuit)
        for payload in clove_payloads(ask_id, clove.to_bytes(), 900):
            await seed.terminal(circuit, DATA, payload)  # type: ignore[arg-type]
    return circuits


async def answer_of(circuits: list[FakeCircuit], reply_key: bytes, timeout_s: float = 30.0) -> dict[str, Any]:
    assembler = ReplyAssembler(reply_key)
    seen = [0] * len(circuits)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        for path, circuit in enumerate(circuits):
            for payload in circuit.sent[seen[path]:]:
                for chunk in assembler.feed(payload, path):
                    if "done" in chunk or "error" in chunk:
                        return chunk
            seen[path] = len(circuit.sent)
        await asyncio.sleep(0.01)  # the seed generates in a worker thread; poll its output, bounded
    raise AssertionError("the seed never answered the ask")


async def test_a_flood_of_private_ask_ids_leaves_fresh_asks_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seed_module, "MAX_PENDING_ASKS", 10)
    seed = SeedService(Identity.generate(), LanguageModel.load(None), trackers=[])
    seed.finished_asks = ReplayCache(ttl_s=300.0, max_entries=50)
    try:
        for _ in range(80):  # asks that never complete (1 clove of k=2), each with a fresh ask id
            await send_ask(seed, os.urandom(16), os.urandom(32), n=2, k=2, cloves=1)
        pending = [ask for ask in seed.private_asks.values() if not ask.started]
        assert len(pending) <= 10 and seed.dropped_asks == 70
        assert len(seed.finished_asks) <= 50
        reply_key = os.urandom(32)
        circuits = await send_ask(seed, os.urandom(16), reply_key, n=2, k=2, cloves=2)
        final = await answer_of(circuits, reply_key)
        assert "done" in final, final  # today's main dropped every new ask once 50 ids were remembered
    finally:
        seed.close()


async def test_a_late_clove_of_an_answered_ask_does_not_start_it_again() -> None:
    seed = SeedService(Identity.generate(), LanguageModel.load(None), trackers=[])
    try:
        ask_id, reply_key = os.urandom(16), os.urandom(32)
        circuits = await send_ask(seed, ask_id, reply_key, n=3, k=2, cloves=2)
        assert "done" in await answer_of(circuits, reply_key)
        served = seed.load.served
        late = await send_ask(seed, ask_id, reply_key, n=3, k=2, cloves=3)
        await asyncio.sleep(0.2)  # nothing to await: asserting that nothing happens
        assert seed.load.served == served and not any(c.sent for c in late) and ask_id not in seed.private_asks
    finally:
        seed.close()


def test_incomplete_asks_are_capped_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seed_module, "MAX_PENDING_ASK_BYTES", 500)

    async def run() -> None:
        seed = SeedService(Identity.generate(), LanguageModel.load(None), trackers=[])
        try:
            for _ in range(20):
                await send_ask(seed, os.urandom(16), os.urandom(32), n=3, k=3, cloves=1)
            held = sum(ask.held_bytes for ask in seed.private_asks.values())
            assert 0 < held <= 500 and seed.dropped_asks > 0
        finally:
            seed.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- asker: reply buffers


def fragments(key: bytes, index: int, n: int = 3, k: int = 2, text: str = "hello") -> list[bytes]:
    return reply_payloads(key, index, {"text": text}, n, k)


def test_reply_fragments_far_ahead_make_the_path_a_suspect_and_are_not_buffered() -> None:
    key = os.urandom(32)
    assembler = ReplyAssembler(key)
    far = REPLY_HEAD.pack(REPLY_WINDOW_CHUNKS + 5, 1, 3, 2, 40) + b"x" * 800
    assert assembler.feed(far, 1) == []
    assert assembler.take_suspects() == {1} and assembler.fragments == {} and assembler.buffered == 0
    # that path is ignored from now on; the other two still deliver every chunk
    for index in range(3):
        parts = fragments(key, index, text=f"chunk {index}")
        assert assembler.feed(parts[1], 1) == []
        assert assembler.feed(parts[0], 0) == []
        assert assembler.feed(parts[2], 2) == [{"text": f"chunk {index}"}]
    assert assembler.buffered == 0


def test_reply_buffer_is_capped_in_bytes() -> None:
    key = os.urandom(32)
    assembler = ReplyAssembler(key)
    # path 0 floods fragments of chunks 1..255 (chunk 0 never comes, so nothing is released)
    flooded = 0
    for index in range(1, REPLY_WINDOW_CHUNKS):
        for _ in range(1):
            payload = REPLY_HEAD.pack(index, 0, 3, 2, 4000) + os.urandom(2000)
            assembler.feed(payload, 0)
            flooded += 1
        assert assembler.buffered <= MAX_REPLY_BUFFER_BYTES
    assert assembler.buffered == (REPLY_WINDOW_CHUNKS - 1) * 2000 <= MAX_REPLY_BUFFER_BYTES
    big = REPLY_HEAD.pack(3, 1, 3, 2, 4000) + os.urandom(MAX_REPLY_BUFFER_BYTES)
    assembler.feed(big, 1)  # would overflow the buffer: path 1 is cut off, nothing of it kept
    assert 1 in assembler.take_suspects() and assembler.buffered <= MAX_REPLY_BUFFER_BYTES
    assert all(from_path != 1 for have in assembler.fragments.values() for from_path, _ in have.values())


def test_reply_assembler_accounting_returns_to_zero() -> None:
    key = os.urandom(32)
    assembler = ReplyAssembler(key)
    out = []
    for index in reversed(range(10)):  # out of order: buffered until chunk 0 arrives
        for path, payload in enumerate(fragments(key, index, text=str(index))):
            out += assembler.feed(payload, path)
    assert [chunk["text"] for chunk in out] == [str(i) for i in range(10)]
    assert assembler.buffered == 0 and assembler.ready == {} and assembler.fragments == {} and assembler.shape == {}


# --------------------------------------------------------------------------- seed: cloves that never finish


async def test_partial_cloves_are_bounded_in_all_and_the_oldest_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each circuit may hold up to 64 KiB of an unfinished clove; across 10,000 circuits that was
    ~640 MB. Now the seed holds a bounded total: past it the circuits with the oldest unfinished
    cloves are cut, and an honest ask (whose cloves complete at once) is still answered."""
    from gtorrent.circuit import CircuitClient, CircuitError
    from gtorrent.onion import forward_capacity
    from gtorrent.transport import new_context

    capacity = forward_capacity(9)
    monkeypatch.setattr(seed_module, "MAX_PARTIAL_CLOVE_BYTES", 4 * capacity)
    ctx = new_context()
    seed = SeedService(Identity.generate(), LanguageModel.load(None), trackers=[])
    seed.bind("tcp://127.0.0.1:0")
    serving = asyncio.create_task(seed.serve())
    circuits: list[CircuitClient] = []
    try:
        for _ in range(12):  # each sends the first piece of a clove and never the rest
            circuit = CircuitClient(ctx, [seed.record()])
            await circuit.build(timeout_s=5)
            await circuit.send(clove_payloads(os.urandom(16), os.urandom(10 * capacity), capacity)[0])
            circuits.append(circuit)
        # the seed handles cells in order on one link each: a full round trip on the last circuit
        # proves every earlier piece has been accounted
        await circuits[-1].send(clove_payloads(os.urandom(16), b"x" * 10, capacity)[0][:5])  # malformed: cut
        with pytest.raises(CircuitError):
            await circuits[-1].receive(5.0)
        assert 0 < seed.assembling_bytes <= 4 * capacity and len(seed.assembling) <= 4
        with pytest.raises(CircuitError, match="never completed"):
            await circuits[0].receive(5.0)  # the oldest unfinished clove was cut
        # an honest ask: two cloves, each whole, over two fresh circuits
        reply_key, ask_id = os.urandom(32), os.urandom(16)
        request = json.dumps({**REQUEST, "reply_key": b64(reply_key)}, separators=(",", ":")).encode()
        honest = []
        for clove in split(request, n=2, k=2):
            circuit = CircuitClient(ctx, [seed.record()])
            await circuit.build(timeout_s=5)
            for payload in clove_payloads(ask_id, clove.to_bytes(), capacity):
                await circuit.send(payload)
            honest.append(circuit)
        assembler = ReplyAssembler(reply_key)
        final: dict[str, Any] | None = None
        while final is None:
            for path, circuit in enumerate(honest):
                _, _, payload = await circuit.receive(30.0)
                for chunk in assembler.feed(payload, path):
                    if "done" in chunk or "error" in chunk:
                        final = chunk
        assert "done" in final, final
        circuits += honest
    finally:
        for circuit in circuits:
            await circuit.close()
        serving.cancel()
        seed.close()
        ctx.destroy(linger=0)


async def test_creates_stamped_at_the_edge_of_the_skew_do_not_shut_out_honest_ones() -> None:
    """A flood of CREATEs stamped 59 s ahead (the relay accepts 60 s of skew) used to raise the
    replay cache's floor above every honest stamp, so no honest CREATE was served. Under ntor a replay
    is harmless, so the cache only drops exact repeats and evicts its oldest when full."""
    from gtorrent.cells import create_body
    from gtorrent.circuit import CircuitClient
    from gtorrent.discovery import PeerDirectory
    from gtorrent.relaynode import RelayNode
    from gtorrent.transport import Connection, new_context

    ctx = new_context()
    node = RelayNode(Identity.generate(), ctx, [], directory=PeerDirectory())
    node.bind("tcp://127.0.0.1:0")
    await node.start()
    node.relay.replays = ReplayCache(ttl_s=720.0, max_entries=20)
    record = node.record()
    flooder = Connection(ctx, record.endpoint, server_key=record.curve_key)
    try:
        ahead_ms = int((time.time() + 59) * 1000)
        for cid in range(1, 61):
            await flooder.send("create", create_body(cid, Identity.generate().onion_public, record.onion_key, ahead_ms))
            answer = await flooder.recv(5.0, frozenset({"created", "destroy"}))
            assert answer.kind == "created"
        assert len(node.relay.replays) <= 20
        # the same CREATE again is dropped, and said so
        await flooder.send("create", create_body(61, b"\x09" * 32, record.onion_key, ahead_ms))
        assert (await flooder.recv(5.0, frozenset({"created", "destroy"}))).kind == "created"
        await flooder.send("create", create_body(62, b"\x09" * 32, record.onion_key, ahead_ms))
        refused = await flooder.recv(5.0, frozenset({"created", "destroy"}))
        assert refused.kind == "destroy" and refused["reason"] == "replayed create"
        for _ in range(5):
            honest = CircuitClient(ctx, [node.record()])
            await honest.build(timeout_s=5)  # stamped now, below every flood stamp
            await honest.close()
    finally:
        flooder.close()
        node.close()
        ctx.destroy(linger=0)
