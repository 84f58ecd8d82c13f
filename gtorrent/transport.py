"""ZeroMQ transport on asyncio: the only module that imports zmq.

A serving node binds one ROUTER (`Server`); it reaches other peers through DEALER sockets
(`Connection`). Links are CurveZMQ-encrypted: a server's key is the `curve_key` of its signed record,
and a client may use a throwaway key pair so that the server cannot link its requests. The one plain
(NULL-mechanism) socket is a tracker's bootstrap port, which only hands out the tracker's own signed
record (see tracker.py).

Every received message goes through `protocol.decode` before use. Malformed, oversized or unexpected
messages are dropped and counted in `counters`; a handler that raises is counted and logged; neither
stops the node. Every wait has a timeout. libzmq's MAXMSGSIZE also cuts off a peer that sends a frame
over the limit before it is ever buffered in full.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .errors import GtorrentError, UsageError
from .protocol import MAX_FRAMES, MAX_MESSAGE_BYTES, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

_ENDPOINT_RE = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-*]+):(\d{1,5})$")
MAX_WIRE_BYTES = MAX_MESSAGE_BYTES * MAX_FRAMES
DRAIN_MAX = 256  # messages taken from a socket per wake-up


class TransportError(GtorrentError):
    """A peer could not be reached, did not answer in time, or went away."""


class PeerTimeout(TransportError):
    pass


class PeerDisconnected(TransportError):
    pass


class PeerRefused(TransportError):
    """The encrypted handshake failed: the peer is not who its record says."""


def check_endpoint(url: str, what: str = "endpoint") -> str:
    """Validate a `tcp://host:port` URL (raise UsageError with a hint otherwise)."""
    match = _ENDPOINT_RE.match(url)
    if not match or not (0 <= int(match.group(2)) <= 65535):
        raise UsageError(f"invalid {what} {url!r}", hint="use the form tcp://HOST:PORT, e.g. tcp://127.0.0.1:7700")
    return url


Context = zmq.asyncio.Context  # for type hints elsewhere: only this module imports zmq


def advertised_endpoint(bound: str, advertise: str | None) -> str:
    """The endpoint to announce for a socket bound at `bound` (`tcp://host:port`)."""
    host, port = bound[len("tcp://") :].rsplit(":", 1)
    if advertise:
        return check_endpoint(f"tcp://{advertise}:{port}", "advertised host")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        raise UsageError(
            f"{bound} listens on every interface, so its address reaches no peer",
            hint="pass --advertise HOST (the address other machines reach this one at)",
        )
    return bound


def new_context() -> zmq.asyncio.Context:
    return zmq.asyncio.Context()


def throwaway_curve_keys() -> tuple[bytes, bytes]:
    """A fresh CurveZMQ key pair (public, secret) as raw 32-byte keys."""
    public, secret = zmq.curve_keypair()
    return z85.decode(public), z85.decode(secret)


def _limit(sock: zmq.asyncio.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_BYTES)


class Reply:
    """The way back to the peer that sent one message to a Server."""

    def __init__(self, server: Server, route: bytes) -> None:
        self._server = server
        self.route = route

    async def send(self, kind: str, body: dict[str, Any] | None = None, *binary: bytes) -> bool:
        """Send to the peer; False when it is no longer connected (nothing was sent)."""
        return await self._server.send(self.route, encode(kind, body, *binary))


Handler = Callable[[Reply, Message], Awaitable[None]]
BatchHandler = Callable[[list[tuple["Reply", Message]]], Awaitable[None]]


class Server:
    """A ROUTER socket that decodes, validates and dispatches each message to a handler task."""

    def __init__(self, ctx: zmq.asyncio.Context, *, curve_secret: bytes | None, name: str = "server") -> None:
        self.name = name
        self.sock = ctx.socket(zmq.ROUTER)
        _limit(self.sock)
        if curve_secret is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = z85.encode(curve_secret)
        # tell the sender when a peer is gone instead of dropping silently: a seed stops generating
        # for an asker that left
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self.endpoint = ""

    def bind(self, url: str, advertise: str | None = None) -> str:
        """Bind to `url` (port 0 picks a free port); return the endpoint peers should use.

        Bound to every interface (0.0.0.0, *, [::]), the socket's own address reaches nobody, so the
        host to announce must be given (`advertise`)."""
        check_endpoint(url, "bind address")
        try:
            self.sock.bind(url)
        except zmq.ZMQError as exc:
            raise UsageError(
                f"cannot bind {url} ({exc.strerror})", hint="pick another --bind address, or port 0 for any free port"
            ) from exc
        try:
            self.endpoint = advertised_endpoint(self.sock.getsockopt_string(zmq.LAST_ENDPOINT), advertise)
        except UsageError:
            self.sock.close(linger=0)
            raise
        return self.endpoint

    async def send(self, route: bytes, frames: list[bytes]) -> bool:
        try:
            await self.sock.send_multipart([route, *frames])
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # ROUTER_MANDATORY: that peer has gone away
                self.counters["unroutable"] += 1
                return False
            raise
        return True

    async def serve(
        self,
        handler: Handler,
        expected: frozenset[str],
        *,
        batch_kinds: frozenset[str] = frozenset(),
        batch_handler: BatchHandler | None = None,
    ) -> None:
        """Receive forever. Each valid message runs `handler` in its own task, except messages of
        `batch_kinds`: those that arrive together go to `batch_handler` as one list, in one task."""
        while True:
            burst = [await self.sock.recv_multipart()]
            # Drain what is already queued, so a burst is handled in one loop turn (and, for batched
            # kinds, in one call: the tracker commits a burst of announces in one transaction).
            while len(burst) < DRAIN_MAX:
                try:
                    burst.append(self.sock.recv_multipart(flags=zmq.NOBLOCK).result())  # type: ignore[attr-defined]
                except zmq.Again:
                    break
            grouped: list[tuple[Reply, Message]] = []
            for frames in burst:
                try:
                    decoded = self._decode(frames, expected)
                except Exception:  # noqa: BLE001 - whatever a peer sends, the node keeps serving
                    self.counters["dropped"] += 1
                    log.debug("%s: dropped an undecodable message", self.name, exc_info=True)
                    continue
                if decoded is None:
                    continue
                reply, message = decoded
                if batch_handler is not None and message.kind in batch_kinds:
                    grouped.append((reply, message))
                else:
                    self._spawn(self._run(handler, reply, message))
            if grouped and batch_handler is not None:
                self._spawn(self._run_batch(batch_handler, grouped))

    def _decode(self, frames: list[bytes], expected: frozenset[str]) -> tuple[Reply, Message] | None:
        if len(frames) < 2:
            self.counters["dropped"] += 1
            return None
        try:
            message = decode(frames[1:], expected)
        except ProtocolError as exc:
            self.counters["dropped"] += 1
            log.debug("%s: dropped a message: %s", self.name, exc)
            return None
        self.counters["received"] += 1
        return Reply(self, frames[0]), message

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, handler: BatchHandler, batch: list[tuple[Reply, Message]]) -> None:
        try:
            await handler(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one bad batch must not stop the node
            self.counters["handler_errors"] += 1
            log.exception("%s: batch handler failed", self.name)

    async def _run(self, handler: Handler, reply: Reply, message: Message) -> None:
        try:
            await handler(reply, message)
        except asyncio.CancelledError:
            raise
        except ProtocolError as exc:
            self.counters["dropped"] += 1
            log.debug("%s: rejected %s: %s", self.name, message.kind, exc)
        except Exception:
            self.counters["handler_errors"] += 1
            log.exception("%s: handler for %s failed", self.name, message.kind)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.sock.close(linger=0)


_MONITOR_EVENTS = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Connection:
    """A DEALER connected to one peer, with disconnect and handshake-failure detection."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        *,
        server_key: bytes | None,
        client_keys: tuple[bytes, bytes] | None = None,
        name: str = "",
    ) -> None:
        check_endpoint(endpoint)
        self.endpoint = endpoint
        self.name = name or endpoint
        self.sock = ctx.socket(zmq.DEALER)
        _limit(self.sock)
        if server_key is not None:
            public, secret = client_keys or throwaway_curve_keys()
            self.sock.curve_serverkey = z85.encode(server_key)
            self.sock.curve_publickey = z85.encode(public)
            self.sock.curve_secretkey = z85.encode(secret)
        self.monitor = self.sock.get_monitor_socket(_MONITOR_EVENTS)
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.dropped = 0
        self.sock.connect(endpoint)

    async def send(self, kind: str, body: dict[str, Any] | None = None, *binary: bytes) -> None:
        await self.sock.send_multipart(encode(kind, body, *binary))

    async def recv(self, timeout_s: float, expected: frozenset[str]) -> Message:
        """The next valid message; raise PeerTimeout, PeerDisconnected or PeerRefused."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PeerTimeout(f"no answer from {self.name} in {timeout_s:g} s")
            ready = dict(await self.poller.poll(timeout=int(remaining * 1000) + 1))
            if self.sock in ready:
                frames = await self.sock.recv_multipart()
                try:
                    return decode(frames, expected)
                except ProtocolError as exc:
                    self.dropped += 1
                    log.debug("dropped a message from %s: %s", self.name, exc)
                    continue
            if self.monitor in ready:
                event = parse_monitor_message(await self.monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    raise PeerDisconnected(f"{self.name} closed the connection")
                raise PeerRefused(f"encrypted handshake with {self.name} failed (wrong key?)")

    async def request(
        self, kind: str, body: dict[str, Any] | None, expected: frozenset[str], timeout_s: float
    ) -> Message:
        await self.send(kind, body)
        return await self.recv(timeout_s, expected)

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
