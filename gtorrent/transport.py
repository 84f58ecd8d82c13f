"""ZeroMQ transport on asyncio: the only module that imports zmq.

A serving node binds one ROUTER (`Server`); it reaches other peers through DEALER sockets
(`Connection`). Links are CurveZMQ-encrypted: a server's key is the `curve_key` of its signed record,
and a client may use a throwaway key pair so that the server cannot link its requests. The one plain
(NULL-mechanism) socket is a tracker's bootstrap port, which only hands out the tracker's own signed
record (see tracker.py).

Every received message goes through `protocol.decode` before use. Malformed, oversized or unexpected
messages are dropped and counted in `counters`; a handler that raises is counted and logged; neither
stops the node. Every wait has a timeout.

What a peer can make libzmq hold is bounded too. libzmq's MAXMSGSIZE is per frame, and the frames of
a multipart message that never ends are buffered with no limit (the high-water mark counts whole
messages), so a frame limit alone lets one anonymous connection pile up gigabytes. The guard bounds it
per connection: each received message is attributed to its TCP connection (`zmq.SRCFD`) and its size
on the wire is added up; a watchdog thread compares that with what the kernel says libzmq has read
from the socket (Linux `TCP_INFO.tcpi_bytes_received` minus the bytes still queued). A connection
with more than `Limits.max_pending_bytes` read but not delivered as whole messages is cut with
`shutdown(fd)` (libzmq owns the fd and closes it; it drops the partial message when it sees the
connection end). Honest peers stay far below the limit: once 1,000 whole messages of a connection
wait unread (the high-water mark), libzmq stops reading it and the rest waits in the kernel, which is
not counted; only a peer that queues large messages faster than the node reads them comes near it.
The watchdog wakes every GUARD_TICK_S: it rescans when the process grew by GUARD_RSS_STEP_BYTES since
its last scan, and every GUARD_SCAN_S regardless. It learns a Server's connections from the socket's
accept events, read by the event loop, and also finds them itself (the sockets in /proc/self/fd whose
local port is a listening Server's), so a connection is guarded even while the loop is stalled. Elsewhere than on Linux there is no TCP_INFO and the
guard does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from .errors import GtorrentError, UsageError
from .protocol import MAX_MESSAGE_BYTES, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)

_ENDPOINT_RE = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-*]+):(\d{1,5})")  # bind addresses too (`*`); fullmatch
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
    match = _ENDPOINT_RE.fullmatch(url)  # `$` with match() would let a final newline by
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


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int  # libzmq's MAXMSGSIZE: a longer frame cuts the connection before it is buffered
    max_pending_bytes: int  # read from one connection but not yet delivered as whole messages


# No frame of the protocol is longer than one JSON message (binary frames are 1 KiB cells). 4 MiB
# pending is 16 such frames, or ~3,700 cells; libzmq holds at most ~2.3x the wire bytes (tiny frames).
CURVE_LIMITS = Limits(max_frame_bytes=MAX_MESSAGE_BYTES, max_pending_bytes=4 << 20)
# The one plain socket is a tracker's bootstrap port: `hello` in, one signed record out. Each empty
# NULL frame costs 2 bytes on the wire and ~64 in libzmq, so its pending limit is small.
PLAIN_LIMITS = Limits(max_frame_bytes=16 << 10, max_pending_bytes=64 << 10)
HANDSHAKE_BYTES = 4096  # greeting + CurveZMQ handshake with metadata: read, never delivered (~600 seen)
GUARD_TICK_S = 0.02
GUARD_SCAN_S = 0.25
GUARD_RSS_STEP_BYTES = 4 << 20
GUARD_TOTAL_PENDING_BYTES = 64 << 20  # over all connections: the largest are cut first


def _limit(sock: zmq.asyncio.Socket, limits: Limits) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)


def wire_bytes(size: int, curve: bool) -> int:
    """Bytes one frame of `size` takes on a ZMTP 3 connection, as libzmq encodes it: a flags byte and a
    1- or 8-byte length; under CurveZMQ each frame is a MESSAGE command (name, nonce, box tag, flags)."""
    if curve:
        return size + (35 if size <= 222 else 42)
    return size + (2 if size <= 255 else 9)


def _take(raw: zmq.Socket[Any], curve: bool, router: bool) -> tuple[list[bytes], int, int]:
    """One whole message without waiting (zmq.Again when none is queued): its frames, the fd of the
    connection it came on, and its size on the wire (a ROUTER's routing-id frame is not on the wire)."""
    first = raw.recv(zmq.NOBLOCK, copy=False)
    try:
        fd = first.get(zmq.SRCFD)
    except zmq.ZMQError:  # no metadata: a ZMTP 1.0/2.0 peer (unsupported; never credited, so soon cut)
        fd = -1
    frames = [first.bytes]
    while raw.getsockopt(zmq.RCVMORE):
        frames.append(raw.recv(zmq.NOBLOCK))
    wire = sum(wire_bytes(len(frame), curve) for frame in frames[1 if router else 0 :])
    return frames, fd, wire


@dataclass(eq=False)
class _Tracked:
    owner: object
    limits: Limits
    counters: Counter[str]
    inode: int = 0  # the socket's inode when tracked: an fd number libzmq closed may be reused
    delivered: int = 0  # wire bytes of the whole messages taken from this connection
    cut: bool = False


class _Guard:
    """Per process: the TCP connections of every Server and Connection, and the watchdog thread."""

    def __init__(self) -> None:
        self.conns: dict[int, _Tracked] = {}
        # listening ports of the Servers: the watchdog finds their accepted connections on its own,
        # so a connection is guarded even while the event loop (which reads the accept events) stalls
        self.listeners: dict[int, tuple[object, Limits, Counter[str]]] = {}
        self.discovered = 0
        self.cuts = 0
        self.scans = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._libc: Any = None
        self.enabled = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")
        if self.enabled:
            try:
                self._libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                self.enabled = False

    def track(self, fd: int, owner: object, limits: Limits, counters: Counter[str]) -> None:
        if fd < 0 or not self.enabled:
            return
        inode = _inode(fd)
        if inode is None:
            return  # already closed again
        known = self.conns.get(fd)
        if known is not None and known.inode == inode:
            return  # the watchdog found it first: keep its count
        self.conns[fd] = _Tracked(owner, limits, counters, inode)
        self._start()

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="gtorrent-guard", daemon=True)
                    self._thread.start()

    def untrack(self, fd: int, owner: object) -> None:
        tracked = self.conns.get(fd)
        if tracked is not None and tracked.owner is owner:  # the fd may already serve a newer connection
            del self.conns[fd]

    def untrack_owner(self, owner: object) -> None:
        for fd, tracked in list(self.conns.items()):
            if tracked.owner is owner:
                self.conns.pop(fd, None)
        for port, (listener, _, _) in list(self.listeners.items()):
            if listener is owner:
                self.listeners.pop(port, None)

    def listen(self, port: int, owner: object, limits: Limits, counters: Counter[str]) -> None:
        if self.enabled:
            self.listeners[port] = (owner, limits, counters)
            self._start()

    def discover(self) -> int:
        """Track the accepted TCP connections of listening Servers that no accept event has reported
        yet (the event loop may be busy). What such a connection had read before is taken as delivered;
        only what it reads from now on counts. Returns how many were found."""
        if not self.listeners:
            return 0
        found = 0
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in self.conns:
                continue
            try:
                if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    continue
                probe = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            try:
                if probe.family not in (socket.AF_INET, socket.AF_INET6) or probe.type != socket.SOCK_STREAM:
                    continue
                port = probe.getsockname()[1]
                probe.getpeername()  # a listener or an unconnected socket raises
            except OSError:
                continue
            finally:
                probe.close()  # the duplicate only
            listener = self.listeners.get(port)
            inode, read = _inode(fd), self.read_bytes(fd)
            if listener is None or inode is None or read is None:
                continue
            owner, limits, counters = listener
            self.conns.setdefault(fd, _Tracked(owner, limits, counters, inode, delivered=read))
            found += 1
        self.discovered += found
        return found

    def read_bytes(self, fd: int) -> int | None:
        """Bytes libzmq has read from a TCP socket: received by the kernel, less what is still queued."""
        info = ctypes.create_string_buffer(232)
        size = ctypes.c_uint32(232)
        if self._libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, info, ctypes.byref(size)) != 0 or size.value < 136:
            return None  # closed meanwhile, not a TCP socket, or a kernel older than 4.1
        received: int = struct.unpack_from("=Q", info.raw, 128)[0]  # tcpi_bytes_received
        import fcntl  # Linux only, like TCP_INFO
        import termios

        try:
            queued: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            return None
        return received - queued

    def scan(self) -> int:
        """Cut every connection over its pending limit (and the largest, while the total is over
        GUARD_TOTAL_PENDING_BYTES); return how many were cut."""
        self.scans += 1
        self.discover()
        pending: list[tuple[int, int, _Tracked]] = []
        cut = 0
        for fd, tracked in list(self.conns.items()):
            if tracked.cut:
                continue
            read = self.read_bytes(fd)  # read before `delivered`: a message delivered meanwhile only helps
            if read is None:
                continue
            over = read - tracked.delivered - HANDSHAKE_BYTES
            if over > tracked.limits.max_pending_bytes:
                cut += self._cut(fd, tracked, over)
            elif over > 0:
                pending.append((over, fd, tracked))
        total = sum(over for over, _, _ in pending)
        for over, fd, tracked in sorted(pending, key=lambda item: item[0], reverse=True):
            if total <= GUARD_TOTAL_PENDING_BYTES:
                break
            cut += self._cut(fd, tracked, over)
            total -= over
        return cut

    def _cut(self, fd: int, tracked: _Tracked, over: int) -> int:
        if self.conns.get(fd) is not tracked:
            return 0
        if _inode(fd) != tracked.inode:  # libzmq closed it and the number now names another socket
            self.conns.pop(fd, None)
            return 0
        tracked.cut = True
        # counted before the cut: whoever sees the connection drop must find it counted
        tracked.counters["cut_off"] += 1
        self.cuts += 1
        self._libc.shutdown(fd, socket.SHUT_RDWR)  # never close(): the fd is libzmq's
        log.warning("cut off a connection holding %d bytes of unfinished messages", over)
        return 1

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        statm = os.open("/proc/self/statm", os.O_RDONLY)
        last_rss, last_scan = 0, 0.0
        while True:
            time.sleep(GUARD_TICK_S)
            try:
                rss = int(os.pread(statm, 128, 0).split()[1]) * page
                now = time.monotonic()
                if rss - last_rss >= GUARD_RSS_STEP_BYTES or now - last_scan >= GUARD_SCAN_S:
                    self.scan()
                    last_rss, last_scan = rss, now
                last_rss = min(last_rss, rss)
            except Exception:  # noqa: BLE001 - the watchdog must outlive any surprise
                log.exception("connection guard failed a scan")


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


GUARD = _Guard()


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

    def __init__(
        self, ctx: zmq.asyncio.Context, *, curve_secret: bytes | None, name: str = "server", limits: Limits | None = None
    ) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.ROUTER)
        self.curve = curve_secret is not None
        self.limits = limits or (CURVE_LIMITS if self.curve else PLAIN_LIMITS)
        _limit(self.sock, self.limits)
        self._raw: zmq.Socket[Any] = zmq.Socket.shadow(self.sock.underlying)  # synchronous reads of the same socket
        # before bind, so that no connection is missed
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
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
            bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.endpoint = advertised_endpoint(bound, advertise)
        except UsageError:
            self.sock.close(linger=0)
            raise
        GUARD.listen(int(bound.rsplit(":", 1)[1]), self, self.limits, self.counters)
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
        watcher = asyncio.create_task(self._watch_connections())
        try:
            await self._serve(handler, expected, batch_kinds, batch_handler)
        finally:
            watcher.cancel()

    async def _watch_connections(self) -> None:
        """Tell the guard which TCP connections this socket has."""
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_ACCEPTED:
                GUARD.track(event["value"], self, self.limits, self.counters)
            else:
                GUARD.untrack(event["value"], self)

    async def _serve(
        self, handler: Handler, expected: frozenset[str], batch_kinds: frozenset[str], batch_handler: BatchHandler | None
    ) -> None:
        conns = GUARD.conns
        while True:
            # Drain what is already queued, so a burst is handled in one loop turn (and, for batched
            # kinds, in one call: the tracker commits a burst of announces in one transaction).
            burst: list[list[bytes]] = []
            while len(burst) < DRAIN_MAX:
                try:
                    frames, fd, wire = _take(self._raw, self.curve, router=True)
                except zmq.Again:
                    break
                tracked = conns.get(fd)
                if tracked is not None:
                    tracked.delivered += wire
                burst.append(frames)
            if not burst:
                await self.sock.poll()
                continue
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
            await asyncio.sleep(0)  # let the handlers run before the next burst

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
        _close_monitored(self, self.sock, self.monitor)


def _close_monitored(owner: object, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
    """Close a socket and its monitor, and stop guarding its connections."""
    GUARD.untrack_owner(owner)
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
    sock.close(linger=0)


_MONITOR_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED  # counted (Connection.connect_retries), not an error: libzmq retries
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CONNECTED  # the connection's fd, for the guard
    | zmq.EVENT_CLOSED
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
        reconnect_ivl_s: tuple[float, float] | None = None,  # (first, max) back-off; libzmq's default otherwise
    ) -> None:
        check_endpoint(endpoint)
        self.endpoint = endpoint
        self.name = name or endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.curve = server_key is not None
        self.limits = CURVE_LIMITS if self.curve else PLAIN_LIMITS
        self.counters: Counter[str] = Counter()
        _limit(self.sock, self.limits)
        self._raw: zmq.Socket[Any] = zmq.Socket.shadow(self.sock.underlying)
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
        self.connect_retries = 0  # failed TCP connects so far (seen while someone waits in recv)
        if reconnect_ivl_s is not None:  # read by libzmq at connect time, so set before it
            self.sock.setsockopt(zmq.RECONNECT_IVL, int(reconnect_ivl_s[0] * 1000))
            self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(reconnect_ivl_s[1] * 1000))
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
                try:
                    frames, fd, wire = _take(self._raw, self.curve, router=False)
                except zmq.Again:
                    continue
                tracked = GUARD.conns.get(fd)
                if tracked is not None:
                    tracked.delivered += wire
                try:
                    return decode(frames, expected)
                except ProtocolError as exc:
                    self.dropped += 1
                    log.debug("dropped a message from %s: %s", self.name, exc)
                    continue
            if self.monitor in ready:
                event = parse_monitor_message(await self.monitor.recv_multipart())
                if event["event"] == zmq.EVENT_CONNECT_RETRIED:
                    self.connect_retries += 1
                    continue
                if event["event"] == zmq.EVENT_CONNECTED:
                    GUARD.track(event["value"], self, self.limits, self.counters)
                    continue
                if event["event"] == zmq.EVENT_CLOSED:
                    GUARD.untrack(event["value"], self)
                    continue
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    GUARD.untrack(event["value"], self)
                    raise PeerDisconnected(f"{self.name} closed the connection")
                raise PeerRefused(f"encrypted handshake with {self.name} failed (wrong key?)")

    async def request(
        self, kind: str, body: dict[str, Any] | None, expected: frozenset[str], timeout_s: float
    ) -> Message:
        await self.send(kind, body)
        return await self.recv(timeout_s, expected)

    def close(self) -> None:
        _close_monitored(self, self.sock, self.monitor)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
