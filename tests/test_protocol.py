"""Wire messages and signed records: validation is strict, signatures are checked before use."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from gtorrent.identity import Identity, b64
from gtorrent.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ModelInfo,
    PeerRecord,
    ProtocolError,
    decode,
    encode,
)

ME = Identity.generate()


def record(**changes: object) -> PeerRecord:
    base = dict(
        endpoint="tcp://127.0.0.1:5000",
        roles=("seed",),
        models=(ModelInfo("ab" * 32, "demo", 512),),
        load={"queue": 1.0},
        seq=1,
        expires=time.time() + 60,
    )
    base.update(changes)
    return PeerRecord.sign(ME, **base)  # type: ignore[arg-type]


def test_roundtrip() -> None:
    frames = encode("query", {"model": "demo", "role": "seed"})
    message = decode(frames)
    assert message.kind == "query" and message["model"] == "demo"


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xff\xfe not utf8"],
        [b"not json"],
        [b"[1,2,3]"],
        [json.dumps({"t": "query"}).encode()],  # no version
        [json.dumps({"v": 99, "t": "query"}).encode()],
        [json.dumps({"v": PROTOCOL_VERSION, "t": "launch_missiles"}).encode()],
        [json.dumps({"v": PROTOCOL_VERSION, "t": "query", "extra": 1}).encode()],
        [json.dumps({"v": PROTOCOL_VERSION, "t": "query", "limit": "ten"}).encode()],
        [json.dumps({"v": PROTOCOL_VERSION, "t": "query", "limit": 10**9}).encode()],
        [json.dumps({"v": PROTOCOL_VERSION, "t": "query", "limit": True}).encode()],
        [b'{"v":%d,' % PROTOCOL_VERSION + b'"t":"token","id":"x","n":0,"text":NaN}'],
        [json.dumps({"v": PROTOCOL_VERSION, "t": "generate", "id": "x"}).encode()],  # missing fields
        [b"{" * 100_000],
        [b'{"v":%d,' % PROTOCOL_VERSION + b'"t":"query","model":"' + b"a" * MAX_MESSAGE_BYTES + b'"}'],
        [b"{}"] * 9,
        [b'{"v":true,"t":"ping"}'],
        [b'{"v":1.0,"t":"ping"}'],
        [b'{"v":%d,' % PROTOCOL_VERSION + b'"t":"query","model":"a","model":"b"}'],
    ],
)
def test_malformed_messages_are_rejected(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames)


def test_unexpected_type_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="unexpected"):
        decode(encode("ping"), frozenset({"query"}))


def test_record_verifies() -> None:
    signed = record()
    parsed = PeerRecord.from_wire(json.loads(json.dumps(signed.to_wire())))
    assert parsed == signed
    assert parsed.serves("demo") and parsed.serves("ab" * 32) and parsed.serves("abababab") and not parsed.serves("ab")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda doc: doc.update(endpoint="tcp://10.9.9.9:1"),
        lambda doc: doc.update(seq=doc["seq"] + 1),
        lambda doc: doc.update(expires=doc["expires"] + 1000),
        lambda doc: doc.update(roles=["seed", "relay"]),
        lambda doc: doc["models"][0].update(name="other"),
        lambda doc: doc.update(peer_id=Identity.generate().peer_id),
        lambda doc: doc.update(signing_key=b64(Identity.generate().signing_public)),
        lambda doc: doc.update(signature=b64(b"\x00" * 64)),
        lambda doc: doc.update(signature="%%%"),
        lambda doc: doc.pop("signature"),
        lambda doc: doc.update(roles=["overlord"]),
        lambda doc: doc.update(load={"queue": -1}),
        lambda doc: doc.update(endpoint="http://example.org/"),
    ],
)
def test_forged_or_altered_records_are_rejected(tamper) -> None:  # type: ignore[no-untyped-def]
    doc = record().to_wire()
    tamper(doc)
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(doc)


def test_record_signed_by_another_key_is_rejected() -> None:
    other = Identity.generate()
    doc = record().to_wire()
    forged = PeerRecord.sign(other, endpoint="tcp://127.0.0.1:1", roles=("seed",), seq=5, expires=time.time() + 60)
    doc["signature"] = forged.to_wire()["signature"]
    with pytest.raises(ProtocolError, match="signature"):
        PeerRecord.from_wire(doc)
    assert replace(record(), signature=b"").signature == b""


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=10))
def test_decode_only_ever_raises_protocol_error_on_bytes(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(__import__("gtorrent.protocol", fromlist=["SCHEMAS"]).SCHEMAS)), st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_decode_only_ever_raises_protocol_error_on_json(kind: str, body: dict[str, object]) -> None:
    frame = json.dumps({"v": PROTOCOL_VERSION, "t": kind, **body}).encode()
    try:
        decode([frame])
    except ProtocolError:
        pass


def test_huge_integer_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode([b'{"v":%d,' % PROTOCOL_VERSION + b'"t":"hello","x":' + b"1" * 5000 + b"}"])


def test_oversized_record_is_rejected() -> None:
    big = record(models=tuple(ModelInfo(f"{i:02d}" * 32, "m" * 120, 512) for i in range(8)), load={f"k{i}": 1.0 for i in range(16)})
    doc = big.to_wire()
    doc["endpoint"] = "tcp://" + "h" * 240 + ":1"
    with pytest.raises(ProtocolError):
        PeerRecord.from_wire(doc)


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:7700\n", "tcp://127.0.0.1:7700 ", "tcp://127.0.0.1:99999"])
def test_a_tracker_url_with_trailing_junk_is_a_usage_error(url: str) -> None:
    """`re.match` with `$` accepted a final newline (e.g. a URL pasted with one into GTORRENT_TRACKERS)."""
    from gtorrent.errors import UsageError
    from gtorrent.transport import check_endpoint

    with pytest.raises(UsageError, match="invalid tracker address"):
        check_endpoint(url, "tracker address")
    assert check_endpoint("tcp://[::1]:7700", "tracker address") == "tcp://[::1]:7700"


def test_a_query_by_endpoint_is_bounded_and_typed() -> None:
    """The new `endpoint` filter of `query`: a string of at most 256 characters, nothing else."""
    from gtorrent.protocol import ProtocolError, decode, encode

    assert decode(encode("query", {"role": "relay", "endpoint": "tcp://127.0.0.1:7000"}))["endpoint"]
    for bad in ("x" * 257, 7000, ["tcp://127.0.0.1:7000"], None):
        with pytest.raises(ProtocolError):
            decode(encode("query", {"endpoint": bad}))


@pytest.mark.parametrize("value", ["false", 0, 1, None, [False]])
def test_a_generate_whose_forward_field_is_not_a_boolean_is_refused(value: object) -> None:
    """`forward` (decline forwarding, asker.SignerRefused) is a boolean or absent; anything else is a
    malformed request, as a seed refuses it, never read as true or false."""
    body = {"id": "x", "model": "m", "prompt": "p", "max_tokens": 1, "temperature": 0, "top_k": 0, "top_p": 1}
    assert decode(encode("generate", {**body, "forward": False})).body["forward"] is False
    assert "forward" not in decode(encode("generate", body)).body
    valid = json.loads(encode("generate", body)[0])
    assert decode([json.dumps(valid).encode()]).kind == "generate"  # the frame as sent, re-encoded here
    with pytest.raises(ProtocolError):
        decode([json.dumps({**valid, "forward": value}).encode()])


GENERATE = {"id": "x", "model": "m", "prompt": "", "max_tokens": 1, "temperature": 0, "top_k": 0, "top_p": 1,
            "chat": True}


def test_a_generate_carries_a_conversation_as_messages() -> None:
    """`messages` (system, user and assistant turns) in place of the prompt: kept as sent, and a part
    of the canonical request bytes a seed signs (garlic.direct_request_bytes)."""
    from gtorrent.garlic import direct_request_bytes

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": ""}]
    message = decode(encode("generate", {**GENERATE, "messages": turns}))
    assert message.body["messages"] == turns
    assert direct_request_bytes(message.body) != direct_request_bytes({**message.body, "messages": turns[1:]})
    assert "messages" not in decode(encode("generate", {**GENERATE, "prompt": "p"})).body  # absent: as before


@pytest.mark.parametrize(
    "changes",
    [
        {"messages": []},
        {"messages": "Hi"},
        {"messages": [["user", "Hi"]]},
        {"messages": [{"role": "tool", "content": "Hi"}]},
        {"messages": [{"role": "developer", "content": "Hi"}]},  # the API maps it to system; the wire has none
        {"messages": [{"role": 1, "content": "Hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": "Hi", "name": "x"}]},
        {"messages": [{"role": "user", "content": "Hi"}] * 257},
        {"messages": [{"role": "user", "content": "x" * 40_000}, {"role": "user", "content": "x" * 30_000}]},
        {"messages": [{"role": "user", "content": "Hi"}], "prompt": "p"},  # one prompt or the other
        {"messages": [{"role": "user", "content": "Hi"}], "chat": False},
        {"messages": [{"role": "user", "content": "Hi"}], "chat": None},
    ],
)
def test_a_generate_with_malformed_messages_is_refused(changes: dict[str, object]) -> None:
    """As a seed decodes a direct request, and a private ask's combined request bytes
    (seed.parse_private_request): refused as malformed, before any rendering."""
    from gtorrent.seed import parse_private_request

    body = {**GENERATE, **changes}
    if body["chat"] is None:
        del body["chat"]
    with pytest.raises(ProtocolError):
        decode([json.dumps({"v": PROTOCOL_VERSION, "t": "generate", **body}).encode()])
    private = {k: v for k, v in body.items() if k != "id"}
    with pytest.raises(ProtocolError):
        parse_private_request(json.dumps({**private, "reply_key": b64(bytes(32))}).encode())
    good = {k: v for k, v in GENERATE.items() if k != "id"}
    assert parse_private_request(json.dumps({**good, "messages": [{"role": "user", "content": "Hi"}],
                                             "reply_key": b64(bytes(32))}).encode())[0]["messages"]
