"""The relay: forwards onion cells for the circuits it is part of (every seed relays too).

Per circuit a relay knows its predecessor (a ROUTER route and the circuit id of that link), its
successor once the asker EXTENDs (a DEALER link and the circuit id the asker chose for it) and its own
hop keys — nothing else: not the asker, not its position, not the other hops. It never sees a prompt
or an answer: what it forwards is still wrapped for the hops after it, and what reaches a seed is a
single S-IDA clove.

State machine of a circuit at a relay (transitions as the table reads):

    (none)    --create-->             CREATED   (ntor answer: CREATED with Y and AUTH sent back)
    CREATED   --cell: EXTEND-->       EXTENDING (target checked in the directory, CREATE sent on)
    EXTENDING --created-->            RELAYING  (EXTENDED = Y || AUTH sealed back to the asker)
    RELAYING  --cell-->               RELAYING  (peel, forward; backward cells get a layer)
    CREATED   --cell: DATA-->         CREATED   (terminal only: handed to the terminal handler)
    any       --destroy / idle / error--> closed  (destroy sent to the other side; `Circuit.closed`)

A CREATE names the onion key it was made for; the relay answers with the matching key of its ring
(onionkeys.py: the current one, or a retired one within its grace period) and refuses others with a
`destroy`. Replayed CREATEs (same ephemeral key) are refused; replayed, reordered or tampered forward
cells fail their hop's authentication and destroy the circuit. Idle circuits expire.

Next hops: a relay extends only to an endpoint and CurveZMQ key that a verified record in its
`PeerDirectory` announces (so an EXTEND cannot aim it at an arbitrary host), opens new links at a
bounded rate (token bucket), backs off between reconnects, and closes a link whose next hop never
answered within the EXTEND timeout, so a dead target costs a handful of connection attempts, not
minutes of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .cells import (
    CIRCUIT_KINDS,
    CIRCUIT_REPLIES,
    Extend,
    cell_frame,
    created_body,
    pack_extended,
    parse_create,
    parse_created,
)
from .discovery import PeerDirectory
from .identity import Identity
from .onion import (
    DATA,
    END,
    EXTEND,
    EXTENDED,
    HopCircuit,
    OnionError,
    ReplayCache,
    hop_answer_create,
    unpack_payload,
)
from .onionkeys import OnionKeyRing
from .protocol import Message, PeerRecord, ProtocolError
from .routing import public_host
from .transport import Connection, Context, Reply, Server, TransportError, throwaway_curve_keys

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0
EXTEND_TIMEOUT_S = 5.0
MAX_CIRCUITS = 10_000
MAX_LINKS = 1_000  # next hops open at once
CREATE_WINDOW_S = 600.0  # a CREATE older than this is refused (its stamp is bound into the hop keys)
CLOCK_SKEW_S = 60.0
MAINTAIN_INTERVAL_S = 10.0  # idle expiry, onion key rotation, directory refresh
# libzmq reconnects a link whose peer is unreachable: after 0.5 s (plus up to as much jitter), doubling
# up to 2 s; a link that never answered is closed after EXTEND_TIMEOUT_S, so at most ~5 attempts
LINK_RECONNECT_S = (0.5, 2.0)
LINK_BURST = 32  # new next-hop links a relay may open at once ...
LINK_RATE_PER_S = 4.0  # ... and per second after that (links are shared by circuits and kept while used)
RESOLVE_TIMEOUT_S = 2.0  # a host name in an EXTEND
RECORD_CACHE_S = 10.0  # a `hello` answer is re-signed at most this often (floods cost no signatures)


class TokenBucket:
    """`burst` tokens refilled at `rate_per_s`; `take` spends one when there is one (pure, clock injected)."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s, self.burst, self.clock = rate_per_s, burst, clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(eq=False)
class Circuit:
    hop: HopCircuit
    reply: Reply  # towards the predecessor
    prev_cid: int
    state: str = "created"
    next_link: _Link | None = None
    next_cid: int = 0
    last_active: float = field(default_factory=time.monotonic)
    created: asyncio.Future[tuple[bytes, bytes]] | None = None  # the next hop's (Y, AUTH), while extending
    terminal_state: Any = None  # for the terminal handler (a seed's request assembly)
    closed: bool = False  # set once, by RelayService.destroy: a closed circuit carries nothing more

    @property
    def open(self) -> bool:
        return not self.closed

    async def send_back(self, command: int, data: bytes) -> None:
        """Originate a backward cell from this hop (the terminal's answers, EXTENDED)."""
        await self.reply.send("cell", {"cid": self.prev_cid}, self.hop.seal_backward(command, data, os.urandom))


TerminalHandler = Callable[[Circuit, int, bytes], Awaitable[None]]


class _Link:
    """A DEALER to one next hop, shared by every circuit this relay extends to it."""

    def __init__(self, service: RelayService, endpoint: str, curve_key: bytes) -> None:
        self.service = service
        self.conn = Connection(
            service.ctx, endpoint, server_key=curve_key, client_keys=service.link_keys, name=f"hop {endpoint}",
            reconnect_ivl_s=LINK_RECONNECT_S,
        )
        self.circuits: dict[int, Circuit] = {}
        self.idle_since = time.monotonic()
        self.answered = False  # the next hop has sent something: the link works
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                try:
                    message = await self.conn.recv(3600.0, CIRCUIT_REPLIES)
                except TransportError:
                    break
                self.answered = True
                circuit = self.circuits.get(message.get("cid", 0))
                if circuit is None:
                    continue
                try:
                    await self.service.from_next(circuit, message)
                except (OnionError, ProtocolError, ValueError, KeyError, TypeError) as exc:
                    self.service.counters["dropped"] += 1
                    await self.service.destroy(circuit, str(exc))
        finally:
            for circuit in list(self.circuits.values()):
                await self.service.destroy(circuit, "next hop gone", notify_next=False)
            self.service.forget_link(self)
            self.conn.close()

    def close(self) -> None:
        if self.reader is not asyncio.current_task():
            self.reader.cancel()
        self.conn.close()


class RelayService:
    def __init__(
        self,
        identity: Identity,
        ctx: Context,
        *,
        terminal: TerminalHandler | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        directory: PeerDirectory | None = None,
        onion_keys: OnionKeyRing | None = None,
        extend_timeout_s: float = EXTEND_TIMEOUT_S,
        link_bucket: TokenBucket | None = None,
    ) -> None:
        """`directory`: the verified records EXTENDs may target (default: none, so this relay only
        terminates circuits). `onion_keys`: the rotating onion keys (default: a fresh ring, in memory)."""
        self.identity = identity
        self.hop_id = identity.signing_public
        self.ctx = ctx
        self.terminal = terminal
        self.idle_timeout_s = idle_timeout_s
        self.extend_timeout_s = extend_timeout_s
        self.directory = directory if directory is not None else PeerDirectory()
        self.onion_keys = onion_keys if onion_keys is not None else OnionKeyRing()
        self.link_bucket = link_bucket if link_bucket is not None else TokenBucket(LINK_RATE_PER_S, LINK_BURST)
        self.on_rotate: Callable[[], Awaitable[object]] | None = None  # re-announce the new onion key
        self.on_close: Callable[[Circuit], None] | None = None  # the terminal frees what it held for a circuit
        # this relay's own endpoint, set by the node: a relay at a global address extends only to global
        # addresses (unset, or at a loopback/private address: a test or LAN swarm, where any address goes)
        self.own_endpoint: Callable[[], str] | None = None
        # this relay's current signed record, set by the node: answered to `hello` (an asker confirming its
        # guard directly, so that no tracker learns which relays are its guards)
        self.own_record: Callable[[], PeerRecord] | None = None
        self._record_cache: tuple[float, dict[str, Any]] | None = None
        self.circuits: dict[tuple[bytes, int], Circuit] = {}
        self.links: dict[tuple[str, bytes], _Link] = {}
        self.replays = ReplayCache(ttl_s=CREATE_WINDOW_S + 2 * CLOCK_SKEW_S)
        self.counters: dict[str, int] = {
            "circuits": 0, "cells": 0, "dropped": 0, "replays": 0, "unknown_onion_key": 0,
            "extend_refused": 0, "links_rate_limited": 0, "links_unanswered": 0, "rotations": 0,
        }
        # a relay's outgoing links use a key of their own, never its identity's CurveZMQ key
        self.link_keys = throwaway_curve_keys()

    @property
    def onion_public(self) -> bytes:
        """The onion key to announce in this relay's record now."""
        return self.onion_keys.current_public

    # --------------------------------------------------------------- from the predecessor

    async def handle(self, reply: Reply, message: Message) -> None:
        cid = message["cid"]
        key = (reply.route, cid)
        if message.kind == "create":
            await self._create(reply, cid, message)
            return
        circuit = self.circuits.get(key)
        if circuit is None:
            self.counters["dropped"] += 1
            return
        circuit.last_active = time.monotonic()
        if message.kind == "destroy":
            await self.destroy(circuit, message.get("reason", "destroyed by predecessor"), notify_prev=False)
            return
        try:
            await self._forward(circuit, cell_frame(message))
        except (OnionError, ProtocolError) as exc:
            self.counters["dropped"] += 1
            await self.destroy(circuit, str(exc))

    async def _create(self, reply: Reply, cid: int, message: Message) -> None:
        if (reply.route, cid) in self.circuits or len(self.circuits) >= MAX_CIRCUITS:
            await reply.send("destroy", {"cid": cid, "reason": "busy"})  # circuit id in use, or relay full
            return
        asker_public, onion_public, created_ms = parse_create(message)
        now_ms = time.time() * 1000
        if not now_ms - CREATE_WINDOW_S * 1000 <= created_ms <= now_ms + CLOCK_SKEW_S * 1000:
            self.counters["replays"] += 1
            # answered, not dropped: an honest asker whose clock is off learns why at once
            await reply.send("destroy", {"cid": cid, "reason": "create timestamp outside the window"})
            return
        onion_key = self.onion_keys.private_for(onion_public)
        if onion_key is None:
            # a record older than the grace period, or a key this relay never had: say so at once, so
            # the asker does not wait for a timeout (and a retry takes the relay's fresh record)
            self.counters["unknown_onion_key"] += 1
            await reply.send("destroy", {"cid": cid, "reason": "unknown onion key"})
            return
        # Under ntor a replayed CREATE is harmless (the answer has a fresh Y, so the replayer derives no
        # keys and replayed cells fail), so this memory only drops exact repeats, and it never refuses a
        # new key: unstamped, a full cache evicts its oldest entries. A stamped cache with a floor let a
        # flood of CREATEs stamped at the edge of the accepted skew refuse every honest CREATE.
        if not self.replays.check_and_add(asker_public):
            self.counters["replays"] += 1
            await reply.send("destroy", {"cid": cid, "reason": "replayed create"})
            return
        try:
            keys, hop_public, auth = hop_answer_create(onion_key, self.hop_id, asker_public, created_ms)
        except OnionError as exc:
            raise ProtocolError(str(exc)) from exc
        self.circuits[(reply.route, cid)] = Circuit(HopCircuit(keys), reply, cid)
        self.counters["circuits"] += 1
        await reply.send("created", created_body(cid, hop_public, auth))

    async def _forward(self, circuit: Circuit, frame: bytes) -> None:
        plain = circuit.hop.peel(frame)
        self.counters["cells"] += 1
        if circuit.state == "relaying" and circuit.next_link is not None:
            await circuit.next_link.conn.send("cell", {"cid": circuit.next_cid}, circuit.hop.next_cell(plain))
            return
        command, data = unpack_payload(plain)
        if command == EXTEND and circuit.state == "created":
            await self._extend(circuit, data)
        elif command in (DATA, END) and circuit.state == "created" and self.terminal is not None:
            await self.terminal(circuit, command, data)
        else:
            raise OnionError(f"unexpected command {command} in state {circuit.state}")

    async def _link_to(self, extend: Extend) -> _Link:
        """The link to an EXTEND's target: an open one, or a new one if the target is announced."""
        target = (extend.endpoint, extend.curve_key)
        link = self.links.get(target)
        if link is not None:
            return link
        if await self.directory.lookup(*target) is None:
            self.counters["extend_refused"] += 1
            raise OnionError(f"EXTEND to {extend.endpoint}, which no verified peer record announces")
        link = self.links.get(target)  # another circuit may have opened it while we looked
        if link is not None:
            return link
        if len(self.links) >= MAX_LINKS:
            raise OnionError("too many next hops open")
        if not self.link_bucket.take():
            self.counters["links_rate_limited"] += 1
            raise OnionError("too many new next-hop links; try again later")
        address = await self._checked_address(extend.endpoint)
        link = self.links.get(target)  # another circuit may have opened it while we resolved
        if link is not None:
            return link
        try:
            link = _Link(self, address, extend.curve_key)
        except Exception as exc:  # noqa: BLE001 - a bad endpoint from an asker must not hurt the relay
            raise OnionError(f"cannot reach next hop {extend.endpoint}") from exc
        self.links[target] = link
        return link

    async def _checked_address(self, endpoint: str) -> str:
        """Where to connect for an EXTEND to `endpoint`. A relay at a global address extends only to global
        addresses, like Tor's ExtendAllowPrivateAddresses 0: a record at a loopback or private address
        would otherwise make this relay connect to itself or its LAN (one machine standing for many hops,
        or a scan of the relay's network). A host name is resolved here, checked, and its address used
        for the connection, so DNS cannot answer one address to the check and another to the connect."""
        own = self.own_endpoint() if self.own_endpoint is not None else None
        if own is None or public_host(own.split("://", 1)[-1].rpartition(":")[0]) is not True:
            return endpoint
        host, _, port = endpoint.split("://", 1)[-1].rpartition(":")
        public = public_host(host)
        if public is True:
            return endpoint
        if public is False:
            self.counters["extend_refused"] += 1
            raise OnionError(f"EXTEND to {endpoint}: not a global address")
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
            )
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise OnionError(f"EXTEND to {endpoint}: the name does not resolve") from exc
        addresses = [str(info[4][0]) for info in infos]
        if not addresses or not all(public_host(a) is True for a in addresses):
            self.counters["extend_refused"] += 1
            raise OnionError(f"EXTEND to {endpoint}: the name leads to an address that is not global")
        first = addresses[0]
        return f"tcp://[{first}]:{port}" if ":" in first else f"tcp://{first}:{port}"

    def hello_record(self) -> dict[str, Any] | None:
        """This relay's current record for `hello` (re-signed at most every RECORD_CACHE_S)."""
        if self.own_record is None:
            return None
        now = time.monotonic()
        if self._record_cache is None or now - self._record_cache[0] > RECORD_CACHE_S:
            self._record_cache = (now, self.own_record().to_wire())
        return self._record_cache[1]

    async def _extend(self, circuit: Circuit, data: bytes) -> None:
        extend = Extend.unpack(data)
        circuit.state = "extending"  # before any wait: a second EXTEND meanwhile is refused
        link = await self._link_to(extend)
        if circuit.closed:
            return  # destroyed while the directory was asked
        if extend.next_cid in link.circuits:
            raise OnionError("next circuit id in use")
        circuit.next_link, circuit.next_cid = link, extend.next_cid
        circuit.created = asyncio.get_running_loop().create_future()
        link.circuits[extend.next_cid] = circuit
        await link.conn.send("create", extend.create_body())
        try:
            hop_public, auth = await asyncio.wait_for(circuit.created, self.extend_timeout_s)
        except TimeoutError:
            if not link.answered:  # the next hop never said a word: stop reconnecting to it
                self.counters["links_unanswered"] += 1
                self.forget_link(link)
                link.close()
            await self.destroy(circuit, "next hop did not answer")
            return
        circuit.state = "relaying"
        await circuit.send_back(EXTENDED, pack_extended(hop_public, auth))

    # --------------------------------------------------------------- from the successor

    async def from_next(self, circuit: Circuit, message: Message) -> None:
        circuit.last_active = time.monotonic()
        if message.kind == "created" and circuit.created is not None and not circuit.created.done():
            circuit.created.set_result(parse_created(message))
        elif message.kind == "cell" and circuit.state == "relaying":
            layered = circuit.hop.relay_backward(cell_frame(message))
            await circuit.reply.send("cell", {"cid": circuit.prev_cid}, layered)
        elif message.kind in ("destroy", "error"):
            await self.destroy(circuit, "destroyed by successor", notify_next=False)

    # --------------------------------------------------------------- teardown

    async def destroy(self, circuit: Circuit, reason: str, *, notify_prev: bool = True, notify_next: bool = True) -> None:
        if self.circuits.pop((circuit.reply.route, circuit.prev_cid), None) is None:
            return
        circuit.closed = True
        if self.on_close is not None:
            self.on_close(circuit)
        if circuit.created is not None and not circuit.created.done():
            circuit.created.cancel()
        link = circuit.next_link
        if link is not None:
            link.circuits.pop(circuit.next_cid, None)
            if notify_next:
                try:
                    await link.conn.send("destroy", {"cid": circuit.next_cid, "reason": reason[:64]})
                except Exception:  # noqa: BLE001 - best effort
                    pass
            if not link.circuits:
                link.idle_since = time.monotonic()  # kept for reuse; expire_idle closes it later
        if notify_prev:
            try:
                await circuit.reply.send("destroy", {"cid": circuit.prev_cid, "reason": reason[:64]})
            except Exception:  # noqa: BLE001 - best effort
                pass
        log.debug("circuit destroyed: %s", reason)

    def forget_link(self, link: _Link) -> None:
        for key, value in list(self.links.items()):
            if value is link:
                del self.links[key]

    async def expire_idle(self) -> int:
        """Destroy idle circuits; close next-hop links that carried no circuit for as long."""
        cutoff = time.monotonic() - self.idle_timeout_s
        idle = [c for c in self.circuits.values() if c.last_active < cutoff]
        for circuit in idle:
            await self.destroy(circuit, "idle")
        for link in list(self.links.values()):
            if not link.circuits and link.idle_since < cutoff:
                self.forget_link(link)
                link.close()
        return len(idle)

    async def maintain(self) -> None:
        """One round of upkeep: expire idle circuits, rotate the onion key when due (and re-announce
        at once), refresh the directory when due."""
        await self.expire_idle()
        if self.onion_keys.rotate_if_due():
            self.counters["rotations"] += 1
            if self.on_rotate is not None:
                await self.on_rotate()
        await self.directory.refresh_if_due()

    async def expire_loop(self) -> None:
        """`maintain` forever (the name predates rotation: seeds and relay nodes run this loop)."""
        while True:
            await asyncio.sleep(min(MAINTAIN_INTERVAL_S, self.idle_timeout_s / 2))
            try:
                await self.maintain()
            except Exception:  # noqa: BLE001 - upkeep must never stop the relay
                log.exception("relay upkeep failed")

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        for circuit in self.circuits.values():
            circuit.closed = True
        self.circuits.clear()


async def serve_relay(
    server: Server,
    service: RelayService,
    other: Callable[[Reply, Message], Awaitable[None]] | None = None,
    other_kinds: frozenset[str] = frozenset(),
) -> None:
    """Serve circuit messages (and, for a seed, its other kinds) on `server` forever."""

    async def dispatch(reply: Reply, message: Message) -> None:
        if message.kind in CIRCUIT_KINDS:
            await service.handle(reply, message)
        elif message.kind == "hello":
            record = service.hello_record()
            if record is not None:
                await reply.send("hello_ok", {"record": record})
        elif other is not None:
            await other(reply, message)

    await server.serve(dispatch, CIRCUIT_KINDS | other_kinds | {"hello"})
