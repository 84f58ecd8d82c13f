"""Signed answers everywhere (issue 8 item 5): the transcript v2 a seed signs for every answer, direct
and private, and the asker's checks of it.

The encoding is checked table-driven (a parser recovers every field, so it is injective; crafted
field-boundary cases stay distinct; v1 bytes never pass as v2). The asker's checks run against real
seeds on loopback (in-process SeedService, real sockets, real relays for private asks) whose responders
are patched to deliver something other than what they sign: each lie is a SeedFailed."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gtorrent.asker import AskEvents, AskRequest, AskResult, AskTimeouts, ask_direct
from gtorrent.errors import GtorrentError
from gtorrent.garlic import TRANSCRIPT_LABEL, direct_request_bytes, token_ids_digest, transcript
from gtorrent.identity import Identity, b64, verify_signature
from gtorrent.private import ask_private
from gtorrent.protocol import PROTOCOL_VERSION, PeerRecord, ProtocolError, decode, encode
from gtorrent.runtime import GenerationParams
from gtorrent.seed import DirectResponder, PrivateResponder, Responder
from gtorrent.store import Store

from .test_private import PROMPT, Swarm

pytestmark = pytest.mark.timeout(120)

MODES = ["direct", "private"]
V1_LABEL = b"gtorrent/transcript/v1\n"


# ---------------------------------------------------------------------- the encoding (pure)


def parse(signed: bytes) -> tuple[bytes, str, bytes, bytes, int, str]:
    """The inverse of `transcript` on its image: (request digest, model id, text digest, ids digest,
    count, finish reason). Its existence is the proof that the encoding is injective."""
    assert signed.startswith(TRANSCRIPT_LABEL)
    at = len(TRANSCRIPT_LABEL)
    request = signed[at : at + 32]
    (model_len,) = struct.unpack_from(">H", signed, at + 32)
    at += 34
    model = signed[at : at + model_len].decode("utf-8", "surrogatepass")
    at += model_len
    text, ids = signed[at : at + 32], signed[at + 32 : at + 64]
    count, reason_len = struct.unpack_from(">IB", signed, at + 64)
    at += 69
    reason = signed[at:].decode("utf-8", "surrogatepass")
    assert len(signed[at:]) == reason_len  # nothing left over: the last field ends where the bytes end
    return request, model, text, ids, count, reason


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


FIELDS: list[tuple[bytes, str, str, list[int], str]] = [
    (b"", "", "", [], ""),
    (b"{}", "a" * 64, "hello", [1, 2, 3], "length"),
    # a model id that ends in what looks like a length prefix and a digest of the next field
    (b"{}", "ab\x00\x05", "", [], "eos"),
    (b"{}", "ab", "\x00\x05", [], "eos"),
    # the finish reason absorbing or giving up characters of the count or of the model id
    (b"{}", "m", "x", [0], "leng"),
    (b"{}", "m", "x", [0], "length"),
    (b"{}", "me", "x", [0], ""),
    # ids: [] vs [0], [1, 2] vs one id whose bytes are their concatenation's prefix, the u32 edge
    (b"{}", "m", "x", [], "eos"),
    (b"{}", "m", "x", [0], "eos"),
    (b"{}", "m", "x", [1, 2], "eos"),
    (b"{}", "m", "x", [1], "eos"),
    (b"{}", "m", "x", [(1 << 32) - 1], "eos"),
    # text: a lone surrogate (as a lying seed may send in JSON) hashes, and differs from the pair's character
    (b"{}", "m", "\ud83d\ude00", [], "eos"),
    (b"{}", "m", "\U0001f600", [], "eos"),
    (b"{}", "é" * 16, "日本語", [5], "é" * 16),
]


@pytest.mark.parametrize("fields", FIELDS)
def test_the_transcript_parses_back_to_its_fields(fields: tuple[bytes, str, str, list[int], str]) -> None:
    request, model_id, text, ids, reason = fields
    signed = transcript(request, model_id, text, ids, reason)
    assert parse(signed) == (
        digest(request),
        model_id,
        digest(text.encode("utf-8", "surrogatepass")),
        digest(b"".join(struct.pack("<I", token) for token in ids)),
        len(ids),
        reason,
    )


def test_crafted_field_boundaries_give_distinct_transcripts() -> None:
    encoded = [transcript(*fields) for fields in FIELDS]
    assert len(set(encoded)) == len(FIELDS)
    # the cases a plain concatenation would confuse
    naive = [m + t + r for _, m, t, _, r in FIELDS]
    assert len(set(naive)) < len(FIELDS)


def test_every_field_is_covered() -> None:
    base = (b'{"prompt":"x"}', "m" * 64, "an answer", [10, 20, 30], "length")
    signed = transcript(*base)
    changes: list[tuple[bytes, str, str, list[int], str]] = [
        (b'{"prompt":"y"}', *base[1:]),  # type: ignore[list-item]
        (base[0], "n" * 64, *base[2:]),  # type: ignore[list-item]
        (base[0], base[1], "an answer!", base[3], base[4]),
        (base[0], base[1], base[2], [10, 20, 31], base[4]),
        (base[0], base[1], base[2], [10, 20], base[4]),  # the count
        (base[0], base[1], base[2], base[3], "eos"),
    ]
    assert all(transcript(*change) != signed for change in changes)


def test_ids_are_little_endian_u32_and_bounded() -> None:
    assert token_ids_digest([1, 0x01020304]) == digest(b"\x01\x00\x00\x00\x04\x03\x02\x01")
    for bad in ([-1], [1 << 32]):
        with pytest.raises(ValueError):
            transcript(b"", "m", "", bad, "eos")
    with pytest.raises(ValueError):
        transcript(b"", "m", "", [], "x" * 256)  # a finish reason longer than its u8 length


def v1_transcript(request: bytes, model_id: str, text: str) -> bytes:
    """What HEAD signed: label v1, request digest, bare model id, text digest (no ids, count, reason)."""
    return V1_LABEL + digest(request) + model_id.encode("ascii") + digest(text.encode("utf-8"))


def test_a_v1_signature_never_verifies_as_v2() -> None:
    identity = Identity.generate()
    request, model_id, text = b"{}", "a" * 64, "hello"
    old = identity.sign(v1_transcript(request, model_id, text))
    for ids, reason in (([], ""), ([1], "eos"), ([1, 2, 3], "length")):
        assert not verify_signature(
            identity.signing_public, old, transcript(request, model_id, text, ids, reason)
        )
    assert not transcript(request, model_id, text, [], "").startswith(V1_LABEL)


def test_the_wire_schemas_bound_ids_and_require_a_signature() -> None:
    token = {"id": "r", "n": 0, "text": "hi", "ids": [1, 2]}
    assert decode(encode("token", token)).body == token
    done = {
        "id": "r",
        "tokens": 2,
        "finish_reason": "eos",
        "ttft_s": 0.1,
        "total_s": 0.2,
        "model_id": "m",
        "signature": b64(b"\x00" * 64),
    }
    assert decode(encode("done", done)).body == done
    bad = [
        ("token", {**token, "ids": [1 << 32]}),
        ("token", {**token, "ids": [-1]}),
        ("token", {**token, "ids": [True]}),
        ("token", {**token, "ids": [0] * 4097}),
        ("token", {k: v for k, v in token.items() if k != "ids"}),
        ("done", {k: v for k, v in done.items() if k != "signature"}),
    ]
    for kind, body in bad:
        with pytest.raises(ProtocolError):
            decode(encode(kind, body))
    assert PROTOCOL_VERSION >= 3  # v2 peers refuse these shapes; the version says so (4: verdicts v2)


# ---------------------------------------------------------------------- asks against real seeds


async def ask(
    swarm: Swarm, tmp_path: Path, mode: str, events: AskEvents | None = None, max_tokens: int = 24
) -> AskResult:
    store = Store.open(tmp_path / "store")
    try:
        request = AskRequest(PROMPT, max_tokens=max_tokens)
        if mode == "direct":
            return await ask_direct(swarm.ctx, [swarm.url], request, store, events)
        return await ask_private(swarm.ctx, [swarm.url], request, store, events)
    finally:
        store.close()


async def start(swarm: Swarm, mode: str, seeds: int = 1) -> None:
    await swarm.start(relays=12 if mode == "private" else 0, seeds=seeds)


@pytest.mark.parametrize("mode", MODES)
async def test_answers_are_signed_and_carry_what_a_verifier_needs(
    swarm: Swarm, tmp_path: Path, mode: str
) -> None:
    await start(swarm, mode)
    result = await ask(swarm, tmp_path, mode, max_tokens=48)
    local = swarm.model.generate(PROMPT, GenerationParams(max_tokens=48))
    assert result.text == local.text and result.token_ids == local.token_ids
    assert result.tokens == len(local.token_ids) and result.finish_reason == local.finish_reason
    seed = swarm.seeds[0].identity
    assert result.signing_key == seed.signing_public
    # anyone holding the result re-checks it with nothing but the seed's key
    signed = transcript(
        result.request_bytes, result.model_id, result.text, result.token_ids, result.finish_reason
    )
    assert verify_signature(result.signing_key, result.signature, signed)
    sent = json.loads(result.request_bytes)
    assert sent["prompt"] == PROMPT and sent["max_tokens"] == 48 and sent["model"] == result.model_id
    if mode == "direct":  # the canonical JSON of the generate request as the seed decoded it, id included
        assert direct_request_bytes(sent) == result.request_bytes and len(sent["id"]) == 16
    else:  # the exact bytes S-IDA carried, reply key included
        assert "reply_key" in sent and "id" not in sent


def deliver_other(
    monkeypatch: pytest.MonkeyPatch, alter: Callable[[str, list[int]], tuple[str, list[int]]]
) -> None:
    """Seeds deliver `alter(piece, ids)` for the first piece of an answer but record, and so sign, the
    honest piece: the asker receives something other than the transcript covers."""
    for cls in (DirectResponder, PrivateResponder):
        original = cls.text

        async def text(self: Responder, piece: str, ids: list[int], original: Any = original) -> None:
            first = not self.sent_text
            kept_text, kept_ids = len(self.sent_text), len(self.sent_ids)
            await original(self, *(alter(piece, ids) if first else (piece, ids)))
            del self.sent_text[kept_text:], self.sent_ids[kept_ids:]
            self.sent_text.append(piece)
            self.sent_ids.extend(ids)

        monkeypatch.setattr(cls, "text", text)


def claim_other(monkeypatch: pytest.MonkeyPatch, change: Callable[[dict[str, Any]], None]) -> None:
    """Seeds sign the honest transcript, then change the statistics of their `done`."""
    for cls in (DirectResponder, PrivateResponder):
        original = cls.done

        async def done(self: Responder, info: dict[str, Any], original: Any = original) -> None:
            change(info)
            await original(self, info)

        monkeypatch.setattr(cls, "done", done)


def lie_text(monkeypatch: pytest.MonkeyPatch) -> None:
    deliver_other(monkeypatch, lambda piece, ids: (piece + "!", ids))


def lie_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    deliver_other(monkeypatch, lambda piece, ids: (piece, [ids[0] ^ 1, *ids[1:]]))


def lie_too_many_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    deliver_other(monkeypatch, lambda piece, ids: (piece, ids + [7] * 100))  # more than max_tokens (24)


def lie_count(monkeypatch: pytest.MonkeyPatch) -> None:
    claim_other(monkeypatch, lambda info: info.update(tokens=info["tokens"] - 1))


def lie_finish_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    claim_other(
        monkeypatch,
        lambda info: info.update(finish_reason="eos" if info["finish_reason"] != "eos" else "length"),
    )


def sign_v1(monkeypatch: pytest.MonkeyPatch) -> None:
    def signed(self: Responder, identity: Identity, model_id: str, finish_reason: str) -> str:
        return b64(identity.sign(v1_transcript(self.request, model_id, "".join(self.sent_text))))

    monkeypatch.setattr(Responder, "signed", signed)


def sign_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Responder, "signed", lambda *args: "")


def sign_with_another_key(monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = Identity.generate()
    original = Responder.signed
    monkeypatch.setattr(Responder, "signed", lambda self, identity, *rest: original(self, stranger, *rest))


LIES: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "text": (lie_text, "transcript signature does not verify"),
    "ids": (lie_ids, "transcript signature does not verify"),
    "count": (lie_count, r"claims \d+ tokens but sent \d+ token ids"),
    "too_many_ids": (lie_too_many_ids, "sent more tokens than --max-tokens allows"),
    "finish_reason": (lie_finish_reason, "transcript signature does not verify"),
    "v1_signature": (sign_v1, "transcript signature does not verify"),
    "no_signature": (sign_nothing, "transcript signature does not verify"),
    "other_key": (sign_with_another_key, "transcript signature does not verify"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lie", sorted(LIES))
async def test_a_seed_whose_answer_does_not_match_its_signature_fails(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, lie: str
) -> None:
    await start(swarm, mode)
    patch, reason = LIES[lie]
    patch(monkeypatch)
    with pytest.raises(GtorrentError, match=reason):
        await ask(swarm, tmp_path, mode)
    store = Store.open(tmp_path / "store")
    assert store.standing(swarm.seeds[0].identity.peer_id).asks_failed == 1  # the seed's fault, on record
    store.close()


async def test_an_unsigned_private_answer_fails(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A final chunk with no signature at all (a direct `done` without one is dropped by its schema)."""
    await start(swarm, "private")
    original = PrivateResponder._chunk

    async def chunk(self: PrivateResponder, body: dict[str, Any]) -> None:
        body.pop("signature", None)
        await original(self, body)

    monkeypatch.setattr(PrivateResponder, "_chunk", chunk)
    with pytest.raises(GtorrentError, match="malformed or unsigned end of answer"):
        await ask(swarm, tmp_path, "private")


@pytest.mark.parametrize("mode", MODES)
async def test_a_bad_signature_is_retried_on_another_seed(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    await start(swarm, mode, seeds=2)
    liars: list[str] = []
    attempts: list[str] = []

    def on_attempt(seed: PeerRecord, number: int) -> None:
        attempts.append(seed.peer_id)
        if not liars:
            liars.append(seed.peer_id)  # whichever seed is asked first lies

    original = Responder.signed

    def signed(self: Responder, identity: Identity, model_id: str, finish_reason: str) -> str:
        if identity.peer_id in liars:
            return b64(identity.sign(v1_transcript(self.request, model_id, "".join(self.sent_text))))
        return original(self, identity, model_id, finish_reason)

    monkeypatch.setattr(Responder, "signed", signed)
    result = await ask(swarm, tmp_path, mode, AskEvents(on_attempt=on_attempt))
    assert len(attempts) == 2 and attempts[0] == liars[0] != result.seed
    assert result.failures and "signature" in result.failures[0]["reason"]
    assert verify_signature(
        result.signing_key,
        result.signature,
        transcript(
            result.request_bytes, result.model_id, result.text, result.token_ids, result.finish_reason
        ),
    )


async def test_an_unsigned_direct_answer_fails(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `done` without `signature` breaks the schema: the asker drops it and the seed has not finished
    its answer, which is the seed's fault (a timeout), never an unsigned answer accepted."""
    await start(swarm, "direct")
    original = DirectResponder.done

    async def done(self: DirectResponder, info: dict[str, Any]) -> None:
        info.pop("signature")
        await original(self, info)

    monkeypatch.setattr(DirectResponder, "done", done)
    store = Store.open(tmp_path / "store")
    with pytest.raises(GtorrentError, match="failed after 1 attempt"):
        await ask_direct(
            swarm.ctx,
            [swarm.url],
            AskRequest(PROMPT, max_tokens=8),
            store,
            timeouts=AskTimeouts(between_tokens_s=1.0),
        )
    assert store.standing(swarm.seeds[0].identity.peer_id).asks_failed == 1
    store.close()
