"""Onion layers for circuits (pure; randomness and clocks injected).

Circuits are built by telescoping, as in Tor: the asker CREATEs a circuit with the first relay, then
sends EXTEND cells through the circuit so that its current last hop CREATEs the next one. Every cell on
every link has the same size, so nothing in the cells tells a hop its position; a hop learns its
predecessor, its successor and the circuit id of each of its two links, and the asker picks every
circuit id at random, so no identifier is the same on two links. A hop can still usually infer its
position from its neighbours: the first hop's predecessor is in no peer record (a throwaway link key
made for that one circuit, from an unlisted address), the last relay's successor is a listed seed, and
a middle relay's neighbours are both listed relays (THREAT_MODEL.md §3.1).

Handshake (ntor, after Tor's spec; protocol id `gtorrent/onion/v2/ntor`): the asker sends an ephemeral
X25519 key X and names the hop's onion key B it used (from the hop's signed record); the hop answers
with an ephemeral key Y of its own and AUTH. Both sides compute

    secret_input = DH(x, Y) || DH(x, B) || ID || B || X || Y || ts || PROTOID

where ID is the hop's Ed25519 identity key and ts the CREATE's timestamp (ms), then
    verify = HMAC(key=`.../verify`, secret_input)
    AUTH   = HMAC(key=`.../mac`, verify || ID || B || Y || X || ts || PROTOID || "server")
    keys   = HKDF-SHA256(salt=`.../key`, ikm=secret_input, info=`gtorrent/onion/v2/circuit`)
AUTH proves the hop holds b (only DH(x, B) = DH(b, X) ties the answer to B), and DH(x, Y) gives forward
secrecy: x and y are forgotten once the keys are derived, so a recording of the handshake and the cells
plus the hop's onion private key, stolen later, derives nothing. Onion keys also rotate (onionkeys.py).
Four 32-byte keys come out per hop: forward AEAD, backward stream, backward AEAD and forward filler.

Forward cells (asker -> terminal) carry one ChaCha20-Poly1305 layer per hop with a detached tag:
a cell is tag(16) || body(BODY_BYTES). A hop decrypts with its forward key and its own cell counter as
nonce (a replayed or reordered cell fails, a flipped bit fails), and forwards plaintext || filler, where
the 16 filler bytes come from a PRF the asker can compute: the asker precomputes, Sphinx-style, what
every downstream hop will see, so each hop can check its own tag and the cell size never changes.

Backward cells (a hop -> asker) are sealed once by their originator with its backward AEAD key, and
every hop on the way adds a length-preserving ChaCha20 layer (Tor's design): the asker peels the
layers in order and finds the originator by its tag. Replays and tampering on the way back are
detected by the asker.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PROTOCOL_ID = b"gtorrent/onion/v2/ntor"
KEY_LABEL = b"gtorrent/onion/v2/key"  # HKDF salt (ntor's t_key)
VERIFY_LABEL = b"gtorrent/onion/v2/verify"  # ntor's t_verify
MAC_LABEL = b"gtorrent/onion/v2/mac"  # ntor's t_mac
CIRCUIT_LABEL = b"gtorrent/onion/v2/circuit"  # HKDF info (ntor's m_expand)
FORWARD_AAD = b"gtorrent/onion/v2/forward"
BACKWARD_AAD = b"gtorrent/onion/v2/backward"
KEY_BYTES = 32
TAG_BYTES = 16
BODY_BYTES = 1008
CELL_BYTES = TAG_BYTES + BODY_BYTES  # 1 KiB on every link, in both directions
MAX_HOPS = 16
PAYLOAD_HEADER = struct.Struct(">BH")  # command, length

# cell commands, inside the innermost layer
EXTEND = 1  # asker -> last hop: connect to the next hop
EXTENDED = 2  # last hop -> asker: the next hop answered CREATED
DATA = 3  # asker <-> terminal: application bytes (a clove)
END = 4  # either end: close the circuit


class OnionError(ValueError):
    """A cell or handshake that must be dropped (tampered, replayed, out of order, malformed)."""


def _xor(a: bytes, b: bytes) -> bytes:
    # int arithmetic is ~50x faster than a per-byte loop for 1 KiB
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _nonce(direction: int, counter: int) -> bytes:
    return struct.pack(">B3xQ", direction, counter)


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class HopKeys:
    forward: bytes
    backward_stream: bytes
    backward_seal: bytes
    filler: bytes

    @classmethod
    def derive(cls, secret_input: bytes) -> HopKeys:
        material = HKDF(algorithm=hashes.SHA256(), length=4 * KEY_BYTES, salt=KEY_LABEL, info=CIRCUIT_LABEL).derive(secret_input)
        return cls(*(material[i : i + KEY_BYTES] for i in range(0, 4 * KEY_BYTES, KEY_BYTES)))

    def forward_keystream(self, counter: int) -> bytes:
        return ChaCha20Poly1305(self.forward).encrypt(_nonce(0, counter), bytes(BODY_BYTES), FORWARD_AAD)[:BODY_BYTES]

    def forward_filler(self, counter: int) -> bytes:
        return hashlib.blake2b(counter.to_bytes(8, "big"), key=self.filler, digest_size=TAG_BYTES).digest()

    def backward_stream_layer(self, counter: int, cell: bytes) -> bytes:
        nonce = b"\x00\x00\x00\x00" + _nonce(1, counter)  # 32-bit block counter || 96-bit nonce
        return Cipher(algorithms.ChaCha20(self.backward_stream, nonce), mode=None).encryptor().update(cell)


# ------------------------------------------------------------------------------------- handshakes


def _check_key(public: bytes, what: str) -> X25519PublicKey:
    if len(public) != KEY_BYTES:
        raise OnionError(f"bad {what}")
    return X25519PublicKey.from_public_bytes(public)


def _dh(private: X25519PrivateKey, public: bytes, what: str) -> bytes:
    try:
        return private.exchange(_check_key(public, what))
    except ValueError as exc:  # low-order point: an all-zero shared secret, refused by the library
        raise OnionError(f"bad {what}") from exc


def ntor_keys(
    dh_ephemeral: bytes, dh_static: bytes, hop_id: bytes, onion_public: bytes, asker_public: bytes, hop_public: bytes, created_ms: int
) -> tuple[HopKeys, bytes]:
    """The circuit keys and AUTH from both Diffie-Hellman results and the transcript (see the module
    docstring). The CREATE's timestamp is bound in: a replay with a fresher timestamp derives other keys."""
    stamp = created_ms.to_bytes(8, "big")
    transcript = hop_id + onion_public + asker_public + hop_public + stamp + PROTOCOL_ID
    secret_input = dh_ephemeral + dh_static + transcript
    verify = _hmac(VERIFY_LABEL, secret_input)
    auth = _hmac(MAC_LABEL, verify + hop_id + onion_public + hop_public + asker_public + stamp + PROTOCOL_ID + b"server")
    return HopKeys.derive(secret_input), auth


def hop_answer_create(
    onion_key: X25519PrivateKey,
    hop_id: bytes,
    asker_public: bytes,
    created_ms: int,
    ephemeral: X25519PrivateKey | None = None,
) -> tuple[HopKeys, bytes, bytes]:
    """Hop side of CREATE: (keys, Y, AUTH). `ephemeral` (y) is fresh unless a test injects one; it is
    dropped when this returns, which is what makes recorded circuits undecryptable later."""
    if len(hop_id) != KEY_BYTES or not 0 <= created_ms < 1 << 63:
        raise OnionError("bad identity or timestamp")
    y = ephemeral or X25519PrivateKey.generate()
    hop_public = raw_public(y)
    dh_ephemeral = _dh(y, asker_public, "ephemeral key")
    dh_static = _dh(onion_key, asker_public, "ephemeral key")
    keys, auth = ntor_keys(dh_ephemeral, dh_static, hop_id, raw_public(onion_key), asker_public, hop_public, created_ms)
    return keys, hop_public, auth


@dataclass
class PendingHop:
    """Asker side of one CREATE in flight."""

    ephemeral: X25519PrivateKey
    hop_id: bytes  # the hop's Ed25519 identity key, from its signed record
    onion_public: bytes  # B, from the same record; the CREATE names it
    created_ms: int  # the asker's clock, sent in CREATE; hops refuse stale ones

    @classmethod
    def start(cls, hop_id: bytes, onion_public: bytes, created_ms: int | None = None) -> PendingHop:
        stamp = int(time.time() * 1000) if created_ms is None else created_ms
        return cls(X25519PrivateKey.generate(), hop_id, onion_public, stamp)

    @property
    def ephemeral_public(self) -> bytes:
        return raw_public(self.ephemeral)

    def finish(self, hop_public: bytes, auth: bytes) -> HopKeys:
        """Check the hop's AUTH: only the holder of the onion private key b can produce it."""
        dh_ephemeral = _dh(self.ephemeral, hop_public, "hop ephemeral key")
        dh_static = _dh(self.ephemeral, self.onion_public, "onion key")
        keys, expected = ntor_keys(
            dh_ephemeral, dh_static, self.hop_id, self.onion_public, self.ephemeral_public, hop_public, self.created_ms
        )
        if not hmac.compare_digest(expected, auth):
            raise OnionError("CREATED proof does not match the hop's onion key")
        return keys


# ------------------------------------------------------------------------------------- payloads


def pack_payload(command: int, data: bytes, capacity: int, rng: Callable[[int], bytes]) -> bytes:
    if len(data) > capacity - PAYLOAD_HEADER.size:
        raise OnionError(f"payload of {len(data)} bytes does not fit a cell ({capacity - PAYLOAD_HEADER.size})")
    head = PAYLOAD_HEADER.pack(command, len(data)) + data
    return head + rng(capacity - len(head))


def unpack_payload(plain: bytes) -> tuple[int, bytes]:
    command, length = PAYLOAD_HEADER.unpack_from(plain)
    if command not in (EXTEND, EXTENDED, DATA, END) or length > len(plain) - PAYLOAD_HEADER.size:
        raise OnionError("malformed payload")
    return command, plain[PAYLOAD_HEADER.size : PAYLOAD_HEADER.size + length]


def forward_capacity(hops: int) -> int:
    """Payload bytes a forward cell can carry to the last of `hops` hops (the rest is filler)."""
    return BODY_BYTES - TAG_BYTES * (hops - 1) - PAYLOAD_HEADER.size


# ------------------------------------------------------------------------------------- hop side


@dataclass
class HopCircuit:
    """One hop's view of one circuit: its keys and its two cell counters."""

    keys: HopKeys
    forward_count: int = 0
    backward_count: int = 0

    def peel(self, cell: bytes) -> bytes:
        """Check and remove this hop's forward layer; return the plaintext body (BODY_BYTES)."""
        if len(cell) != CELL_BYTES:
            raise OnionError("cell of the wrong size")
        tag, body = cell[:TAG_BYTES], cell[TAG_BYTES:]
        try:
            plain = ChaCha20Poly1305(self.keys.forward).decrypt(
                _nonce(0, self.forward_count), body + tag, FORWARD_AAD
            )
        except InvalidTag as exc:
            raise OnionError("forward cell failed authentication (tampered, replayed or reordered)") from exc
        self.forward_count += 1
        return plain

    def next_cell(self, plain: bytes) -> bytes:
        """The cell to pass on after `peel`: the plaintext plus this hop's filler (counter just used)."""
        return plain + self.keys.forward_filler(self.forward_count - 1)

    def relay_backward(self, cell: bytes) -> bytes:
        if len(cell) != CELL_BYTES:
            raise OnionError("cell of the wrong size")
        layered = self.keys.backward_stream_layer(self.backward_count, cell)
        self.backward_count += 1
        return layered

    def seal_backward(self, command: int, data: bytes, rng: Callable[[int], bytes]) -> bytes:
        """Originate a backward cell (EXTENDED from a relay, DATA/END from the terminal)."""
        payload = pack_payload(command, data, BODY_BYTES, rng)
        sealed = ChaCha20Poly1305(self.keys.backward_seal).encrypt(_nonce(2, self.backward_count), payload, BACKWARD_AAD)
        self.backward_count += 1
        return sealed[BODY_BYTES:] + sealed[:BODY_BYTES]  # tag || body


# ------------------------------------------------------------------------------------- asker side


@dataclass
class ClientCircuit:
    """The asker's view of one circuit: every hop's keys and counters, mirrored."""

    hops: list[HopCircuit] = field(default_factory=list)

    def add_hop(self, keys: HopKeys) -> None:
        if len(self.hops) >= MAX_HOPS:
            raise OnionError("too many hops")
        self.hops.append(HopCircuit(keys))

    def wrap(self, command: int, data: bytes, rng: Callable[[int], bytes], upto: int | None = None) -> bytes:
        """A forward cell whose payload is for hop `upto` (default: the last hop)."""
        hops = self.hops[: upto if upto is not None else len(self.hops)]
        if not hops:
            raise OnionError("no hops")
        counters = [hop.forward_count for hop in hops]
        streams = [hop.keys.forward_keystream(c) for hop, c in zip(hops, counters, strict=True)]
        filler = b""
        for hop, counter, stream in zip(hops[:-1], counters[:-1], streams[:-1], strict=True):
            filler = _xor(filler, stream[BODY_BYTES - len(filler) :]) + hop.keys.forward_filler(counter)
        free = BODY_BYTES - len(filler)
        payload = pack_payload(command, data, free, rng)
        last_plain = payload + _xor(filler, streams[-1][free:])
        cell = self._seal(hops[-1], counters[-1], last_plain)
        for hop, counter in zip(reversed(hops[:-1]), reversed(counters[:-1]), strict=True):
            cell = self._seal(hop, counter, cell[:BODY_BYTES])
        for hop in hops:
            hop.forward_count += 1
        return cell

    @staticmethod
    def _seal(hop: HopCircuit, counter: int, plain: bytes) -> bytes:
        sealed = ChaCha20Poly1305(hop.keys.forward).encrypt(_nonce(0, counter), plain, FORWARD_AAD)
        return sealed[BODY_BYTES:] + sealed[:BODY_BYTES]

    def unwrap(self, cell: bytes) -> tuple[int, int, bytes]:
        """Peel a backward cell; return (originating hop index, command, data)."""
        if len(cell) != CELL_BYTES:
            raise OnionError("cell of the wrong size")
        # Fast path: answers come from the terminal, so peel every relay's stream layer and check the
        # last hop's seal once, instead of trying (and failing) a seal at every hop on the way.
        last = len(self.hops) - 1
        peeled = cell
        for hop in self.hops[:last]:
            peeled = hop.keys.backward_stream_layer(hop.backward_count, peeled)
        terminal = self.hops[last]
        try:
            payload = ChaCha20Poly1305(terminal.keys.backward_seal).decrypt(
                _nonce(2, terminal.backward_count), peeled[TAG_BYTES:] + peeled[:TAG_BYTES], BACKWARD_AAD
            )
        except InvalidTag:
            pass
        else:
            for hop in self.hops:
                hop.backward_count += 1
            command, data = unpack_payload(payload)
            return last, command, data
        current = cell
        for index, hop in enumerate(self.hops):
            tag, body = current[:TAG_BYTES], current[TAG_BYTES:]
            try:
                payload = ChaCha20Poly1305(hop.keys.backward_seal).decrypt(
                    _nonce(2, hop.backward_count), body + tag, BACKWARD_AAD
                )
            except InvalidTag:
                current = hop.keys.backward_stream_layer(hop.backward_count, current)
                continue
            for earlier in self.hops[: index + 1]:
                earlier.backward_count += 1
            command, data = unpack_payload(payload)
            return index, command, data
        raise OnionError("backward cell failed authentication at every hop (tampered or replayed)")


# ------------------------------------------------------------------------------------- replays


class ReplayCache:
    """Values seen recently (CREATE ephemeral keys, private-ask ids): at most `max_entries`, each kept
    `ttl_s` past its timestamp, so memory is bounded per time window whatever a flood sends.

    Entries are bucketed by a timestamp (`bucket_s` wide): the value's own when the caller passes one (a
    CREATE's stamp, which is bound into its keys, so a replay carries the same stamp), else the time it
    arrived. Expired buckets are dropped. When full, the oldest bucket is dropped to make room, and for
    stamped values a floor rises to the newest stamp dropped: a stamp at or below the floor is refused
    as possibly replayed, and so is one no newer than everything kept (admitting it would mean dropping
    a newer one). So a flood pushes the floor up through the flood's own stamps; an honest CREATE
    stamped after them is served. To keep honest CREATEs out, a flooder must keep the whole cache full
    of stamps newer than theirs: max_entries CREATEs within the clock skew a relay accepts, sustained.
    Without stamps there is no floor: the oldest are evicted, which is safe where late duplicates come
    seconds after the first (cloves of one ask), and new values are never refused."""

    def __init__(
        self,
        ttl_s: float = 600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.time,  # the timebase of the stamps passed in (unix seconds)
        bucket_s: float = 1.0,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self.bucket_s = bucket_s
        self.floor_s = float("-inf")  # stamps at or below this are refused (such entries were dropped)
        self.evicted = 0  # entries dropped early to make room (a sign of a flood)
        self._where: dict[bytes, int] = {}  # value -> its bucket
        self._buckets: dict[int, set[bytes]] = {}
        self._newest: dict[int, float] = {}  # bucket -> newest stamp in it
        self._order: list[int] = []  # heap of bucket numbers

    def __len__(self) -> int:
        return len(self._where)

    def check_and_add(self, value: bytes, stamp_s: float | None = None) -> bool:
        """True the first time `value` is seen (and remembered); False for a replay, or a stamped value
        that the floor (or a full cache of newer stamps) refuses."""
        now = self.clock()
        self._expire(now)
        if (stamp_s is not None and stamp_s <= self.floor_s) or value in self._where:
            return False
        while len(self._where) >= self.max_entries:
            if stamp_s is not None and stamp_s <= self._newest[self._order[0]]:
                return False  # no newer than the oldest kept: dropping those would raise the floor over it
            self._drop_oldest(raise_floor=True)
        stamp = now if stamp_s is None else stamp_s
        bucket = int(stamp // self.bucket_s)
        if bucket not in self._buckets:
            self._buckets[bucket] = set()
            self._newest[bucket] = stamp
            heapq.heappush(self._order, bucket)
        self._buckets[bucket].add(value)
        self._newest[bucket] = max(self._newest[bucket], stamp)
        self._where[value] = bucket
        return True

    def _expire(self, now: float) -> None:
        while self._order and (self._order[0] + 1) * self.bucket_s + self.ttl_s <= now:
            self._drop_oldest(raise_floor=False)

    def _drop_oldest(self, *, raise_floor: bool) -> None:
        bucket = heapq.heappop(self._order)
        gone = self._buckets.pop(bucket)
        newest = self._newest.pop(bucket)
        for value in gone:
            del self._where[value]
        if raise_floor:
            self.evicted += len(gone)
            self.floor_s = max(self.floor_s, newest)
