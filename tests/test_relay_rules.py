"""A relay at a global address extends only to global addresses (a record at a loopback or private
address would make it connect to itself or its LAN), and answers `hello` with its own current record,
which is how an asker confirms its guards. Real services on loopback sockets."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from gtorrent.identity import Identity
from gtorrent.onion import OnionError
from gtorrent.private import confirm
from gtorrent.protocol import RECORD_LABEL, PeerRecord, canonical
from gtorrent.relay import RelayService
from gtorrent.transport import new_context

from .test_private import Swarm

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("tcp://93.184.216.34:7000", True),
        ("tcp://[2a01:4f8::1]:7000", True),
        ("tcp://127.0.0.1:7000", False),
        ("tcp://10.1.2.3:7000", False),
        ("tcp://192.168.0.7:7000", False),
        ("tcp://169.254.1.1:7000", False),
        ("tcp://[::1]:7000", False),
        ("tcp://[::ffff:10.0.0.1]:7000", False),
        ("tcp://[fd00::1]:7000", False),
        ("tcp://localhost:7000", False),  # a name is resolved by the relay and checked
    ],
)
async def test_a_public_relay_extends_only_to_public_addresses(target: str, allowed: bool) -> None:
    ctx = new_context()
    try:
        service = RelayService(Identity.generate(), ctx)
        service.own_endpoint = lambda: "tcp://93.184.216.35:7000"
        if allowed:
            assert await service._checked_address(target) == target
        else:
            with pytest.raises(OnionError):
                await service._checked_address(target)
            assert service.counters["extend_refused"] == 1
        # a relay on loopback or a LAN (a test swarm) extends anywhere
        service.own_endpoint = lambda: "tcp://10.0.0.2:7000"
        assert await service._checked_address(target) == target
        service.close()
    finally:
        ctx.destroy(linger=0)


async def test_relays_answer_hello_as_themselves_and_copies_fail(swarm: Swarm) -> None:
    await swarm.start(relays=3)
    records: list[PeerRecord] = []
    for peer_id, (_server, service) in swarm.relays.items():
        records.append(PeerRecord.from_wire(service.hello_record()))
        assert records[-1].peer_id == peer_id and records[-1].onion_key == service.onion_public
    answered = await confirm(swarm.ctx, records)
    assert set(answered) == set(swarm.relays)
    # a copy of a relay's endpoint and CurveZMQ key under another identity: the relay answers as itself
    identity = Identity.generate()
    copied: Any = replace(records[0], peer_id=identity.peer_id, signing_key=identity.signing_public)
    copied = replace(copied, signature=identity.sign(RECORD_LABEL + canonical(copied.unsigned_wire())))
    # a copy of the endpoint under its own CurveZMQ key: the handshake fails
    keyed = PeerRecord.sign(identity, endpoint=records[1].endpoint, roles=("relay",), seq=1, expires=time.time() + 60)
    assert await confirm(swarm.ctx, [copied, keyed], timeout_s=1.0) == {}
