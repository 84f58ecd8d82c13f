"""Onion layers (pure): each hop peels exactly its layer; tampering and replays are rejected; cells
keep one size on every link; the CREATED proof binds a hop to its onion key."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtorrent.onion import (
    CELL_BYTES,
    DATA,
    END,
    EXTEND,
    EXTENDED,
    ClientCircuit,
    HopCircuit,
    OnionError,
    PendingHop,
    ReplayCache,
    forward_capacity,
    hop_answer_create,
    raw_public,
    unpack_payload,
)


def build(hop_count: int = 4) -> tuple[ClientCircuit, list[HopCircuit]]:
    client = ClientCircuit()
    hops = []
    for _ in range(hop_count):
        onion_key = X25519PrivateKey.generate()
        pending = PendingHop.start(raw_public(onion_key))
        keys, auth = hop_answer_create(onion_key, pending.ephemeral_public, pending.created_ms)
        client.add_hop(pending.finish(auth))
        hops.append(HopCircuit(keys))
    return client, hops


def forward_through(hops: list[HopCircuit], cell: bytes) -> tuple[list[bytes], tuple[int, bytes]]:
    """Pass a cell through every hop; return the cells seen on each link and the terminal payload."""
    links = [cell]
    for hop in hops[:-1]:
        cell = hop.next_cell(hop.peel(cell))
        links.append(cell)
    return links, unpack_payload(hops[-1].peel(cell))


def backward_through(hops: list[HopCircuit], origin: int, command: int, data: bytes) -> bytes:
    cell = hops[origin].seal_backward(command, data, os.urandom)
    for hop in reversed(hops[:origin]):
        cell = hop.relay_backward(cell)
    return cell


@pytest.mark.parametrize("hop_count", [1, 2, 4, 9])
def test_each_hop_peels_its_layer_and_cells_keep_their_size(hop_count: int) -> None:
    client, hops = build(hop_count)
    for i in range(5):
        message = os.urandom(random.Random(i).randint(0, forward_capacity(hop_count)))
        links, (command, data) = forward_through(hops, client.wrap(DATA, message, os.urandom))
        assert (command, data) == (DATA, message)
        assert all(len(link) == CELL_BYTES for link in links)
        assert len(set(links)) == len(links)  # nothing travels unchanged from one link to the next
        answer = os.urandom(200)
        assert client.unwrap(backward_through(hops, hop_count - 1, DATA, answer)) == (hop_count - 1, DATA, answer)


def test_a_hop_cannot_peel_another_hops_layer() -> None:
    client, hops = build(4)
    cell = client.wrap(DATA, b"secret clove", os.urandom)
    for wrong in hops[1:]:
        with pytest.raises(OnionError):
            HopCircuit(wrong.keys).peel(cell)
    plain = hops[0].peel(cell)
    assert b"secret clove" not in plain  # still wrapped for the hops after it
    with pytest.raises(OnionError):
        HopCircuit(hops[3].keys).peel(hops[0].next_cell(plain))


def test_extend_for_an_inner_hop_then_data_for_the_terminal() -> None:
    client, hops = build(3)
    cell = client.wrap(EXTEND, b"next hop", os.urandom, upto=2)
    assert unpack_payload(hops[1].peel(hops[0].next_cell(hops[0].peel(cell)))) == (EXTEND, b"next hop")
    assert client.unwrap(backward_through(hops, 1, EXTENDED, b"proof")) == (1, EXTENDED, b"proof")
    _, payload = forward_through(hops, client.wrap(DATA, b"after", os.urandom))
    assert payload == (DATA, b"after")
    assert client.unwrap(backward_through(hops, 2, END, b"")) == (2, END, b"")


@pytest.mark.parametrize("position", [0, 15, 16, 500, CELL_BYTES - 1])
def test_flipped_bit_is_detected_by_the_next_hop(position: int) -> None:
    client, hops = build(3)
    cell = bytearray(client.wrap(DATA, b"x" * 100, os.urandom))
    cell[position] ^= 0x01
    with pytest.raises(OnionError, match="authentication"):
        hops[0].peel(bytes(cell))
    # tampering by a relay on the way is caught by the next hop too
    client, hops = build(3)
    relayed = bytearray(hops[0].next_cell(hops[0].peel(client.wrap(DATA, b"y", os.urandom))))
    relayed[position] ^= 0x80
    with pytest.raises(OnionError):
        hops[1].peel(bytes(relayed))


def test_replayed_forward_cell_is_rejected() -> None:
    client, hops = build(2)
    cell = client.wrap(DATA, b"once", os.urandom)
    hops[0].peel(cell)
    with pytest.raises(OnionError):
        hops[0].peel(cell)


def test_tampered_or_replayed_backward_cell_is_rejected_by_the_asker() -> None:
    client, hops = build(3)
    cell = backward_through(hops, 2, DATA, b"answer")
    flipped = bytearray(cell)
    flipped[700] ^= 0x04
    with pytest.raises(OnionError):
        client.unwrap(bytes(flipped))
    assert client.unwrap(cell)[2] == b"answer"
    with pytest.raises(OnionError):
        client.unwrap(cell)  # the same cell again: the counters have moved on


def test_created_proof_binds_the_hop_key() -> None:
    real, impostor = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pending = PendingHop.start(raw_public(real))
    _, forged = hop_answer_create(impostor, pending.ephemeral_public, pending.created_ms)
    with pytest.raises(OnionError, match="proof"):
        pending.finish(forged)
    # a CREATE replayed with a fresher timestamp derives other keys: its proof (and cells) fail
    _, restamped = hop_answer_create(real, pending.ephemeral_public, pending.created_ms + 1)
    with pytest.raises(OnionError, match="proof"):
        pending.finish(restamped)
    with pytest.raises(OnionError):
        hop_answer_create(real, b"\x00" * 32, 0)  # low-order point
    with pytest.raises(OnionError):
        hop_answer_create(real, b"short", 0)


def test_payload_limits() -> None:
    client, _ = build(4)
    with pytest.raises(OnionError, match="does not fit"):
        client.wrap(DATA, bytes(forward_capacity(4) + 1), os.urandom)
    client.wrap(DATA, bytes(forward_capacity(4)), os.urandom)
    with pytest.raises(OnionError):
        unpack_payload(b"\x09\x00\x05hello")


def test_replay_cache_with_injected_clock() -> None:
    now = [0.0]
    cache = ReplayCache(ttl_s=10, max_entries=3, clock=lambda: now[0])
    assert cache.check_and_add(b"a") and not cache.check_and_add(b"a")
    now[0] = 11.0
    assert cache.check_and_add(b"a")  # expired, so no longer a replay
    assert cache.check_and_add(b"b") and cache.check_and_add(b"c")
    assert not cache.check_and_add(b"d")  # full: refused, and no live entry is evicted to make room
    assert not cache.check_and_add(b"a") and not cache.check_and_add(b"b")
    now[0] = 30.0
    assert cache.check_and_add(b"d")  # the old entries expired
