"""The transport's bound on what a peer can make libzmq hold: a multipart message that never ends is cut
off (watched through the RSS of real tracker and relay processes), and so is one sent to a DEALER by a
malicious server; honest peers keep being served, and the per-frame wire accounting matches libzmq."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from gtorrent.discovery import TrackerClient
from gtorrent.protocol import PeerRecord
from gtorrent.transport import (
    CURVE_LIMITS,
    GUARD,
    Connection,
    PeerDisconnected,
    new_context,
    throwaway_curve_keys,
    wire_bytes,
)

from .procs import Proc, start_tracker
from .rawzmtp import RawPeer, _command, _frame, _greeting

pytestmark = pytest.mark.timeout(120)

ATTACK_BYTES = 600 << 20  # what the attacker tries to make the server hold
RSS_BOUND = 80 << 20  # growth of the server's peak RSS allowed during the attack


def rss_of(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


class Attacker:
    """A peer with a throwaway key that sends one multipart message that never ends (raw ZMTP: libzmq's
    own sender would hold the frames back until the last one)."""

    def __init__(self, endpoint: str, server_key: bytes | None, frame_bytes: int) -> None:
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)
        self.peer = RawPeer(host, int(port), server_key)
        self.frame = os.urandom(frame_bytes)
        self.sent = 0
        self.disconnected = threading.Event()

    def run(self, total: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            while self.sent < total and time.monotonic() < deadline:
                self.peer.send_frame(self.frame, more=True)
                self.sent += len(self.frame)
        except OSError:  # reset or broken pipe: cut off
            self.disconnected.set()

    def close(self) -> None:
        self.peer.close()


def attack(pid: int, endpoint: str, server_key: bytes | None, frame_bytes: int) -> tuple[int, Attacker]:
    """Run an attack on `endpoint`; return the growth of the server's RSS (sampled every 2 ms: VmHWM
    would hide growth below the peak the process reached while starting)."""
    before = rss_of(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_of(pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    attacker = Attacker(endpoint, server_key, frame_bytes)
    try:
        attacker.run(ATTACK_BYTES)
    finally:
        attacker.close()
        time.sleep(0.1)
        done.set()
        sampler.join()
    return peak[0] - before, attacker


async def tracker_record(url: str) -> PeerRecord:
    ctx = new_context()
    try:
        return await TrackerClient(ctx, url)._tracker_record()
    finally:
        ctx.destroy(linger=0)


async def tracker_answers(url: str) -> bool:
    ctx = new_context()
    try:
        client = TrackerClient(ctx, url, timeout_s=5)
        await client.query(role="relay")
        return True
    finally:
        ctx.destroy(linger=0)


@pytest.mark.timeout(180)
async def test_never_ending_multipart_messages_are_cut_off_by_tracker_and_relay(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    relay = Proc(["relay", "--tracker", url], tmp_path / "relay")
    try:
        relay.wait_for(r"relaying as")
        record = await tracker_record(url)
        ctx = new_context()
        try:
            relays = await TrackerClient(ctx, url).query(role="relay")
        finally:
            ctx.destroy(linger=0)
        assert relays
        targets = [
            ("tracker bootstrap (plain)", tracker.popen.pid, url, None, 8 << 10),
            ("tracker (CurveZMQ)", tracker.popen.pid, record.endpoint, record.curve_key, 200 << 10),
            ("relay (CurveZMQ)", relay.popen.pid, relays[0].endpoint, relays[0].curve_key, 200 << 10),
        ]
        for what, pid, endpoint, key, frame_bytes in targets:
            grown, attacker = await asyncio.to_thread(attack, pid, endpoint, key, frame_bytes)
            assert attacker.disconnected.is_set(), f"{what}: the attacker was never cut off ({attacker.sent} bytes sent)"
            assert grown < RSS_BOUND, f"{what}: peak RSS grew {grown >> 20} MiB (attacker sent {attacker.sent >> 20} MiB)"
            assert await tracker_answers(url), what  # honest peers are still served
        assert tracker.popen.poll() is None and relay.popen.poll() is None
    finally:
        relay.terminate()
        tracker.terminate()


async def test_a_server_that_never_ends_its_message_is_cut_off_at_the_dealer() -> None:
    """A malicious peer answers a DEALER with a multipart message that never ends (here the plain
    mechanism, as a fake tracker bootstrap port would; CurveZMQ connections run the same guard)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    frame = _frame(os.urandom(8 << 10), 0x01)  # MORE, forever
    sent = [0]
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        try:
            conn.sendall(_greeting(b"NULL") + _command(b"\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER"))
            received = b""
            while len(received) < 64 + 2 + 28:  # the client's greeting and READY: its handshake is done
                received += conn.recv(4096)
            while sent[0] < ATTACK_BYTES:
                conn.sendall(frame)
                sent[0] += len(frame)
        except OSError:
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ctx = new_context()
    before = rss_of(os.getpid())
    conn = Connection(ctx, f"tcp://127.0.0.1:{port}", server_key=None)
    try:
        await conn.send("hello", {})
        with pytest.raises(PeerDisconnected):
            await conn.recv(60, frozenset({"hello_ok"}))
        assert conn.counters["cut_off"] == 1 and sent[0] < ATTACK_BYTES
        assert rss_of(os.getpid()) - before < RSS_BOUND
    finally:
        conn.close()
        for server_side in accepted:  # a send blocked on the cut connection returns at once
            try:
                server_side.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread.join(10)
        listener.close()
        ctx.destroy(linger=0)


def test_wire_accounting_matches_libzmq() -> None:
    """Long-lived honest connections must never drift towards the limit: the per-frame size the guard
    adds up is exactly what the kernel counts, for both mechanisms and both length encodings."""
    if not GUARD.enabled:
        pytest.skip("the guard needs Linux TCP_INFO")
    for curve in (True, False):
        ctx = zmq.Context()
        server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        if curve:
            public, secret = throwaway_curve_keys()
            server.curve_server = True
            server.curve_secretkey = z85.encode(secret)
            client_public, client_secret = throwaway_curve_keys()
            client.curve_serverkey = z85.encode(public)
            client.curve_publickey = z85.encode(client_public)
            client.curve_secretkey = z85.encode(client_secret)
        monitor = server.get_monitor_socket(zmq.EVENT_ACCEPTED)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        fd = recv_monitor_message(monitor)["value"]
        client.send(b"hello")
        server.recv_multipart()
        for size in (0, 1, 33, 34, 222, 223, 255, 256, 1024, 70_000):
            start = GUARD.read_bytes(fd)
            assert start is not None
            client.send_multipart([b"x" * size, b"y" * size])
            server.recv_multipart()
            end = GUARD.read_bytes(fd)
            assert end is not None and end - start == 2 * wire_bytes(size, curve), (curve, size)
        server.disable_monitor()
        for sock in (monitor, server, client):
            sock.close(linger=0)
        ctx.term()
    assert CURVE_LIMITS.max_pending_bytes >= 8 * CURVE_LIMITS.max_frame_bytes


async def test_a_connection_is_guarded_while_the_event_loop_is_stalled() -> None:
    """The accept events that tell the guard about a connection are read by the event loop; a peer that
    stalls it (a burst of expensive requests) used to leave new connections unguarded meanwhile. The
    watchdog now finds a listening Server's connections itself: one that sends a never-ending message
    while the loop is blocked is cut before the loop runs again."""
    from gtorrent.transport import Server

    ctx = new_context()
    server = Server(ctx, curve_secret=None, name="stalled")
    endpoint = server.bind("tcp://127.0.0.1:0")
    attacker: list[Attacker] = []
    stalled: dict[str, float] = {}

    async def handler(reply, message) -> None:  # type: ignore[no-untyped-def]
        # the loop is blocked from here until the attack is over (or 20 s): nothing async runs
        stalled["from"] = time.monotonic()
        one = Attacker(endpoint, None, 8 << 10)
        attacker.append(one)
        thread = threading.Thread(target=one.run, args=(200 << 20, 20.0), daemon=True)
        thread.start()
        thread.join(25.0)
        stalled["until"] = time.monotonic()
        await reply.send("pong", {})

    serving = asyncio.create_task(server.serve(handler, frozenset({"ping"})))
    client = Connection(ctx, endpoint, server_key=None)
    try:
        answer = await client.request("ping", {}, frozenset({"pong"}), 60.0)
        assert answer.kind == "pong"
        assert attacker and attacker[0].disconnected.is_set(), f"never cut off ({attacker[0].sent >> 20} MiB sent)"
        assert attacker[0].sent < 64 << 20  # cut within the plain socket's limit plus a scan's worth
        assert GUARD.discovered >= 1
    finally:
        for one in attacker:
            one.close()
        client.close()
        serving.cancel()
        server.close()
        ctx.destroy(linger=0)
