"""Onion layers (pure): each hop peels exactly its layer; tampering and replays are rejected; cells
keep one size on every link; the ntor handshake binds a hop to its onion key and identity and gives
forward secrecy; onion keys rotate with a grace period; EXTEND/EXTENDED payloads round-trip."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtorrent.cells import Extend, pack_extended, unpack_extended
from gtorrent.onion import (
    CELL_BYTES,
    DATA,
    END,
    EXTEND,
    EXTENDED,
    ClientCircuit,
    HopCircuit,
    HopKeys,
    OnionError,
    PendingHop,
    ReplayCache,
    forward_capacity,
    hop_answer_create,
    ntor_keys,
    raw_public,
    unpack_payload,
)
from gtorrent.onionkeys import GRACE_S, LIFETIME_S, OnionKeyRing


def build(hop_count: int = 4) -> tuple[ClientCircuit, list[HopCircuit]]:
    client = ClientCircuit()
    hops = []
    for _ in range(hop_count):
        onion_key, hop_id = X25519PrivateKey.generate(), os.urandom(32)
        pending = PendingHop.start(hop_id, raw_public(onion_key))
        keys, hop_public, auth = hop_answer_create(onion_key, hop_id, pending.ephemeral_public, pending.created_ms)
        client.add_hop(pending.finish(hop_public, auth))
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


def test_created_proof_binds_the_hop_key_and_identity() -> None:
    real, impostor, hop_id = X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32)
    pending = PendingHop.start(hop_id, raw_public(real))
    _, hop_public, forged = hop_answer_create(impostor, hop_id, pending.ephemeral_public, pending.created_ms)
    with pytest.raises(OnionError, match="proof"):
        pending.finish(hop_public, forged)
    # the right onion key under another identity (a record that copies someone's onion key) fails too
    _, hop_public, other_id = hop_answer_create(real, os.urandom(32), pending.ephemeral_public, pending.created_ms)
    with pytest.raises(OnionError, match="proof"):
        pending.finish(hop_public, other_id)
    # a CREATE replayed with a fresher timestamp derives other keys: its proof (and cells) fail
    _, hop_public, restamped = hop_answer_create(real, hop_id, pending.ephemeral_public, pending.created_ms + 1)
    with pytest.raises(OnionError, match="proof"):
        pending.finish(hop_public, restamped)
    # a relay that swaps in another Y (a man in the middle on the link) is caught by AUTH
    _, _, auth = hop_answer_create(real, hop_id, pending.ephemeral_public, pending.created_ms)
    with pytest.raises(OnionError, match="proof"):
        pending.finish(raw_public(X25519PrivateKey.generate()), auth)
    for bad in (b"\x00" * 32, b"short"):  # low-order point, wrong length: on either side
        with pytest.raises(OnionError):
            hop_answer_create(real, hop_id, bad, 0)
        with pytest.raises(OnionError):
            pending.finish(bad, auth)


def test_a_recorded_circuit_cannot_be_opened_with_the_hops_stolen_onion_key() -> None:
    """Forward secrecy: an eavesdropper records CREATE (X, B, ts), CREATED (Y, AUTH) and a cell, and
    later steals the hop's long-term onion private key b. Everything it can derive from b and the
    transcript fails to open the cell: the keys also need DH(x, Y), and x and y are gone."""
    onion_key, hop_id = X25519PrivateKey.generate(), os.urandom(32)
    pending = PendingHop.start(hop_id, raw_public(onion_key))
    keys, hop_public, auth = hop_answer_create(onion_key, hop_id, pending.ephemeral_public, pending.created_ms)
    client = ClientCircuit()
    client.add_hop(pending.finish(hop_public, auth))
    recorded_cell = client.wrap(DATA, b"SECRET clove bytes", os.urandom)
    assert unpack_payload(HopCircuit(keys).peel(recorded_cell)) == (DATA, b"SECRET clove bytes")  # the hop could

    asker_public, onion_public, ts = pending.ephemeral_public, raw_public(onion_key), pending.created_ms
    # 1) run the hop's side of the handshake again with the stolen key: a fresh Y, other keys
    replayed, _, _ = hop_answer_create(onion_key, hop_id, asker_public, ts)
    # 2) every Diffie-Hellman value b gives, in every slot of the derivation
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    dh_bx = onion_key.exchange(X25519PublicKey.from_public_bytes(asker_public))
    dh_by = onion_key.exchange(X25519PublicKey.from_public_bytes(hop_public))
    candidates = [replayed] + [
        ntor_keys(first, second, hop_id, onion_public, asker_public, hop_public, ts)[0]
        for first in (dh_bx, dh_by, bytes(32)) for second in (dh_bx, dh_by, bytes(32))
    ]
    for candidate in candidates:
        with pytest.raises(OnionError, match="authentication"):
            HopCircuit(candidate).peel(recorded_cell)
    # 3) the AUTH the eavesdropper recorded is not reproducible either, so nothing ties b to the keys
    assert all(ntor_keys(dh_bx, d, hop_id, onion_public, asker_public, hop_public, ts)[1] != auth for d in (dh_bx, dh_by))
    # with the ephemeral secret (which the hop drops) the keys do follow: the test derives correctly
    y = X25519PrivateKey.generate()
    kept, kept_public, _ = hop_answer_create(onion_key, hop_id, asker_public, ts, ephemeral=y)
    dh_xy = y.exchange(X25519PublicKey.from_public_bytes(asker_public))
    assert ntor_keys(dh_xy, dh_bx, hop_id, onion_public, asker_public, kept_public, ts)[0] == kept


def test_onion_key_ring_rotates_and_honours_the_old_key_for_the_grace_period() -> None:
    now = [1000.0]
    ring = OnionKeyRing(lambda: now[0], lifetime_s=3600, grace_s=180)
    first = ring.current_public
    assert ring.private_for(first) is not None and not ring.rotate_if_due()
    now[0] += 3599
    assert ring.current_public == first and ring.private_for(first) is not None
    now[0] += 1  # lifetime over: the next record announces a new key
    assert ring.rotate_if_due() and ring.rotations == 1
    second = ring.current_public
    assert second != first and ring.honoured() == [second, first]
    assert raw_public(ring.private_for(first)) == first  # type: ignore[arg-type]
    now[0] += 179  # still within the grace period: records cached before the rotation still work
    assert ring.private_for(first) is not None and ring.private_for(second) is not None
    now[0] += 1  # grace over: the old key is refused, and forgotten
    assert ring.private_for(first) is None and ring.honoured() == [second]
    assert ring.private_for(os.urandom(32)) is None  # a key it never had
    # a late check rotates once, from the time it runs: the new key gets a whole lifetime
    now[0] += 10 * 3600
    assert ring.rotate_if_due() and not ring.rotate_if_due()
    assert ring.private_for(second) is not None  # just retired: within its grace again


def test_grace_period_covers_cached_records() -> None:
    from gtorrent.relay import CLOCK_SKEW_S
    from gtorrent.relaynode import RECORD_TTL_S

    seed_ttl = 90.0  # gtorrent.seed.RECORD_TTL_S (not imported here: it pulls in the model runtime)
    assert GRACE_S >= max(RECORD_TTL_S, seed_ttl) + CLOCK_SKEW_S
    assert LIFETIME_S > 10 * GRACE_S  # at most one retired key is ever honoured besides the current one


def test_extend_and_extended_payloads_round_trip() -> None:
    extend = Extend(7, os.urandom(32), os.urandom(32), os.urandom(32), 1234, "tcp://127.0.0.1:5555")
    assert Extend.unpack(extend.pack()) == extend
    assert unpack_extended(pack_extended(b"Y" * 32, b"A" * 32)) == (b"Y" * 32, b"A" * 32)
    packed = extend.pack()
    for bad in (packed[:90], packed + b"x" * 300, packed[:-4] + b"\xff:55", Extend(0, *list(extend.__dict__.values())[1:]).pack()):
        with pytest.raises(OnionError):
            Extend.unpack(bad)
    with pytest.raises(OnionError):
        unpack_extended(b"Y" * 63)
    assert forward_capacity(4) > len(Extend(1, b"x" * 32, b"x" * 32, b"x" * 32, 1, "tcp://" + "h" * 240 + ":1").pack())


def test_hop_keys_are_four_distinct_keys() -> None:
    keys = HopKeys.derive(os.urandom(96))
    values = [keys.forward, keys.backward_stream, keys.backward_seal, keys.filler]
    assert len(set(values)) == 4 and all(len(v) == 32 for v in values)


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
    assert cache.check_and_add(b"d")  # full: the oldest bucket is evicted (see tests/test_abuse.py)
    assert not cache.check_and_add(b"d")
    now[0] = 30.0
    assert cache.check_and_add(b"d")  # the old entries expired
