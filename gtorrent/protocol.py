"""Wire records and messages: encoding, decoding, size limits and validation (pure, no sockets).

Every message is one ZeroMQ frame holding a UTF-8 JSON object with a protocol version `v` and a type
`t`, optionally followed by raw binary frames. A message is checked against the schema of its type
before any field is used; anything malformed, oversized, of an unknown version or type, is rejected
with `ProtocolError` (the transport counts and drops it; a node never stops on bad input).

A `PeerRecord` is what a peer announces to trackers. It is signed with the peer's Ed25519 key over a
canonical encoding (sorted keys, no whitespace) prefixed with a versioned label, and carries the public
key itself; the peer id is the fingerprint of that key. So a client can check every record it receives
without trusting the tracker that handed it over: a tracker can hide peers but never forge them. An
optional proof-of-work nonce (`pow`, pow.py) rides next to the signature, outside the signed bytes: it
proves work for the public key itself, which no signature would strengthen.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .identity import Identity, PeerId, b64, peer_id_for, unb64, verify_signature

# 2: ntor handshake with rotating onion keys (create/created/EXTEND changed)
# 3: signed answers: `token` carries the piece's token ids, `done` the seed's transcript v2 signature
# 4: verdicts v2 (integer millionths, the epoch's signed times, one per model) and equivocation proofs
PROTOCOL_VERSION = 4
MAX_MESSAGE_BYTES = 256 * 1024  # one JSON frame
MAX_FRAMES = 8
MAX_RECORD_TTL_S = 3600.0  # a record may not claim to stay valid longer than this
RECORD_LABEL = b"gtorrent/record/v1\n"
ROLES = frozenset({"seed", "relay", "verifier", "tracker"})
MAX_MODELS_PER_RECORD = 8
MAX_RECORD_BYTES = 4096  # canonical size of one signed record; keeps query answers bounded
MAX_PROMPT_CHARS = 64 * 1024
# a generate's `messages` (a conversation the seed renders with the model's chat template): at most this
# many turns, their contents MAX_PROMPT_CHARS in all, as a prompt's
MAX_CHAT_MESSAGES = 256
CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_TOKEN_IDS_PER_MESSAGE = 4096  # ids in one `token` message (~40 KiB of JSON at most)
MAX_ADMITTED_VERIFIERS = 64  # verifiers a tracker may name in its `hello_ok`
MAX_VERDICTS_PER_ANSWER = 256  # verdicts in one `peers` answer (each ~0.5 KiB; the tracker's budget is smaller)
MAX_EQUIVOCATIONS_PER_ANSWER = 16  # equivocation proofs in one `peers` answer (each ~1.1 KiB)


ENDPOINT_RE = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):\d{1,5}")  # a peer's endpoint; use fullmatch


class ProtocolError(ValueError):
    """A message or record that must be dropped; the text says why (for counters and logs)."""


# --------------------------------------------------------------------------- encoding


def canonical(value: Any) -> bytes:
    """The canonical JSON bytes of a value: the exact bytes that get signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def encode(kind: str, body: dict[str, Any] | None = None, *binary: bytes) -> list[bytes]:
    """Frames of a message of type `kind`."""
    header = {"v": PROTOCOL_VERSION, "t": kind, **(body or {})}
    data = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{kind} message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return [data, *binary]


@dataclass(frozen=True)
class Message:
    kind: str
    body: dict[str, Any]
    binary: tuple[bytes, ...] = ()

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)


def decode(frames: list[bytes], expected: frozenset[str] | None = None) -> Message:
    """Parse and validate a message; raise ProtocolError for anything not exactly right."""
    if not frames or len(frames) > MAX_FRAMES:
        raise ProtocolError(f"bad frame count {len(frames)}")
    head = frames[0]
    if len(head) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(head)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(head.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise ProtocolError(f"not a JSON message ({type(exc).__name__})") from exc
    if not isinstance(body, dict):
        raise ProtocolError("message is not a JSON object")
    version, kind = body.pop("v", None), body.pop("t", None)
    if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 in Python
        raise ProtocolError(f"unsupported protocol version {version!r}")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    if expected is not None and kind not in expected:
        raise ProtocolError(f"unexpected message type {kind!r}")
    _check_schema(kind, body)
    if kind == "generate" and "messages" in body:
        _check_messages(body)
    return Message(kind, body, tuple(frames[1:]))


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ProtocolError("duplicate key in a JSON object")
    return result


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"non-finite number {name}")


# --------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = True
    max_len: int | None = None  # for str, list and dict
    minimum: float | None = None
    maximum: float | None = None
    items: Field | None = None  # for lists: what every element must be


def _check_schema(kind: str, body: dict[str, Any]) -> None:
    schema = SCHEMAS[kind]
    for name in body:
        if name not in schema:
            raise ProtocolError(f"{kind}: unknown field {name!r}")
    for name, spec in schema.items():
        if name not in body:
            if spec.required:
                raise ProtocolError(f"{kind}: missing field {name!r}")
            continue
        _check_value(f"{kind}.{name}", body[name], spec)


def _check_value(where: str, value: Any, spec: Field) -> None:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(f"{where}: expected {kinds[0].__name__}, got bool")
    if not isinstance(value, kinds):
        raise ProtocolError(f"{where}: expected {' or '.join(k.__name__ for k in kinds)}")
    if spec.max_len is not None and isinstance(value, (str, list, dict)) and len(value) > spec.max_len:
        raise ProtocolError(f"{where}: longer than {spec.max_len}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(f"{where}: not finite")
        if spec.minimum is not None and value < spec.minimum:
            raise ProtocolError(f"{where}: below {spec.minimum}")
        if spec.maximum is not None and value > spec.maximum:
            raise ProtocolError(f"{where}: above {spec.maximum}")
    if spec.items is not None and isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(f"{where}[{index}]", item, spec.items)


def _check_messages(body: dict[str, Any]) -> None:
    """A generate's conversation: turns of exactly {role, content}, a known role, text content within
    MAX_PROMPT_CHARS in all; it replaces the prompt, so `prompt` is empty and `chat` true."""
    messages = body["messages"]
    if not messages:
        raise ProtocolError("generate.messages: empty")
    total = 0
    for index, message in enumerate(messages):
        where = f"generate.messages[{index}]"
        if set(message) != {"role", "content"}:
            raise ProtocolError(f"{where}: fields must be exactly role and content")
        if not isinstance(message["role"], str) or message["role"] not in CHAT_ROLES:
            raise ProtocolError(f"{where}.role: not one of {', '.join(sorted(CHAT_ROLES))}")
        if not isinstance(message["content"], str):
            raise ProtocolError(f"{where}.content: expected str")
        total += len(message["content"])
    if total > MAX_PROMPT_CHARS:
        raise ProtocolError(f"generate.messages: contents longer than {MAX_PROMPT_CHARS} in all")
    if body["prompt"] != "" or body.get("chat") is not True:
        raise ProtocolError("generate.messages: needs an empty prompt and chat true")


NUMBER = (int, float)
ID = Field(str, max_len=64)
MAX_GROUP_SUMMARY_CHARS = 44_000  # b64 of 2,062 16-byte digests (43,992): a group_state stays under 45 KiB
REQUEST_ID = Field(str, max_len=64)

SCHEMAS: dict[str, dict[str, Field]] = {
    # tracker
    "hello": {},
    "hello_ok": {
        "record": Field(dict, max_len=32),
        "pow_bits": Field(int, required=False, minimum=0, maximum=64),  # work asked of new identities (pow.py)
        # the verifiers (peer ids) whose verdicts it admits; absent: it admits any verifier
        "verifiers": Field(list, required=False, max_len=MAX_ADMITTED_VERIFIERS, items=Field(str, max_len=64)),
    },
    "announce": {"record": Field(dict, max_len=32)},
    # every number a tracker sends is bounded: a client must never meet one it cannot turn into a float
    "announce_ok": {"interval_s": Field(NUMBER, minimum=0, maximum=86_400), "peers": Field(int, minimum=0, maximum=1 << 32)},
    "query": {
        "model": Field(str, required=False, max_len=128),
        "role": Field(str, required=False, max_len=16),
        "endpoint": Field(str, required=False, max_len=256),  # exactly this endpoint (a relay checking an EXTEND)
        "limit": Field(int, required=False, minimum=1, maximum=1000),
        "peers": Field(list, required=False, max_len=16),  # only these peer ids (an asker refreshing its guards)
        "sample": Field(str, required=False, max_len=32),  # the listing's ordering key, 16 bytes as hex
        "offset": Field(int, required=False, minimum=0, maximum=1 << 20),  # where the page starts in the listing
        "verdicts": Field(bool, required=False),  # also send the verdicts held on the seeds of the page
    },
    "peers": {
        "records": Field(list, max_len=1000),
        # sent when the query carried `sample`:
        # per record: seconds continuously listed (at most ~317 years)
        "listed_s": Field(list, required=False, max_len=1000, items=Field(NUMBER, minimum=0, maximum=1e10)),
        "total": Field(int, required=False, minimum=0, maximum=1 << 32),  # records matching in all
        "next": Field(int, required=False, minimum=0, maximum=1 << 32),  # offset of the next page; absent: none left
        # sent when the query asked for them: Verdict wire objects on the page's peers (each checked by the client)
        "verdicts": Field(list, required=False, max_len=MAX_VERDICTS_PER_ANSWER, items=Field(dict, max_len=16)),
        # sent with `verdicts` when the tracker holds any: proofs that verifiers equivocated (Equivocation)
        "equivocations": Field(list, required=False, max_len=MAX_EQUIVOCATIONS_PER_ANSWER,
                               items=Field(list, max_len=2, items=Field(dict, max_len=16))),
    },
    # a verifier hands a tracker its signed verdict (docs/PROTOCOL.md §12)
    "verdict": {"verdict": Field(dict, max_len=16)},
    # False: the tracker held this verdict already. Refusals are `error` with code invalid, stale,
    # not_admitted, equivocated, rate, capacity or storage (docs/PROTOCOL.md §12.1)
    "verdict_ok": {"stored": Field(bool)},
    "error": {"code": Field(str, max_len=64), "message": Field(str, max_len=1024), "id": Field(str, required=False, max_len=64)},
    # seed
    "generate": {
        "id": REQUEST_ID,
        "model": Field(str, max_len=128),
        "prompt": Field(str, max_len=MAX_PROMPT_CHARS),
        "max_tokens": Field(int, minimum=1, maximum=1 << 16),
        "temperature": Field(NUMBER, minimum=0, maximum=100),
        "top_k": Field(int, minimum=0, maximum=1 << 20),
        "top_p": Field(NUMBER, minimum=0, maximum=1),
        "seed": Field(int, required=False, minimum=0, maximum=(1 << 63) - 1),
        "chat": Field(bool, required=False),
        # a conversation in place of the prompt ({role, content} turns, _check_messages), rendered by the
        # model's chat template; absent: `prompt`, as one user turn when `chat`
        "messages": Field(list, required=False, max_len=MAX_CHAT_MESSAGES, items=Field(dict, max_len=2)),
        # false: the seed serves the request itself, never passing it to its model group (an asker that
        # refused the signer of a forwarded answer asks the entry again so, asker.SignerRefused)
        "forward": Field(bool, required=False),
    },
    "accepted": {"id": REQUEST_ID, "queue": Field(int, minimum=0)},
    "token": {
        "id": REQUEST_ID,
        "n": Field(int, minimum=0),
        "text": Field(str, max_len=4096),
        # the token ids of this piece (u32); the seed splits a piece whose ids are more than this
        "ids": Field(list, max_len=MAX_TOKEN_IDS_PER_MESSAGE, items=Field(int, minimum=0, maximum=(1 << 32) - 1)),
    },
    "done": {
        "id": REQUEST_ID,
        "tokens": Field(int, minimum=0, maximum=1 << 16),  # at most max_tokens, itself at most 2**16
        "finish_reason": Field(str, max_len=16),
        "ttft_s": Field(NUMBER, minimum=0),
        "total_s": Field(NUMBER, minimum=0),
        "model_id": ID,
        "signature": Field(str, max_len=128),  # b64 Ed25519 signature over the transcript (garlic.transcript)
        # a forwarded answer: the peer id of the group member that generated and signed it (absent: the
        # seed answering); the asker accepts it only for a seed of its own listing (asker.check_answer)
        "signer": Field(str, required=False, max_len=64),
        "cached": Field(int, required=False, minimum=0, maximum=1 << 24),  # prompt tokens from the prefix cache
        "prompt_tokens": Field(int, required=False, minimum=0, maximum=1 << 24),
    },
    "ping": {},
    "pong": {},
    # model groups (group.py, docs/PROTOCOL.md "Model groups and forwarding"): only between seeds listed for
    # one model, over CurveZMQ, each signed by its sender (group.GROUP_LABEL + canonical body without `sig`)
    "group_state": {
        "from": ID,  # the sender's peer id (its record, listed for `model_id`, gives the signing key)
        "to": ID,  # the receiver's peer id: a state signed for one member is refused by the others
        "model_id": ID,
        "ts": Field(int, minimum=0, maximum=(1 << 63) - 1),  # sender's clock, ms; newer than its last
        "summary": Field(str, max_len=MAX_GROUP_SUMMARY_CHARS),  # b64 of PrefixSummary.to_bytes (bounded)
        "queue": Field(int, minimum=0, maximum=1 << 20),  # requests waiting
        "in_flight": Field(int, minimum=0, maximum=1 << 20),  # requests generating
        "lb": Field(NUMBER, minimum=0, maximum=1e6),  # LB factor, seconds (forwarding.LbFactor)
        "sig": Field(str, max_len=128),
    },
    # a member's load, pushed one way (no answer) to every live member whenever its queue changes, at most
    # every group.LOAD_PUSH_MIN_S: a group_state without the summary (the same signature and checks)
    "group_load": {
        "from": ID,
        "to": ID,
        "model_id": ID,
        "ts": Field(int, minimum=0, maximum=(1 << 63) - 1),  # the sender's group stamp (shared with states)
        "queue": Field(int, minimum=0, maximum=1 << 20),
        "in_flight": Field(int, minimum=0, maximum=1 << 20),
        "lb": Field(NUMBER, minimum=0, maximum=1e6),
        "sig": Field(str, max_len=128),
    },
    # an entry seed hands a request to a group member; + one binary frame: the ORIGINAL request bytes
    # (direct: canonical JSON of the generate body; private: the combined S-IDA request bytes)
    "forward": {
        "id": REQUEST_ID,  # the forward's own id (random); the target's accepted/token/done/error carry it
        "from": ID,
        "to": ID,
        "model_id": ID,
        "ts": Field(int, minimum=0, maximum=(1 << 63) - 1),  # sender's clock, ms
        "mode": Field(str, max_len=8),  # "direct" or "private": how to parse the request bytes
        "sig": Field(str, max_len=128),  # over group.GROUP_LABEL + canonical body without `sig` + sha256(request)
    },
    # circuits (onion.py): circuit ids are per link, 63-bit, chosen at random by the asker
    # v2: ntor handshake (onion.py, cells.py); keys are 32 bytes, base64url without padding
    "create": {
        "cid": Field(int, minimum=1, maximum=(1 << 63) - 1),
        "key": Field(str, max_len=64),  # X, the asker's ephemeral X25519 key
        "onion": Field(str, max_len=64),  # B, the hop's onion key named in the record the asker used
        "ts": Field(int, minimum=0, maximum=(1 << 63) - 1),  # asker's clock, ms; bound into the hop keys
    },
    "created": {
        "cid": Field(int, minimum=1, maximum=(1 << 63) - 1),
        "key": Field(str, max_len=64),  # Y, the hop's ephemeral X25519 key
        "auth": Field(str, max_len=64),  # AUTH: proves the hop holds B's private key
    },
    "cell": {"cid": Field(int, minimum=1, maximum=(1 << 63) - 1)},  # + one binary frame of CELL_BYTES
    "destroy": {"cid": Field(int, minimum=1, maximum=(1 << 63) - 1), "reason": Field(str, required=False, max_len=64)},
}


# --------------------------------------------------------------------------- peer records


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    name: str
    context_length: int

    def to_wire(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "name": self.name, "context_length": self.context_length}


@dataclass(frozen=True)
class PeerRecord:
    """A signed self-description of a peer. Build with `PeerRecord.sign`, parse with `from_wire`."""

    peer_id: PeerId
    signing_key: bytes
    onion_key: bytes
    curve_key: bytes
    endpoint: str
    roles: tuple[str, ...]
    models: tuple[ModelInfo, ...]
    load: dict[str, float]
    seq: int
    expires: float  # unix time
    stopped: bool = False
    signature: bytes = field(default=b"", repr=False)
    # proof of work for the signing key (pow.py): like the signature, outside the signed bytes, since it
    # proves something about the public key itself; empty: none, and left off the wire
    pow: bytes = field(default=b"", repr=False)

    def unsigned_wire(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "signing_key": b64(self.signing_key),
            "onion_key": b64(self.onion_key),
            "curve_key": b64(self.curve_key),
            "endpoint": self.endpoint,
            "roles": list(self.roles),
            "models": [m.to_wire() for m in self.models],
            "load": dict(self.load),
            "seq": self.seq,
            "expires": self.expires,
            "stopped": self.stopped,
        }

    def to_wire(self) -> dict[str, Any]:
        doc = {**self.unsigned_wire(), "signature": b64(self.signature)}
        if self.pow:  # omitted when empty, so peers that know no `pow` field still read the record
            doc["pow"] = b64(self.pow)
        return doc

    @classmethod
    def sign(
        cls,
        identity: Identity,
        *,
        endpoint: str,
        roles: tuple[str, ...],
        models: tuple[ModelInfo, ...] = (),
        load: dict[str, float] | None = None,
        seq: int,
        expires: float,
        stopped: bool = False,
        onion_key: bytes | None = None,
    ) -> PeerRecord:
        """`onion_key`: the relay's current rotating onion key (onionkeys.py); a peer that relays
        nothing (a tracker, a test record) may leave it out and announce the identity's static one."""
        record = cls(
            peer_id=identity.peer_id,
            signing_key=identity.signing_public,
            onion_key=identity.onion_public if onion_key is None else onion_key,
            curve_key=identity.curve_public,
            endpoint=endpoint,
            roles=tuple(sorted(set(roles))),
            models=models,
            load=dict(load or {}),
            seq=seq,
            expires=expires,
            stopped=stopped,
        )
        return replace(record, signature=identity.sign(RECORD_LABEL + canonical(record.unsigned_wire())))

    @classmethod
    def from_wire(cls, doc: Any) -> PeerRecord:
        """Parse and verify a record; raise ProtocolError unless it is well-formed and correctly signed."""
        if not isinstance(doc, dict):
            raise ProtocolError("record is not an object")
        _check_schema_record(doc)
        unsigned = {k: v for k, v in doc.items() if k not in _UNSIGNED_KEYS}
        signed_bytes = canonical(unsigned)  # encoded once: for the size limit and the signature
        if len(signed_bytes) > MAX_RECORD_BYTES:
            raise ProtocolError(f"record larger than {MAX_RECORD_BYTES} bytes")
        try:
            keys = {name: unb64(doc[name]) for name in ("signing_key", "onion_key", "curve_key", "signature")}
            nonce = unb64(doc["pow"]) if "pow" in doc else b""
        except (ValueError, TypeError) as exc:
            raise ProtocolError("record: bad base64") from exc
        if len(nonce) > MAX_POW_NONCE_BYTES:
            raise ProtocolError("record: pow nonce too long")
        if any(len(keys[name]) != 32 for name in ("signing_key", "onion_key", "curve_key")) or len(keys["signature"]) != 64:
            raise ProtocolError("record: bad key or signature length")
        if peer_id_for(keys["signing_key"]) != doc["peer_id"]:
            raise ProtocolError("record: peer id does not match its signing key")
        if not verify_signature(keys["signing_key"], keys["signature"], RECORD_LABEL + signed_bytes):
            raise ProtocolError("record: bad signature")
        if not ENDPOINT_RE.fullmatch(doc["endpoint"]):  # fullmatch: `$` would let a final newline by
            raise ProtocolError("record: endpoint is not tcp://HOST:PORT")
        roles = tuple(doc["roles"])
        if not set(roles) <= ROLES:
            raise ProtocolError("record: unknown role")
        models = tuple(ModelInfo(m["model_id"], m["name"], m["context_length"]) for m in doc["models"])
        return cls(
            peer_id=doc["peer_id"],
            signing_key=keys["signing_key"],
            onion_key=keys["onion_key"],
            curve_key=keys["curve_key"],
            endpoint=doc["endpoint"],
            roles=roles,
            models=models,
            load={k: float(v) for k, v in doc["load"].items()},
            seq=doc["seq"],
            expires=float(doc["expires"]),
            stopped=doc["stopped"],
            signature=keys["signature"],
            pow=nonce,
        )

    def serves(self, model: str) -> bool:
        """True when this record serves `model`, given as a model id, a unique id prefix, or a name."""
        return any(m.model_id == model or m.name == model or (len(model) >= 8 and m.model_id.startswith(model)) for m in self.models)


RECORD_SCHEMA: dict[str, Field] = {
    "peer_id": Field(str, max_len=64),
    "signing_key": Field(str, max_len=64),
    "onion_key": Field(str, max_len=64),
    "curve_key": Field(str, max_len=64),
    "endpoint": Field(str, max_len=256),
    "roles": Field(list, max_len=8),
    "models": Field(list, max_len=MAX_MODELS_PER_RECORD),
    "load": Field(dict, max_len=16),
    "seq": Field(int, minimum=0, maximum=(1 << 63) - 1),
    "expires": Field(NUMBER, minimum=0, maximum=1e11),
    "stopped": Field(bool),
    "signature": Field(str, max_len=128),
    "pow": Field(str, required=False, max_len=24),  # b64 of a proof-of-work nonce (pow.py), outside the signature
}
MAX_POW_NONCE_BYTES = 16
MODEL_SCHEMA: dict[str, Field] = {
    "model_id": Field(str, max_len=64),
    "name": Field(str, max_len=64),
    "context_length": Field(int, minimum=1, maximum=1 << 24),
}

# Model names are shown in terminals and matched by users, and come from anyone who announces: keep
# them to a small ASCII set that is neither markup (`[`), a control character (ESC, newline) nor
# whitespace, yet holds the usual forms (`gpt2-tiny`, `Qwen/Qwen2.5-0.5B`, `llama3:8b`, `model@v1+q4`).
MAX_MODEL_NAME_CHARS = 64
MODEL_NAME_CHARS = "letters, digits and . _ - : / @ +"
_MODEL_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:/@+-]{{0,{MAX_MODEL_NAME_CHARS - 1}}}")
_MODEL_ID_RE = re.compile(r"[0-9a-f]{64}")  # hex SHA-256, lower case


def model_name_problem(name: str) -> str | None:
    """Why `name` may not be announced as a model name, or None when it may."""
    if not 1 <= len(name) <= MAX_MODEL_NAME_CHARS:
        return f"a model name is 1 to {MAX_MODEL_NAME_CHARS} characters long"
    if not _MODEL_NAME_RE.fullmatch(name):
        return f"a model name holds only {MODEL_NAME_CHARS}, and starts with a letter or digit"
    return None


_RECORD_KEYS = frozenset(name for name, spec in RECORD_SCHEMA.items() if spec.required)
_OPTIONAL_RECORD_KEYS = frozenset(name for name, spec in RECORD_SCHEMA.items() if not spec.required)
_UNSIGNED_KEYS = frozenset({"signature", "pow"})
_POW_RE = re.compile(r"[A-Za-z0-9_-]{1,24}")  # b64url without padding (the decoder would skip other characters)
_MODEL_KEYS = frozenset(MODEL_SCHEMA)
_RECORD_STRINGS = ("peer_id", "signing_key", "onion_key", "curve_key", "signature", "endpoint")


def _check_schema_record(doc: dict[str, Any]) -> None:
    """RECORD_SCHEMA, checked field by field without the generic walker: trackers check every announce."""
    if doc.keys() != _RECORD_KEYS and not (_RECORD_KEYS <= doc.keys() <= _RECORD_KEYS | _OPTIONAL_RECORD_KEYS):
        unknown, missing = doc.keys() - _RECORD_KEYS - _OPTIONAL_RECORD_KEYS, _RECORD_KEYS - doc.keys()
        raise ProtocolError(f"record: unknown fields {sorted(unknown)}" if unknown else f"record: missing {sorted(missing)}")
    if "pow" in doc and (type(doc["pow"]) is not str or not _POW_RE.fullmatch(doc["pow"])):
        raise ProtocolError("record.pow: not 1 to 24 base64url characters")
    for name in _RECORD_STRINGS:
        value = doc[name]
        if type(value) is not str or len(value) > (RECORD_SCHEMA[name].max_len or 0):
            raise ProtocolError(f"record.{name}: not a string of at most {RECORD_SCHEMA[name].max_len}")
    seq, expires = doc["seq"], doc["expires"]
    if type(seq) is not int or not 0 <= seq < 1 << 63:
        raise ProtocolError("record.seq: out of range")
    if type(expires) not in (int, float) or not 0 <= expires <= 1e11:  # NaN fails the comparison
        raise ProtocolError("record.expires: out of range")
    if type(doc["stopped"]) is not bool:
        raise ProtocolError("record.stopped: not a bool")
    roles, models, load = doc["roles"], doc["models"], doc["load"]
    if type(roles) is not list or len(roles) > 8 or any(type(role) is not str for role in roles):
        raise ProtocolError("record.roles: bad list")
    if type(models) is not list or len(models) > MAX_MODELS_PER_RECORD:
        raise ProtocolError("record.models: bad list")
    for model in models:
        if type(model) is not dict or model.keys() != _MODEL_KEYS:
            raise ProtocolError("record.models: bad entry")
        for name, spec in MODEL_SCHEMA.items():
            _check_value(f"record.models.{name}", model[name], spec)
        if not _MODEL_ID_RE.fullmatch(model["model_id"]):
            raise ProtocolError("record.models.model_id: not 64 lower-case hex digits")
        if model_name_problem(model["name"]) is not None:
            raise ProtocolError(f"record.models.name: not 1 to {MAX_MODEL_NAME_CHARS} of {MODEL_NAME_CHARS}")
    if type(load) is not dict or len(load) > 16:
        raise ProtocolError("record.load: bad object")
    for key, value in load.items():
        if type(key) is not str or len(key) > 32:
            raise ProtocolError("record.load: bad key")
        if type(value) not in (int, float) or not 0 <= value <= 1e9:
            raise ProtocolError(f"record.load.{key}: out of range")


# --------------------------------------------------------------------------- verdicts

# v2: credibility in integer millionths (no floats in signed bytes: JSON writers differ on their spelling)
# and the epoch placed in time (epoch_start_ms, epoch_ms), so trackers and clients can refuse verdicts
# from the future or older than they keep
VERDICT_LABEL = b"gtorrent/verdict/v2\n"
MAX_VERDICT_EPOCH = (1 << 53) - 1  # an exact integer in every JSON reader
MAX_VERDICT_CHALLENGES = 1000
CREDIBILITY_SCALE = 1_000_000  # the wire carries C as an integer number of millionths
MAX_VERDICT_TIME_MS = (1 << 53) - 1  # unix milliseconds (~285,000 years)
MAX_VERDICT_EPOCH_MS = 7 * 86_400_000  # an epoch lasts at most a week
DEFAULT_VERDICT_EPOCH_MS = 60_000  # what Verdict.sign assumes when the caller names no epoch length
VERDICT_CLOCK_SKEW_S = 60.0  # an epoch may start this far in the receiver's future (clocks that run ahead)
# an epoch that ended longer ago than this is stale: trackers forget verdicts that old, so one served or
# submitted now is a replay, and clients ignore it too
VERDICT_MAX_AGE_S = 86_400.0
VERDICT_KEYS = frozenset(
    {"verifier", "verifier_key", "seed", "model_id", "epoch", "epoch_start_ms", "epoch_ms", "credibility",
     "challenges", "evidence", "signature"}
)
_PEER_ID_RE = re.compile(r"[a-z2-7]{26}")  # identity.peer_id_for: 26 lower-case base32 characters
PEER_ID_RE = _PEER_ID_RE  # use fullmatch
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_B64_KEY_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, base64url without padding
_B64_SIGNATURE_RE = re.compile(r"[A-Za-z0-9_-]{86}")  # 64 bytes

VerdictKey = tuple[str, str, str, int]  # (verifier, seed, model_id, epoch): one verdict each


def _int_in(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # type(): a bool is no integer here


@dataclass(frozen=True)
class Verdict:
    """A verifier's signed finding about one model of one seed for one epoch (issue 8; docs/PROTOCOL.md §12).

    Signed with the verifier's Ed25519 key over VERDICT_LABEL + the canonical JSON of every field but
    the signature; it carries the verifier's public key, and the verifier's peer id must be that key's
    fingerprint, so anyone can check a verdict without trusting whoever handed it over (a tracker, a
    store). Build with `Verdict.sign`; parse with `from_wire`, which verifies. `credibility` is a float
    here and an integer number of millionths on the wire and in the signed bytes (`millionths`): a float
    is spelled differently by different JSON writers, so it has no place in signed bytes. One verdict
    per `key` (verifier, seed, model id, epoch): two different ones are an equivocation."""

    verifier: PeerId
    verifier_key: bytes = field(repr=False)
    seed: PeerId
    model_id: str  # hex SHA-256 of the model, as seeds announce it
    epoch: int  # the verifier's epoch number; several verifiers' verdicts are combined per epoch
    credibility: float  # C(T) of the epoch, in [0, 1], a whole number of millionths
    challenges: int  # challenges scored for it
    evidence: str  # hex SHA-256 of the evidence kept (signed transcripts of low-scoring challenges)
    signature: bytes = field(default=b"", repr=False)
    epoch_start_ms: int = 0  # when the epoch began, unix milliseconds
    epoch_ms: int = DEFAULT_VERDICT_EPOCH_MS  # the epoch's length, milliseconds

    @property
    def millionths(self) -> int:
        return round(self.credibility * CREDIBILITY_SCALE)

    @property
    def key(self) -> VerdictKey:
        return (self.verifier, self.seed, self.model_id, self.epoch)

    @property
    def epoch_end_ms(self) -> int:
        return self.epoch_start_ms + self.epoch_ms

    def unsigned_wire(self) -> dict[str, Any]:
        return {
            "verifier": self.verifier,
            "verifier_key": b64(self.verifier_key),
            "seed": self.seed,
            "model_id": self.model_id,
            "epoch": self.epoch,
            "epoch_start_ms": self.epoch_start_ms,
            "epoch_ms": self.epoch_ms,
            "credibility": self.millionths,
            "challenges": self.challenges,
            "evidence": self.evidence,
        }

    def signed_bytes(self) -> bytes:
        return VERDICT_LABEL + canonical(self.unsigned_wire())

    def to_wire(self) -> dict[str, Any]:
        return {**self.unsigned_wire(), "signature": b64(self.signature)}

    def time_problem(
        self, now: float, max_age_s: float = VERDICT_MAX_AGE_S, skew_s: float = VERDICT_CLOCK_SKEW_S,
    ) -> tuple[str, str] | None:
        """(code, why) when this verdict's epoch cannot be taken at unix time `now`: it starts more than
        `skew_s` ahead ("invalid") or ended more than `max_age_s` ago ("stale"); None when it can."""
        now_ms = now * 1000.0
        if self.epoch_start_ms > now_ms + skew_s * 1000.0:
            return "invalid", (f"verdict: epoch {self.epoch} starts {(self.epoch_start_ms - now_ms) / 1000:.0f} s in "
                               "the future (check the verifier's clock)")
        if self.epoch_end_ms < now_ms - max_age_s * 1000.0:
            return "stale", f"verdict: epoch {self.epoch} ended more than {max_age_s:g} s ago"
        return None

    @classmethod
    def sign(
        cls, identity: Identity, *, seed: PeerId, model_id: str, epoch: int, credibility: float, challenges: int,
        evidence: str, epoch_ms: int = DEFAULT_VERDICT_EPOCH_MS, epoch_start_ms: int | None = None,
        now: float | None = None,
    ) -> Verdict:
        """A verdict signed by `identity`; the same checks as `from_wire` apply (a verifier never signs
        what clients would refuse). `credibility` is rounded to millionths. `epoch_start_ms` None: the
        start of the `epoch_ms`-long epoch under way at `now` (default: the current time), so callers that
        name no time sign a verdict of the present."""
        if not (type(credibility) in (int, float) and 0.0 <= credibility <= 1.0):  # NaN fails the comparison
            raise ProtocolError("verdict.credibility: not in [0, 1]")
        if epoch_start_ms is None:
            now_ms = int((time.time() if now is None else now) * 1000)
            epoch_start_ms = now_ms - now_ms % epoch_ms if type(epoch_ms) is int and epoch_ms > 0 else now_ms
        verdict = cls(identity.peer_id, identity.signing_public, seed, model_id, epoch,
                      round(credibility * CREDIBILITY_SCALE) / CREDIBILITY_SCALE, challenges, evidence,
                      epoch_start_ms=epoch_start_ms, epoch_ms=epoch_ms)
        signed = replace(verdict, signature=identity.sign(verdict.signed_bytes()))
        return cls.from_wire(signed.to_wire())

    @classmethod
    def from_wire(cls, doc: Any) -> Verdict:
        """Parse and verify a verdict; raise ProtocolError unless it is well-formed, in bounds and signed
        by the key it carries, whose fingerprint is the verifier's peer id."""
        if type(doc) is not dict:
            raise ProtocolError("verdict is not an object")
        if doc.keys() != VERDICT_KEYS:
            unknown, missing = doc.keys() - VERDICT_KEYS, VERDICT_KEYS - doc.keys()
            raise ProtocolError(f"verdict: unknown fields {sorted(unknown)}" if unknown else f"verdict: missing {sorted(missing)}")
        for name in ("verifier", "seed"):
            if type(doc[name]) is not str or not _PEER_ID_RE.fullmatch(doc[name]):
                raise ProtocolError(f"verdict.{name}: not a peer id")
        for name in ("model_id", "evidence"):
            if type(doc[name]) is not str or not _HEX64_RE.fullmatch(doc[name]):
                raise ProtocolError(f"verdict.{name}: not 64 lower-case hex digits")
        if not _int_in(doc["epoch"], 0, MAX_VERDICT_EPOCH):
            raise ProtocolError("verdict.epoch: out of range")
        if not _int_in(doc["epoch_start_ms"], 0, MAX_VERDICT_TIME_MS):
            raise ProtocolError("verdict.epoch_start_ms: out of range")
        if not _int_in(doc["epoch_ms"], 1, MAX_VERDICT_EPOCH_MS):
            raise ProtocolError(f"verdict.epoch_ms: not 1 to {MAX_VERDICT_EPOCH_MS}")
        if not _int_in(doc["challenges"], 1, MAX_VERDICT_CHALLENGES):
            raise ProtocolError(f"verdict.challenges: not 1 to {MAX_VERDICT_CHALLENGES}")
        if not _int_in(doc["credibility"], 0, CREDIBILITY_SCALE):  # a float (even 1.0) is refused
            raise ProtocolError(f"verdict.credibility: not an integer 0 to {CREDIBILITY_SCALE} (millionths)")
        key_text, signature_text = doc["verifier_key"], doc["signature"]
        if type(key_text) is not str or not _B64_KEY_RE.fullmatch(key_text):
            raise ProtocolError("verdict.verifier_key: not a base64url Ed25519 key")
        if type(signature_text) is not str or not _B64_SIGNATURE_RE.fullmatch(signature_text):
            raise ProtocolError("verdict.signature: not a base64url Ed25519 signature")
        key, signature = unb64(key_text), unb64(signature_text)
        if b64(key) != key_text or b64(signature) != signature_text:  # one encoding per value (spare bits zero)
            raise ProtocolError("verdict: non-canonical base64")
        if peer_id_for(key) != doc["verifier"]:
            raise ProtocolError("verdict: verifier id does not match its signing key")
        verdict = cls(doc["verifier"], key, doc["seed"], doc["model_id"], doc["epoch"],
                      doc["credibility"] / CREDIBILITY_SCALE, doc["challenges"], doc["evidence"], signature,
                      epoch_start_ms=doc["epoch_start_ms"], epoch_ms=doc["epoch_ms"])
        if not verify_signature(key, signature, verdict.signed_bytes()):
            raise ProtocolError("verdict: bad signature")
        return verdict


@dataclass(frozen=True)
class Equivocation:
    """Proof that a verifier lies: two different verdicts it signed for one (verifier, seed, model, epoch).

    Only the verifier's key can make one (each verdict verifies on its own signature), so anyone who
    holds one may drop every verdict of that verifier. `first` is the one the finder held first. Wire
    form: a list of the two verdicts' wire objects. Build with `of` or `from_wire`, which check it."""

    first: Verdict
    second: Verdict

    @property
    def verifier(self) -> PeerId:
        return self.first.verifier

    @classmethod
    def of(cls, first: Verdict, second: Verdict) -> Equivocation | None:
        """The proof these two verified verdicts make, or None (another key, or the same signed claim:
        a copy, or the same bytes signed again, is no lie)."""
        if first.key != second.key or first.signed_bytes() == second.signed_bytes():
            return None
        return cls(first, second)

    def to_wire(self) -> list[dict[str, Any]]:
        return [self.first.to_wire(), self.second.to_wire()]

    @classmethod
    def from_wire(cls, doc: Any) -> Equivocation:
        """Parse and check a proof: two verdicts that verify, with one key and different signed bytes."""
        if type(doc) is not list or len(doc) != 2:
            raise ProtocolError("equivocation: not a list of two verdicts")
        proof = cls.of(Verdict.from_wire(doc[0]), Verdict.from_wire(doc[1]))
        if proof is None:
            raise ProtocolError("equivocation: the two verdicts are not two claims on one (verifier, seed, model, epoch)")
        return proof
