"""Relays and circuits over real sockets: telescoped circuits through relays, per-link circuit ids,
no plaintext at any relay, replayed CREATEs refused, tampering and idle circuits torn down, onion keys
rotating under live relays, EXTENDs only to announced peers (and a dead next hop given up on), and the
`gtorrent relay` process itself (small, fast, no model runtime)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gtorrent.cells import create_body, parse_created
from gtorrent.circuit import CircuitClient, CircuitError
from gtorrent.discovery import DIRECTORY_MISS_QUERIES, PeerDirectory, discover
from gtorrent.identity import Identity
from gtorrent.onion import DATA, PendingHop
from gtorrent.onionkeys import OnionKeyRing
from gtorrent.protocol import PROTOCOL_VERSION, Message, PeerRecord, ProtocolError, decode
from gtorrent.relay import Circuit, RelayService, TokenBucket
from gtorrent.relaynode import RelayNode
from gtorrent.tracker import TrackerService
from gtorrent.transport import Connection, Reply, new_context

from .procs import Proc, start_tracker

pytestmark = pytest.mark.timeout(60)

SECRET = b"SECRET-PROMPT-do-not-leak"
CREATE_REPLIES = frozenset({"created", "error", "destroy"})


@dataclass
class Node:
    identity: Identity
    relay_node: RelayNode
    seen: list[tuple[str, int, bytes]] = field(default_factory=list)  # (direction, cid, raw frames)

    @property
    def service(self) -> RelayService:
        return self.relay_node.relay

    @property
    def server(self):  # type: ignore[no-untyped-def]
        return self.relay_node.server

    @property
    def record(self) -> PeerRecord:
        return self.relay_node.record()


_DIRECTORIES: dict[int, PeerDirectory] = {}  # per context: the nodes of one test know each other


def shared_directory(ctx) -> PeerDirectory:  # type: ignore[no-untyped-def]
    return _DIRECTORIES.setdefault(id(ctx), PeerDirectory())


async def start_node(ctx, terminal=None, directory=None, trackers=(), **relay_options) -> Node:  # type: ignore[no-untyped-def]
    """A relay on loopback with no tracker: its directory (by default one shared by the test's nodes)
    gets each node's signed record when the node starts, as a tracker would hand them out."""
    identity = Identity.generate()
    directory = directory if directory is not None else shared_directory(ctx)
    relay_node = RelayNode(identity, ctx, list(trackers), terminal=terminal, directory=directory)
    for name, value in relay_options.items():
        setattr(relay_node.relay, name, value)
    relay_node.bind("tcp://127.0.0.1:0")
    node = Node(identity, relay_node)
    service = relay_node.relay
    original_handle, original_from_next = service.handle, service.from_next

    async def recording_handle(reply: Reply, message: Message) -> None:
        node.seen.append(("in", message["cid"], b"".join(message.binary) + json.dumps(message.body).encode()))
        await original_handle(reply, message)

    async def recording_from_next(circuit: Circuit, message: Message) -> None:
        node.seen.append(("back", message.get("cid", 0), b"".join(message.binary) + json.dumps(message.body).encode()))
        await original_from_next(circuit, message)

    service.handle = recording_handle  # type: ignore[method-assign]
    service.from_next = recording_from_next  # type: ignore[method-assign]
    relay_node.directory.add(node.record)
    await relay_node.start()
    return node


async def echo_terminal(circuit: Circuit, command: int, data: bytes) -> None:
    await circuit.send_back(DATA, b"ANSWER:" + data[::-1])


@pytest.fixture
async def net() -> AsyncIterator[tuple[object, list[Node]]]:
    ctx = new_context()
    nodes: list[Node] = []
    yield ctx, nodes
    for node in nodes:
        node.relay_node.close()
    _DIRECTORIES.pop(id(ctx), None)
    ctx.destroy(linger=0)


async def test_circuit_through_three_relays_to_a_terminal(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relays = [await start_node(ctx) for _ in range(3)]
    terminal = await start_node(ctx, terminal=echo_terminal)
    nodes += [*relays, terminal]
    circuit = CircuitClient(ctx, [n.record for n in relays] + [terminal.record])
    await circuit.build()
    for i in range(3):
        await circuit.send(SECRET + bytes([i]))
        assert await circuit.receive(5) == (3, DATA, b"ANSWER:" + (SECRET + bytes([i]))[::-1])
    # each link has its own circuit id: the asker->R1, R1->R2, R2->R3 and R3->terminal ids all differ
    link_ids = [{cid for direction, cid, _ in node.seen if direction == "in"} for node in nodes]
    assert all(len(ids) == 1 for ids in link_ids)
    assert len({next(iter(ids)) for ids in link_ids}) == 4
    # no relay ever holds the prompt or the answer in the clear
    for relay in relays:
        for _, _, raw in relay.seen:
            assert SECRET not in raw and SECRET[::-1] not in raw and b"ANSWER" not in raw
    await circuit.close()


async def test_replayed_create_is_refused(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relay = await start_node(ctx)
    nodes.append(relay)
    hop_id, onion = relay.identity.signing_public, relay.service.onion_public
    pending = PendingHop.start(hop_id, onion)
    async with Connection(ctx, relay.server.endpoint, server_key=relay.identity.curve_public) as conn:
        body = create_body(11, pending.ephemeral_public, onion, pending.created_ms)
        first = await conn.request("create", body, CREATE_REPLIES, 5)
        assert first.kind == "created"
        pending.finish(*parse_created(first))
        # refused with a reason, not dropped: the asker learns at once instead of timing out
        replayed = await conn.request("create", {**body, "cid": 12}, CREATE_REPLIES, 5)
        assert replayed.kind == "destroy" and replayed["reason"] == "replayed create"
        stale = PendingHop.start(hop_id, onion, created_ms=int((time.time() - 3600) * 1000))
        refused = await conn.request("create", create_body(13, stale.ephemeral_public, onion, stale.created_ms),
                                     CREATE_REPLIES, 5)
        assert refused.kind == "destroy" and "timestamp" in refused["reason"]
    assert relay.service.counters["replays"] == 2


async def test_tampered_cell_destroys_the_circuit(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relays = [await start_node(ctx) for _ in range(2)]
    terminal = await start_node(ctx, terminal=echo_terminal)
    nodes += [*relays, terminal]
    circuit = CircuitClient(ctx, [n.record for n in relays] + [terminal.record])
    await circuit.build()
    held = [c for node in (*relays, terminal) for c in node.service.circuits.values()]
    assert len(held) == 3 and all(c.open and not c.closed for c in held)
    cell = bytearray(circuit.onion.wrap(DATA, b"hello", os.urandom))
    cell[300] ^= 1
    await circuit.conn.send("cell", {"cid": circuit.cid}, bytes(cell))
    with pytest.raises(CircuitError, match="destroyed"):
        await circuit.receive(5)
    assert relays[0].service.counters["dropped"] == 1 and not relays[0].service.circuits
    assert held[0].closed and not held[0].open  # what a seed's responder checks before sending on a path
    await circuit.close()


async def test_idle_circuits_expire(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relay, terminal = await start_node(ctx), await start_node(ctx, terminal=echo_terminal)
    nodes += [relay, terminal]
    circuit = CircuitClient(ctx, [relay.record, terminal.record])
    await circuit.build()
    relay.service.idle_timeout_s = 0.0
    assert len(relay.service.links) == 1
    assert await relay.service.expire_idle() == 1
    with pytest.raises(CircuitError, match="destroyed"):
        await circuit.receive(5)
    await relay.service.expire_idle()  # the link to the terminal, now idle, is closed too
    assert relay.service.links == {}
    await circuit.close()


async def test_forged_hop_fails_its_key_proof(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relay = await start_node(ctx)
    nodes.append(relay)
    genuine, other = relay.record, Identity.generate()
    # a record that names another identity at this relay's endpoint and keys: AUTH binds the identity
    wrong_id = PeerRecord(**{**genuine.__dict__, "signing_key": other.signing_public, "peer_id": other.peer_id})
    with pytest.raises(CircuitError, match="key proof") as failed:
        await CircuitClient(ctx, [wrong_id]).build()
    assert failed.value.hop == 0
    # a record that claims an onion key the relay does not hold: refused at once, not after a timeout
    wrong_key = PeerRecord(**{**genuine.__dict__, "onion_key": other.onion_public})
    started = time.monotonic()
    with pytest.raises(CircuitError, match="unknown onion key") as failed:
        await CircuitClient(ctx, [wrong_key]).build()
    assert failed.value.hop == 0 and time.monotonic() - started < 2
    assert relay.service.counters["unknown_onion_key"] == 1


def test_the_asker_side_never_imports_the_relay() -> None:
    code = "import sys, gtorrent.circuit; print('gtorrent.relay' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "False"


def test_relay_never_imports_the_model_runtime() -> None:
    code = "import sys, gtorrent_cli.app, gtorrent.node, gtorrent.relay, gtorrent.circuit, gtorrent.tracker; print('onnxruntime' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "False"


async def test_relay_processes_build_circuits_and_a_killed_relay_breaks_them(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    procs: list[Proc] = []
    ctx = new_context()
    terminal_node = None
    try:
        for i in range(3):
            proc = Proc(["relay", "--tracker", url], tmp_path / f"relay{i}")
            started = time.monotonic()
            proc.wait_for(r"relaying as \w+ on tcp://", timeout_s=20)
            assert time.monotonic() - started < 10  # "well under a second" normally; generous on CI
            procs.append(proc)
        found = await discover(ctx, [url], role="relay")
        relays = sorted(found.records.values(), key=lambda r: r.peer_id)
        assert len(relays) == 3
        terminal_node = await start_node(ctx, terminal=echo_terminal, trackers=[url])  # announced: relays extend to it
        circuit = CircuitClient(ctx, [*relays, terminal_node.record])
        await circuit.build()
        await circuit.send(b"ping")
        assert (await circuit.receive(5))[2] == b"ANSWER:gnip"
        middle = next(p for p in procs if relays[1].peer_id in "".join(p.seen))
        middle.kill()
        await circuit.send(b"ping again")
        with pytest.raises(CircuitError):
            await circuit.receive(10)
        await circuit.close()
        survivor = next(p for p in procs if p is not middle)
        assert survivor.terminate() == 0
        survivor.wait_for("relay stopped", 5)
    finally:
        if terminal_node is not None:
            terminal_node.relay_node.close()
        for proc in procs:
            proc.kill()
        tracker.kill()
        ctx.destroy(linger=0)


@pytest.mark.parametrize(
    ("bound", "advertise", "expected"),
    [
        ("tcp://127.0.0.1:5000", None, "tcp://127.0.0.1:5000"),
        ("tcp://0.0.0.0:5000", "10.1.2.3", "tcp://10.1.2.3:5000"),
        ("tcp://0.0.0.0:5000", "seed.example.org", "tcp://seed.example.org:5000"),
        ("tcp://0.0.0.0:5000", None, "every interface"),
        ("tcp://[::]:5000", None, "every interface"),
        ("tcp://0.0.0.0:5000", "bad host!", "invalid advertised host"),
    ],
)
def test_advertised_endpoint(bound: str, advertise: str | None, expected: str) -> None:
    from gtorrent.errors import UsageError
    from gtorrent.transport import advertised_endpoint

    if expected.startswith("tcp://"):
        assert advertised_endpoint(bound, advertise) == expected
    else:
        with pytest.raises(UsageError, match=expected):
            advertised_endpoint(bound, advertise)


async def test_relay_announces_its_advertised_host(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    relay = Proc(["relay", "--tracker", url, "--advertise", "localhost"], tmp_path / "relay")
    ctx = new_context()
    try:
        relay.wait_for(r"relaying as \w+ on tcp://localhost:\d+")
        found = await discover(ctx, [url], role="relay")
        assert [r.endpoint.startswith("tcp://localhost:") for r in found.records.values()] == [True]
    finally:
        relay.kill()
        tracker.kill()
        ctx.destroy(linger=0)


async def test_malformed_cells_leave_the_relay_serving(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relay, terminal = await start_node(ctx), await start_node(ctx, terminal=echo_terminal)
    nodes += [relay, terminal]
    circuit = CircuitClient(ctx, [relay.record, terminal.record])
    await circuit.build()
    # a cell with no frame, one of the wrong size, and one for an unknown circuit id
    await circuit.conn.sock.send_multipart([json.dumps({"v": PROTOCOL_VERSION, "t": "cell", "cid": circuit.cid}).encode()])
    await circuit.conn.send("cell", {"cid": 424242}, b"\x00" * 1024)
    with pytest.raises(CircuitError, match="destroyed"):
        await circuit.conn.send("cell", {"cid": circuit.cid}, b"short")
        await circuit.receive(5)
    # the destroy answers the first bad cell, and may overtake the relay's handling of the later ones
    # (each message runs in its own task): wait, with a deadline, for all of them to be counted
    deadline = time.monotonic() + 5.0
    while relay.service.counters["dropped"] < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert relay.service.counters["dropped"] >= 2
    fresh = CircuitClient(ctx, [relay.record, terminal.record])  # the relay still builds circuits
    await fresh.build()
    await fresh.send(b"ok?")
    assert (await fresh.receive(5))[2] == b"ANSWER:?ko"
    await fresh.close()
    await circuit.close()


# ---------------------------------------------------------------- protocol version (v2: ntor)


async def test_a_version_1_create_is_refused(net) -> None:  # type: ignore[no-untyped-def]
    """A peer still speaking protocol 1 (static-key CREATE) gets no circuit: the message is dropped
    before any field is read, and the relay keeps serving v2."""
    ctx, nodes = net
    relay = await start_node(ctx)
    nodes.append(relay)
    old = PendingHop.start(relay.identity.signing_public, relay.service.onion_public)
    from gtorrent.identity import b64

    v1_create = json.dumps({"v": 1, "t": "create", "cid": 5, "key": b64(old.ephemeral_public), "ts": old.created_ms}).encode()
    with pytest.raises(ProtocolError, match="unsupported protocol version 1"):
        decode([v1_create])
    with pytest.raises(ProtocolError, match="version"):  # the new fields under the old version: refused too
        decode([json.dumps({"v": 1, "t": "create", **create_body(5, old.ephemeral_public, old.onion_public, old.created_ms)}).encode()])
    async with Connection(ctx, relay.server.endpoint, server_key=relay.identity.curve_public) as conn:
        await conn.sock.send_multipart([v1_create])
        with pytest.raises(Exception, match="no answer"):
            await conn.recv(0.5, CREATE_REPLIES)
        assert relay.server.counters["dropped"] >= 1 and relay.service.counters["circuits"] == 0
    circuit = CircuitClient(ctx, [relay.record])
    await circuit.build()  # v2 still works
    await circuit.close()


# ---------------------------------------------------------------- onion key rotation


async def test_onion_key_rotation_on_a_live_relay() -> None:
    """After a rotation the relay re-announces the new key at once; a record cached before it still
    builds circuits during the grace period, and is refused (at once, with a reason) after it."""
    ctx = new_context()
    tracker = TrackerService(Identity.generate(), None)
    url = tracker.bind("tcp://127.0.0.1:0")
    serving = asyncio.create_task(tracker.serve())
    now = [time.time()]
    ring = OnionKeyRing(lambda: now[0], lifetime_s=3600, grace_s=180)
    node = RelayNode(Identity.generate(), ctx, [url], onion_keys=ring)
    try:
        node.bind("tcp://127.0.0.1:0")
        await node.start()
        (before,) = (await discover(ctx, [url], role="relay")).records.values()
        assert before.onion_key == ring.current_public
        now[0] += 3600
        await node.relay.maintain()  # what the upkeep loop runs every few seconds
        (after,) = (await discover(ctx, [url], role="relay")).records.values()
        assert after.onion_key != before.onion_key and after.onion_key == ring.current_public
        assert node.relay.counters["rotations"] == 1
        for record in (before, after):  # within the grace period both keys build circuits
            circuit = CircuitClient(ctx, [record])
            await circuit.build()
            await circuit.close()
        now[0] += 180
        with pytest.raises(CircuitError, match="unknown onion key") as refused:
            await CircuitClient(ctx, [before]).build(timeout_s=5)
        assert refused.value.hop == 0 and node.relay.counters["unknown_onion_key"] == 1
        fresh = CircuitClient(ctx, [after])
        await fresh.build()
        await fresh.close()
    finally:
        node.close()
        serving.cancel()
        tracker.close()
        ctx.destroy(linger=0)


def test_onion_private_keys_never_reach_the_disk(tmp_path: Path) -> None:
    """The identity file keeps its own (unused by relays) onion key; the rotating ones are only in memory."""
    from gtorrent.identity import load_or_create_identity

    identity, _ = load_or_create_identity(tmp_path)
    ring = OnionKeyRing()
    ring.rotate()
    stored = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from gtorrent.identity import b64

    for public in ring.honoured():
        private = ring.private_for(public)
        assert private is not None
        raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        assert raw not in stored and b64(raw).encode() not in stored
        assert public != identity.onion_public


# ---------------------------------------------------------------- next-hop links (EXTEND targets)


class Listener:
    """A real TCP listener on 127.0.0.1 that counts the connections it accepts (and closes them)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock or socket.socket()
        if sock is None:
            self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


def fake_peer(endpoint: str) -> PeerRecord:
    identity = Identity.generate()
    return PeerRecord.sign(identity, endpoint=endpoint, roles=("relay",), seq=1, expires=time.time() + 60)


async def test_extend_to_an_unannounced_endpoint_is_refused_without_connecting(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relay = await start_node(ctx)
    nodes.append(relay)
    listener = Listener()
    try:
        target = fake_peer(listener.endpoint)  # correctly signed, but no tracker (directory) announces it
        with pytest.raises(CircuitError) as refused:
            await CircuitClient(ctx, [relay.record, target]).build(timeout_s=5)
        assert refused.value.hop == 1
        assert relay.service.counters["extend_refused"] == 1 and relay.service.links == {}
        await asyncio.sleep(0.5)  # would a connection arrive late? (libzmq connects in the background)
        assert listener.accepted == 0
    finally:
        listener.close()


async def test_extend_to_an_announced_but_dead_endpoint_gives_up(net) -> None:  # type: ignore[no-untyped-def]
    """The next hop's port refuses connections. The relay tries a few times (back-off), closes the link
    after the EXTEND timeout and never tries again: when the port starts listening, nobody comes."""
    ctx, nodes = net
    relay = await start_node(ctx, extend_timeout_s=1.5)
    nodes.append(relay)
    reserved = socket.socket()  # bound, not listening: connections are refused, and no one else takes the port
    reserved.bind(("127.0.0.1", 0))
    endpoint = f"tcp://127.0.0.1:{reserved.getsockname()[1]}"
    target = fake_peer(endpoint)
    relay.relay_node.directory.add(target)
    links: list[object] = []

    async def watch() -> None:
        while True:
            links.extend(link for (where, _), link in relay.service.links.items() if where == endpoint and link not in links)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    with pytest.raises(CircuitError, match="did not answer") as failed:
        await CircuitClient(ctx, [relay.record, target]).build(timeout_s=5)
    watcher.cancel()
    assert failed.value.hop == 1 and time.monotonic() - started < 4
    assert len(links) == 1 and relay.service.links == {} and relay.service.counters["links_unanswered"] == 1
    retries = links[0].conn.connect_retries  # type: ignore[attr-defined]
    assert 1 <= retries <= 4  # libzmq's default (100 ms, no back-off) made ~15 in 1.5 s, and went on for minutes
    listener = Listener(reserved)
    try:
        await asyncio.sleep(3.0)  # longer than the longest back-off step (2 s + jitter)
        assert listener.accepted == 0
    finally:
        listener.close()


async def test_new_next_hop_links_are_rate_limited(net) -> None:  # type: ignore[no-untyped-def]
    ctx, nodes = net
    relay = await start_node(ctx, link_bucket=TokenBucket(rate_per_s=0.0, burst=1))
    first, second = await start_node(ctx, terminal=echo_terminal), await start_node(ctx, terminal=echo_terminal)
    nodes += [relay, first, second]
    circuit = CircuitClient(ctx, [relay.record, first.record])
    await circuit.build()
    again = CircuitClient(ctx, [relay.record, first.record])  # the open link is shared: no new one needed
    await again.build()
    with pytest.raises(CircuitError, match="extending"):
        await CircuitClient(ctx, [relay.record, second.record]).build()
    assert relay.service.counters["links_rate_limited"] == 1 and len(relay.service.links) == 1
    for done in (circuit, again):
        await done.close()


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert bucket.take() and not bucket.take()
    now[0] = 100.0  # refills to the burst, no more
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


async def test_directory_looks_up_a_miss_at_most_a_few_times_every_few_seconds() -> None:
    ctx = new_context()
    tracker = TrackerService(Identity.generate(), None)
    url = tracker.bind("tcp://127.0.0.1:0")
    serving = asyncio.create_task(tracker.serve())
    clock = [0.0]
    directory = PeerDirectory(ctx, [url], miss_interval_s=3.0, monotonic=lambda: clock[0])
    node = RelayNode(Identity.generate(), ctx, [url])
    try:
        node.bind("tcp://127.0.0.1:0")
        await node.start()
        record = node.record()
        assert directory.find(record.endpoint, record.curve_key) is None
        found = await directory.lookup(record.endpoint, record.curve_key)  # a miss: a refresh finds it
        assert found is not None and found.peer_id == record.peer_id and directory.refreshes == 1
        unknown = ("tcp://127.0.0.1:1", b"k" * 32)
        results = await asyncio.gather(*(directory.lookup(*unknown) for _ in range(20)))  # a flood of misses
        assert results == [None] * 20 and directory.refreshes == 2  # refreshed < 3 s ago: one query by endpoint
        floods = [(f"tcp://127.0.0.1:{port}", b"k" * 32) for port in range(2, 60)]  # other unknown endpoints
        assert await asyncio.gather(*(directory.lookup(*target) for target in floods)) == [None] * len(floods)
        assert directory.refreshes == 1 + DIRECTORY_MISS_QUERIES  # a bounded number per 3 s, whatever the flood
        clock[0] += 3.0
        assert await directory.lookup(*unknown) is None  # a new interval: a refresh, then a query by endpoint
        assert directory.refreshes == 3 + DIRECTORY_MISS_QUERIES
        assert await directory.lookup(record.endpoint, b"x" * 32) is None  # the endpoint with another key
    finally:
        node.close()
        serving.cancel()
        tracker.close()
        ctx.destroy(linger=0)


@contextlib.asynccontextmanager
async def tracker_with_relays(count: int, base_port: int) -> AsyncIterator[tuple[Any, str, list[PeerRecord]]]:
    """A real tracker on loopback holding `count` announced relay records: (context, url, records)."""
    from gtorrent.discovery import announce_all

    ctx = new_context()
    tracker = TrackerService(Identity.generate(), None)
    url = tracker.bind("tcp://127.0.0.1:0")
    serving = asyncio.create_task(tracker.serve())
    now = time.time()
    crowd = [
        PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{base_port + i}", roles=("relay",), seq=1,
                        expires=now + 60)
        for i in range(count)
    ]
    try:
        failures = await asyncio.gather(*(announce_all(ctx, [url], record) for record in crowd))
        assert not [message for errors in failures for message in errors.values()]
        yield ctx, url, crowd
    finally:
        serving.cancel()
        tracker.close()
        ctx.destroy(linger=0)


async def test_directory_finds_a_relay_a_general_query_leaves_out() -> None:
    """A tracker answers a general query with at most 200 records (a random sample); a relay checking an
    EXTEND asks for the target's endpoint, so it finds any announced peer in a large swarm."""
    async with tracker_with_relays(230, 20000) as (ctx, url, crowd):
        directory = PeerDirectory(ctx, [url])
        await directory.refresh()
        assert len(directory.records) == 200
        left_out = next(r for r in crowd if directory.find(r.endpoint, r.curve_key) is None)
        found = await directory.lookup(left_out.endpoint, left_out.curve_key)
        assert found is not None and found.peer_id == left_out.peer_id


async def test_a_fresh_directory_finds_every_announced_relay_at_once() -> None:
    """In a swarm that just started, a relay misses every other relay at once: one shared refresh
    must find them all (per-endpoint queries alone are rate-limited and would refuse most)."""
    async with tracker_with_relays(3 * DIRECTORY_MISS_QUERIES, 21000) as (ctx, url, crowd):
        directory = PeerDirectory(ctx, [url])
        found = await asyncio.gather(*(directory.lookup(r.endpoint, r.curve_key) for r in crowd))
        assert [r.peer_id if r else None for r in found] == [r.peer_id for r in crowd]
        assert directory.refreshes == 1
