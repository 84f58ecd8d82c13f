"""One relay, wired: the single home of what `gtorrent relay` (node.run_relay) and the demo both run.

A relay node is a CurveZMQ ROUTER serving circuit messages, a `RelayService` (its rotating onion keys
and a `PeerDirectory` of verified records from its trackers, the only EXTEND targets it accepts), an
`Announcer` keeping its signed record fresh, and the upkeep loop (idle expiry, onion key rotation
with an immediate re-announce, directory refresh). Invariant: the record always announces the relay's
current onion key, so a CREATE made from a fresh record always names a key the relay honours.
"""

from __future__ import annotations

import asyncio
import time

from .discovery import Announcer, PeerDirectory
from .identity import Identity
from .onionkeys import OnionKeyRing
from .protocol import PeerRecord
from .relay import IDLE_TIMEOUT_S, RelayService, TerminalHandler, serve_relay
from .transport import Context, Server

RECORD_TTL_S = 90.0  # as a seed's; onionkeys.GRACE_S covers it


class RelayNode:
    def __init__(
        self,
        identity: Identity,
        ctx: Context,
        trackers: list[str],
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        directory: PeerDirectory | None = None,
        onion_keys: OnionKeyRing | None = None,
        terminal: TerminalHandler | None = None,
        name: str = "relay",
    ) -> None:
        self.identity = identity
        self.server = Server(ctx, curve_secret=identity.curve_secret, name=name)
        self.directory = directory if directory is not None else PeerDirectory(ctx, trackers)
        self.relay = RelayService(
            identity, ctx, terminal=terminal, idle_timeout_s=idle_timeout_s, directory=self.directory, onion_keys=onion_keys
        )
        self.announcer = Announcer(ctx, trackers, self.record, RECORD_TTL_S / 3)
        self.relay.on_rotate = self.announcer.announce  # the new key is announced at once
        self.relay.own_endpoint = lambda: self.server.endpoint
        self.relay.own_record = self.record
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def bind(self, url: str, advertise: str | None = None) -> str:
        return self.server.bind(url, advertise)

    def record(self, stopped: bool = False) -> PeerRecord:
        """This relay's signed record, announcing its current onion key."""
        now = time.time()
        return PeerRecord.sign(
            self.identity, endpoint=self.server.endpoint, roles=("relay",), seq=int(now * 1000),
            expires=now + RECORD_TTL_S, stopped=stopped, onion_key=self.relay.onion_public,
        )

    async def start(self) -> dict[str, str]:
        """Serve, announce once, then keep announcing and upkeeping; {tracker: error} of that announce."""
        self.tasks += [asyncio.create_task(serve_relay(self.server, self.relay)), asyncio.create_task(self.relay.expire_loop())]
        errors = await self.announcer.announce()
        self.tasks.append(asyncio.create_task(self.announcer.loop()))
        return errors

    async def stop(self) -> dict[str, str]:
        """Stop serving and tell the trackers; {tracker: error} for those that did not hear it."""
        for task in self.tasks:
            task.cancel()
        return await self.announcer.stop()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.relay.close()
        self.server.close()
