"""The asker's side of a circuit: build it hop by hop through relays, then send and receive cells.

Each circuit has its own DEALER connection with a throwaway CurveZMQ key, so the first relay cannot
link two circuits of one ask by key, and a random circuit id per link (chosen here, so that no two
links share one). `build` CREATEs the first hop and EXTENDs one hop at a time, checking each hop's
CREATED proof against the onion key in its signed record.
"""

from __future__ import annotations

import os
import secrets

from .errors import GtorrentError
from .identity import b64, short_id, unb64
from .onion import DATA, END, EXTEND, EXTENDED, ClientCircuit, OnionError, PendingHop
from .protocol import PeerRecord, ProtocolError
from .relay import cell_frame, pack_extend
from .transport import Connection, Context, TransportError

HOP_TIMEOUT_S = 5.0
CIRCUIT_REPLIES = frozenset({"created", "cell", "destroy", "error"})


class CircuitError(GtorrentError):
    """A circuit could not be built, or broke."""


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
        pending = PendingHop.start(first.onion_key)
        body = {"cid": self.cid, "key": b64(pending.ephemeral_public), "ts": pending.created_ms}
        reply = await self._request("create", body, timeout_s)
        if reply.kind != "created":
            raise CircuitError(f"relay {short_id(first.peer_id)} refused the circuit")
        self.onion.add_hop(self._finish(pending, reply.get("auth", ""), first))
        for hop in self.hops[1:]:
            pending = PendingHop.start(hop.onion_key)
            extend = pack_extend(new_cid(), pending.ephemeral_public, hop.curve_key, pending.created_ms, hop.endpoint)
            await self.conn.send("cell", {"cid": self.cid}, self.onion.wrap(EXTEND, extend, os.urandom))
            index, command, auth = await self.receive(timeout_s)
            if command != EXTENDED or index != len(self.onion.hops) - 1:
                raise CircuitError(f"unexpected answer while extending to {short_id(hop.peer_id)}")
            self.onion.add_hop(self._finish(pending, b64(auth), hop))

    def _finish(self, pending: PendingHop, auth: str, hop: PeerRecord):  # type: ignore[no-untyped-def]
        try:
            return pending.finish(unb64(auth))
        except (OnionError, ValueError, TypeError) as exc:
            raise CircuitError(f"hop {short_id(hop.peer_id)} failed its key proof") from exc

    async def _request(self, kind: str, body: dict[str, object], timeout_s: float):  # type: ignore[no-untyped-def]
        try:
            return await self.conn.request(kind, body, CIRCUIT_REPLIES, timeout_s)
        except TransportError as exc:
            raise CircuitError(f"circuit setup failed: {exc.message}") from exc

    async def send(self, data: bytes, command: int = DATA) -> None:
        await self.conn.send("cell", {"cid": self.cid}, self.onion.wrap(command, data, os.urandom))

    async def receive(self, timeout_s: float) -> tuple[int, int, bytes]:
        """The next backward cell: (originating hop index, command, data)."""
        while True:
            try:
                message = await self.conn.recv(timeout_s, CIRCUIT_REPLIES)
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
