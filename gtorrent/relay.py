"""The relay: forwards onion cells for the circuits it is part of (every seed relays too).

Per circuit a relay knows its predecessor (a ROUTER route and the circuit id of that link), its
successor once the asker EXTENDs (a DEALER link and the circuit id the asker chose for it) and its own
hop keys — nothing else: not the asker, not its position, not the other hops. It never sees a prompt
or an answer: what it forwards is still wrapped for the hops after it, and what reaches a seed is a
single S-IDA clove.

State machine of a circuit at a relay (transitions as the table reads):

    (none)   --create-->            OPEN      (CREATED sent back)
    OPEN     --cell: EXTEND-->      EXTENDING (CREATE sent to the next hop)
    EXTENDING--created-->           RELAYING  (EXTENDED sealed back to the asker)
    RELAYING --cell-->              RELAYING  (peel, forward; backward cells get a layer)
    OPEN     --cell: DATA-->        OPEN      (terminal only: handed to the terminal handler)
    any      --destroy / idle / error--> (none)  (destroy sent to the other side)

Replayed CREATEs (same ephemeral key) are refused; replayed, reordered or tampered forward cells fail
their hop's authentication and destroy the circuit. Idle circuits expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .identity import Identity, b64, unb64
from .onion import (
    CELL_BYTES,
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
from .protocol import Message, ProtocolError
from .transport import Connection, Context, Reply, Server, TransportError

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0
EXTEND_TIMEOUT_S = 5.0
MAX_CIRCUITS = 10_000
MAX_LINKS = 1_000  # next hops open at once
TCP_ENDPOINT = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}$")
_EXTEND_HEAD = struct.Struct(">Q32s32sQ")  # next circuit id, ephemeral key, next hop's CurveZMQ key, created ms
CREATE_WINDOW_S = 600.0  # a CREATE older than this is refused; the replay cache covers the window
CLOCK_SKEW_S = 60.0
CIRCUIT_KINDS = frozenset({"create", "cell", "destroy"})


def pack_extend(next_cid: int, ephemeral_public: bytes, curve_key: bytes, created_ms: int, endpoint: str) -> bytes:
    return _EXTEND_HEAD.pack(next_cid, ephemeral_public, curve_key, created_ms) + endpoint.encode("ascii")


def unpack_extend(data: bytes) -> tuple[int, bytes, bytes, int, str]:
    if len(data) <= _EXTEND_HEAD.size or len(data) > _EXTEND_HEAD.size + 256:
        raise OnionError("malformed EXTEND")
    next_cid, ephemeral, curve_key, created_ms = _EXTEND_HEAD.unpack_from(data)
    try:
        endpoint = data[_EXTEND_HEAD.size :].decode("ascii")
    except UnicodeDecodeError as exc:
        raise OnionError("malformed EXTEND endpoint") from exc
    if not 0 < next_cid < 1 << 63 or created_ms >= 1 << 63:
        raise OnionError("bad circuit id or timestamp")
    return next_cid, ephemeral, curve_key, created_ms, endpoint


def cell_frame(message: Message) -> bytes:
    if len(message.binary) != 1 or len(message.binary[0]) != CELL_BYTES:
        raise ProtocolError("a cell carries exactly one frame of CELL_BYTES")
    return message.binary[0]


@dataclass(eq=False)
class Circuit:
    hop: HopCircuit
    reply: Reply  # towards the predecessor
    prev_cid: int
    state: str = "open"
    next_link: _Link | None = None
    next_cid: int = 0
    last_active: float = field(default_factory=time.monotonic)
    created: asyncio.Future[bytes] | None = None  # while extending
    terminal_state: Any = None  # for the terminal handler (a seed's request assembly)

    async def send_back(self, command: int, data: bytes) -> None:
        """Originate a backward cell from this hop (the terminal's answers, EXTENDED)."""
        await self.reply.send("cell", {"cid": self.prev_cid}, self.hop.seal_backward(command, data, os.urandom))


TerminalHandler = Callable[[Circuit, int, bytes], Awaitable[None]]


class _Link:
    """A DEALER to one next hop, shared by every circuit this relay extends to it."""

    def __init__(self, service: RelayService, endpoint: str, curve_key: bytes) -> None:
        self.service = service
        self.conn = Connection(service.ctx, endpoint, server_key=curve_key, client_keys=service.link_keys, name=f"hop {endpoint}")
        self.circuits: dict[int, Circuit] = {}
        self.idle_since = time.monotonic()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                try:
                    message = await self.conn.recv(3600.0, frozenset({"created", "cell", "destroy", "error"}))
                except TransportError:
                    break
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
    ) -> None:
        self.identity = identity
        self.ctx = ctx
        self.terminal = terminal
        self.idle_timeout_s = idle_timeout_s
        self.circuits: dict[tuple[bytes, int], Circuit] = {}
        self.links: dict[tuple[str, bytes], _Link] = {}
        self.replays = ReplayCache(ttl_s=CREATE_WINDOW_S + 2 * CLOCK_SKEW_S)
        self.counters: dict[str, int] = {"circuits": 0, "cells": 0, "dropped": 0, "replays": 0}
        # a relay's outgoing links use a key of their own, never its identity's CurveZMQ key
        from .transport import throwaway_curve_keys

        self.link_keys = throwaway_curve_keys()

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
        try:
            ephemeral = unb64(message["key"])
        except (ValueError, TypeError):
            raise ProtocolError("create: bad key") from None
        created_ms = message["ts"]
        now_ms = time.time() * 1000
        if not now_ms - CREATE_WINDOW_S * 1000 <= created_ms <= now_ms + CLOCK_SKEW_S * 1000:
            self.counters["replays"] += 1
            raise ProtocolError("create: timestamp outside the accepted window")
        if not self.replays.check_and_add(ephemeral):
            self.counters["replays"] += 1
            raise ProtocolError("create: replayed ephemeral key (or replay cache full)")
        try:
            keys, auth = hop_answer_create(self.identity.onion_key, ephemeral, created_ms)
        except OnionError as exc:
            raise ProtocolError(str(exc)) from exc
        self.circuits[(reply.route, cid)] = Circuit(HopCircuit(keys), reply, cid)
        self.counters["circuits"] += 1
        await reply.send("created", {"cid": cid, "auth": b64(auth)})

    async def _forward(self, circuit: Circuit, frame: bytes) -> None:
        plain = circuit.hop.peel(frame)
        self.counters["cells"] += 1
        if circuit.state == "relaying" and circuit.next_link is not None:
            await circuit.next_link.conn.send("cell", {"cid": circuit.next_cid}, circuit.hop.next_cell(plain))
            return
        command, data = unpack_payload(plain)
        if command == EXTEND and circuit.state == "open":
            await self._extend(circuit, data)
        elif command in (DATA, END) and circuit.state == "open" and self.terminal is not None:
            await self.terminal(circuit, command, data)
        else:
            raise OnionError(f"unexpected command {command} in state {circuit.state}")

    async def _extend(self, circuit: Circuit, data: bytes) -> None:
        next_cid, ephemeral, curve_key, created_ms, endpoint = unpack_extend(data)
        if not TCP_ENDPOINT.match(endpoint):
            raise OnionError("EXTEND to something that is not tcp://HOST:PORT")
        link = self.links.get((endpoint, curve_key))
        if link is None:
            if len(self.links) >= MAX_LINKS:
                raise OnionError("too many next hops open")
            try:
                link = _Link(self, endpoint, curve_key)
            except Exception as exc:  # noqa: BLE001 - a bad endpoint from an asker must not hurt the relay
                raise OnionError(f"cannot reach next hop {endpoint}") from exc
            self.links[(endpoint, curve_key)] = link
        if next_cid in link.circuits:
            raise OnionError("next circuit id in use")
        circuit.state, circuit.next_link, circuit.next_cid = "extending", link, next_cid
        circuit.created = asyncio.get_running_loop().create_future()
        link.circuits[next_cid] = circuit
        await link.conn.send("create", {"cid": next_cid, "key": b64(ephemeral), "ts": created_ms})
        try:
            auth = await asyncio.wait_for(circuit.created, EXTEND_TIMEOUT_S)
        except TimeoutError:
            await self.destroy(circuit, "next hop did not answer")
            return
        circuit.state = "relaying"
        await circuit.send_back(EXTENDED, auth)

    # --------------------------------------------------------------- from the successor

    async def from_next(self, circuit: Circuit, message: Message) -> None:
        circuit.last_active = time.monotonic()
        if message.kind == "created" and circuit.created is not None and not circuit.created.done():
            circuit.created.set_result(unb64(message["auth"]))
        elif message.kind == "cell" and circuit.state == "relaying":
            layered = circuit.hop.relay_backward(cell_frame(message))
            await circuit.reply.send("cell", {"cid": circuit.prev_cid}, layered)
        elif message.kind in ("destroy", "error"):
            await self.destroy(circuit, "destroyed by successor", notify_next=False)

    # --------------------------------------------------------------- teardown

    async def destroy(self, circuit: Circuit, reason: str, *, notify_prev: bool = True, notify_next: bool = True) -> None:
        if self.circuits.pop((circuit.reply.route, circuit.prev_cid), None) is None:
            return
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

    async def expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.idle_timeout_s / 2))
            await self.expire_idle()

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
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
        elif other is not None:
            await other(reply, message)

    await server.serve(dispatch, CIRCUIT_KINDS | other_kinds)
