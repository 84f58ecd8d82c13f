"""Wire forms of circuit messages, shared by the asker (circuit.py) and relays (relay.py) (pure).

CREATE and CREATED travel as message fields (protocol.SCHEMAS); EXTEND and EXTENDED travel inside
cells, so they are packed into fixed binary layouts here:

    EXTEND   = next circuit id (8) || X (32) || B (32) || next hop's CurveZMQ key (32) || ts ms (8)
               || endpoint (ASCII, `tcp://HOST:PORT`, at most 256 bytes)
    EXTENDED = Y (32) || AUTH (32)

B is the onion key the asker took from the next hop's record (it may be the hop's previous, still
honoured key); the next hop picks its private key by it. Parsing never trusts a length or a value it
did not check; a malformed payload raises OnionError and the circuit is destroyed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .identity import b64, unb64
from .onion import CELL_BYTES, KEY_BYTES, OnionError
from .protocol import ENDPOINT_RE, Message, ProtocolError

MAX_ENDPOINT_BYTES = 256
MAX_CID = (1 << 63) - 1
CIRCUIT_KINDS = frozenset({"create", "cell", "destroy"})  # what a relay serves
CIRCUIT_REPLIES = frozenset({"created", "cell", "destroy", "error"})  # what comes back on a link
_EXTEND_HEAD = struct.Struct(">Q32s32s32sQ")
_EXTENDED = struct.Struct(">32s32s")


@dataclass(frozen=True)
class Extend:
    next_cid: int
    asker_public: bytes  # X
    onion_public: bytes  # B
    curve_key: bytes
    created_ms: int
    endpoint: str

    def pack(self) -> bytes:
        head = _EXTEND_HEAD.pack(self.next_cid, self.asker_public, self.onion_public, self.curve_key, self.created_ms)
        return head + self.endpoint.encode("ascii")

    @classmethod
    def unpack(cls, data: bytes) -> Extend:
        if len(data) <= _EXTEND_HEAD.size or len(data) > _EXTEND_HEAD.size + MAX_ENDPOINT_BYTES:
            raise OnionError("malformed EXTEND")
        next_cid, asker_public, onion_public, curve_key, created_ms = _EXTEND_HEAD.unpack_from(data)
        try:
            endpoint = data[_EXTEND_HEAD.size :].decode("ascii")
        except UnicodeDecodeError as exc:
            raise OnionError("malformed EXTEND endpoint") from exc
        if not 0 < next_cid <= MAX_CID or created_ms > MAX_CID:
            raise OnionError("bad circuit id or timestamp")
        if not ENDPOINT_RE.fullmatch(endpoint):
            raise OnionError("EXTEND to something that is not tcp://HOST:PORT")
        return cls(next_cid, asker_public, onion_public, curve_key, created_ms, endpoint)

    def create_body(self) -> dict[str, object]:
        """The CREATE this EXTEND asks the relay to send to the next hop."""
        return create_body(self.next_cid, self.asker_public, self.onion_public, self.created_ms)


def pack_extended(hop_public: bytes, auth: bytes) -> bytes:
    return _EXTENDED.pack(hop_public, auth)


def unpack_extended(data: bytes) -> tuple[bytes, bytes]:
    """(Y, AUTH) of an EXTENDED payload."""
    if len(data) != _EXTENDED.size:
        raise OnionError("malformed EXTENDED")
    hop_public, auth = _EXTENDED.unpack(data)
    return hop_public, auth


def create_body(cid: int, asker_public: bytes, onion_public: bytes, created_ms: int) -> dict[str, object]:
    return {"cid": cid, "key": b64(asker_public), "onion": b64(onion_public), "ts": created_ms}


def parse_create(message: Message) -> tuple[bytes, bytes, int]:
    """(X, B, ts) of a CREATE; ProtocolError when a key is not 32 bytes of base64."""
    try:
        asker_public, onion_public = unb64(message["key"]), unb64(message["onion"])
    except (ValueError, TypeError):
        raise ProtocolError("create: bad key") from None
    if len(asker_public) != KEY_BYTES or len(onion_public) != KEY_BYTES:
        raise ProtocolError("create: bad key length")
    return asker_public, onion_public, message["ts"]


def created_body(cid: int, hop_public: bytes, auth: bytes) -> dict[str, object]:
    return {"cid": cid, "key": b64(hop_public), "auth": b64(auth)}


def parse_created(message: Message) -> tuple[bytes, bytes]:
    """(Y, AUTH) of a CREATED; OnionError when malformed (the asker then blames that hop)."""
    try:
        hop_public, auth = unb64(message["key"]), unb64(message["auth"])
    except (ValueError, TypeError, KeyError):
        raise OnionError("created: bad key or proof") from None
    if len(hop_public) != KEY_BYTES or len(auth) != KEY_BYTES:
        raise OnionError("created: bad key or proof length")
    return hop_public, auth


def cell_frame(message: Message) -> bytes:
    if len(message.binary) != 1 or len(message.binary[0]) != CELL_BYTES:
        raise ProtocolError("a cell carries exactly one frame of CELL_BYTES")
    return message.binary[0]
