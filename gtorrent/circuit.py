"""The asker's side of a circuit: build it hop by hop through relays, then send and receive cells.

Each circuit has its own DEALER connection with a throwaway CurveZMQ key, so the first relay cannot
link two circuits of one ask by key, and a random circuit id per link (chosen here, so that no two
links share one). `build` CREATEs the first hop and EXTENDs one hop at a time, running the ntor
handshake (onion.py) with each hop against the identity and onion key in its signed record and
checking the hop's AUTH. When `build` fails, `CircuitError.hop` says which hop of the route did not
answer or failed its proof, and `CircuitError.first` the earliest hop that may have caused it instead
(see the class). `receive` waits at most its timeout in all, whatever the first relay sends meanwhile.
Wire forms come from cells.py, shared with the relays (this module never imports the relay).
"""

from __future__ import annotations

import asyncio
import os
import secrets

from .cells import CIRCUIT_REPLIES, Extend, cell_frame, create_body, parse_created, unpack_extended
from .errors import GtorrentError
from .identity import short_id
from .onion import DATA, END, EXTEND, EXTENDED, ClientCircuit, HopKeys, OnionError, PendingHop
from .protocol import Message, PeerRecord, ProtocolError
from .transport import Connection, Context, PeerDisconnected, PeerRefused, PeerTimeout, TransportError

HOP_TIMEOUT_S = 5.0


class CircuitError(GtorrentError):
    """A circuit could not be built, or broke. `hop`: index into the route of the peer that did not
    answer or failed its key proof while building (None when unknown, or once built).

    `first` (<= hop): the earliest hop that may be at fault instead, so that the peers to suspect are
    route[first : hop + 1]. Any relay before `hop` can swallow the EXTEND or send a `destroy` of its
    own (a destroy carries no proof of who started it), so a silence or a destroy while extending to
    hop i names hops 0..i; a failed key proof came in hop i-1's EXTENDED, which relays hop i's
    CREATED, so it names hops i-1 and i; a cell sealed by hop j that is not the EXTENDED expected
    names hop j alone."""

    def __init__(self, message: str, hint: str | None = None, *, hop: int | None = None,
                 first: int | None = None) -> None:
        super().__init__(message, hint)
        self.hop = hop
        self.first = hop if first is None or hop is None else min(first, hop)


def new_cid() -> int:
    return secrets.randbits(63) or 1


class CircuitClient:
    def __init__(self, ctx: Context, hops: list[PeerRecord]) -> None:
        if not hops:
            raise CircuitError("a circuit needs at least one hop")
        self.hops = hops
        self.cid = new_cid()
        self.onion = ClientCircuit()
        first = hops[0]
        self.conn = Connection(ctx, first.endpoint, server_key=first.curve_key, name=f"relay {short_id(first.peer_id)}")

    @property
    def route(self) -> list[str]:
        return [record.peer_id for record in self.hops]

    async def build(self, timeout_s: float = HOP_TIMEOUT_S) -> None:
        """CREATE the first hop, then EXTEND to each further one."""
        first = self.hops[0]
        pending = PendingHop.start(first.signing_key, first.onion_key)
        body = create_body(self.cid, pending.ephemeral_public, first.onion_key, pending.created_ms)
        reply = await self._request("create", body, timeout_s)
        if reply.kind != "created":
            reason = reply.get("reason") or reply.get("message") or reply.kind
            raise CircuitError(f"relay {short_id(first.peer_id)} refused the circuit ({reason})", hop=0)
        try:
            hop_public, auth = parse_created(reply)
        except OnionError as exc:
            raise CircuitError(f"hop {short_id(first.peer_id)} sent a malformed CREATED", hop=0) from exc
        self.onion.add_hop(self._finish(pending, hop_public, auth, 0))
        for index, hop in enumerate(self.hops[1:], start=1):
            pending = PendingHop.start(hop.signing_key, hop.onion_key)
            extend = Extend(new_cid(), pending.ephemeral_public, hop.onion_key, hop.curve_key, pending.created_ms, hop.endpoint)
            await self.conn.send("cell", {"cid": self.cid}, self.onion.wrap(EXTEND, extend.pack(), os.urandom))
            try:
                origin, command, payload = await self.receive(timeout_s)
            except CircuitError as exc:
                # a relay reports a next hop that never answered (or refused the CREATE) by destroying
                # the circuit, but any relay before hop `index` may send that destroy, or swallow the
                # EXTEND: they are all suspects with the hop being reached. A broken link to the first
                # hop is the first hop's.
                lost_first = isinstance(exc.__cause__, (PeerDisconnected, PeerRefused))
                blamed = 0 if lost_first else index
                raise CircuitError(f"extending to {short_id(hop.peer_id)} failed: {exc.message}",
                                   hop=blamed, first=0) from exc
            # a cell sealed by hop j came from hop j (no other peer has its keys): j alone is at fault
            # when it is not the EXTENDED expected from the newest hop, or not a well-formed one
            if origin != len(self.onion.hops) - 1 or command != EXTENDED:
                raise CircuitError(f"hop {short_id(self.hops[origin].peer_id)} sent an unexpected cell while "
                                   f"extending to {short_id(hop.peer_id)}", hop=origin)
            try:
                hop_public, auth = unpack_extended(payload)
            except OnionError as exc:
                raise CircuitError(f"hop {short_id(self.hops[origin].peer_id)} sent a malformed EXTENDED",
                                   hop=origin) from exc
            self.onion.add_hop(self._finish(pending, hop_public, auth, index))

    def _finish(self, pending: PendingHop, hop_public: bytes, auth: bytes, index: int) -> HopKeys:
        try:
            return pending.finish(hop_public, auth)
        except OnionError as exc:
            # hop index-1 relayed the CREATED it carries (and sealed the EXTENDED): it may have spoilt it
            raise CircuitError(f"hop {short_id(self.hops[index].peer_id)} failed its key proof",
                               hop=index, first=max(index - 1, 0)) from exc

    async def _request(self, kind: str, body: dict[str, object], timeout_s: float) -> Message:
        try:
            return await self.conn.request(kind, body, CIRCUIT_REPLIES, timeout_s)
        except TransportError as exc:
            raise CircuitError(f"circuit setup failed: {exc.message}", hop=0) from exc

    async def send(self, data: bytes, command: int = DATA) -> None:
        await self.conn.send("cell", {"cid": self.cid}, self.onion.wrap(command, data, os.urandom))

    async def receive(self, timeout_s: float) -> tuple[int, int, bytes]:
        """The next backward cell: (originating hop index, command, data), within `timeout_s` in all.

        One deadline for the whole call: messages for another circuit id or of an ignored kind do not
        restart the wait, so a first relay trickling junk cannot hold the asker forever."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PeerTimeout(f"no cell from {self.conn.name} in {timeout_s:g} s")
                message = await self.conn.recv(remaining, CIRCUIT_REPLIES)
            except PeerTimeout as exc:
                raise CircuitError(f"circuit broke: no cell from {self.conn.name} in {timeout_s:g} s") from exc
            except TransportError as exc:
                raise CircuitError(f"circuit broke: {exc.message}") from exc
            if message.get("cid") != self.cid:
                continue
            if message.kind in ("destroy", "error"):
                raise CircuitError(f"circuit destroyed ({message.get('reason') or message.get('message', '')})")
            if message.kind != "cell":
                continue
            try:
                return self.onion.unwrap(cell_frame(message))
            except (OnionError, ProtocolError) as exc:
                raise CircuitError(f"bad cell on the circuit: {exc}") from exc

    async def close(self) -> None:
        try:
            await self.conn.send("destroy", {"cid": self.cid, "reason": "done"})
        except Exception:  # noqa: BLE001 - best effort
            pass
        self.conn.close()


__all__ = ["END", "CircuitClient", "CircuitError", "new_cid"]
