"""What travels inside circuits for a private ask (pure): request cloves out, reply fragments back.

Out: the request (a JSON object that also carries a fresh 32-byte reply key) is split with S-IDA into
n cloves; clove j rides path j, cut into DATA cells of `ask id (16) | sequence (u32) | last (u8) |
bytes`. The ask id is random per ask and visible only to the seed (it is inside the seed's onion
layer); it is how the seed groups the n paths of one ask. The seed rebuilds the request from the first
k complete cloves.

Back: the answer streams as chunks; each chunk is sealed end to end with the reply key
(ChaCha20-Poly1305, nonce = chunk index) and erasure-coded (IDA) into n fragments, fragment j on
path j: `chunk index (u32) | fragment index (u8) | n | k | sealed length (u32) | fragment`, so any k
paths deliver every chunk. Text chunks carry the answer's token ids with the text; the last chunk
carries the seed's signature over the transcript (`transcript`: request digest, model id, answer text,
token ids, token count, finish reason), which the asker checks against the seed's signed record.
Direct answers are signed over the same transcript (seed.py, asker.py).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .protocol import MAX_TOKEN_IDS_PER_MESSAGE, canonical
from .sida import SidaError, disperse, recover

ASK_ID_BYTES = 16
REPLY_KEY_BYTES = 32
CLOVE_HEAD = struct.Struct(">16sIB")
REPLY_HEAD = struct.Struct(">IBBBI")
REPLY_AAD = b"gtorrent/reply/v1"
TRANSCRIPT_LABEL = b"gtorrent/transcript/v2\n"  # v1 (text only, no ids/count/finish reason) is refused
MAX_TOKEN_ID = (1 << 32) - 1  # token ids travel and are hashed as u32
MAX_CLOVE_BYTES = 64 << 10  # a clove of the largest request (256 KiB / k) fits; more is abuse
MAX_CHUNKS = 1 << 20
REPLY_WINDOW_CHUNKS = 256  # chunks buffered ahead of the next one due: ~25 s of answer at one per 0.1 s
MAX_REPLY_BUFFER_BYTES = 4 << 20  # fragment and chunk bytes an asker holds for one answer


class GarlicError(ValueError):
    """Malformed or unauthentic clove cells or reply fragments."""


# ------------------------------------------------------------------ request cloves


def clove_payloads(ask_id: bytes, clove: bytes, capacity: int) -> list[bytes]:
    """Cut one serialized clove into DATA payloads of at most `capacity` bytes."""
    room = capacity - CLOVE_HEAD.size
    pieces = [clove[i : i + room] for i in range(0, len(clove), room)] or [b""]
    return [CLOVE_HEAD.pack(ask_id, seq, seq == len(pieces) - 1) + piece for seq, piece in enumerate(pieces)]


@dataclass
class CloveAssembler:
    """Per circuit: collects DATA payloads until the clove is whole."""

    ask_id: bytes | None = None
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    done: bool = False

    def feed(self, payload: bytes) -> bytes | None:
        """Add one payload; return the whole clove once its last piece has arrived."""
        if len(payload) < CLOVE_HEAD.size or self.done:
            raise GarlicError("unexpected clove cell")
        ask_id, seq, last = CLOVE_HEAD.unpack_from(payload)
        if self.ask_id is None:
            self.ask_id = ask_id
        if ask_id != self.ask_id or seq != len(self.parts) or last > 1:
            raise GarlicError("clove cells out of order or of two asks")
        piece = payload[CLOVE_HEAD.size :]
        self.size += len(piece)
        if self.size > MAX_CLOVE_BYTES:
            raise GarlicError("clove too large")
        self.parts.append(piece)
        if last:
            self.done = True
            return b"".join(self.parts)
        return None


# ------------------------------------------------------------------ reply chunks


def _nonce(index: int) -> bytes:
    return struct.pack(">4xQ", index)


def reply_payloads(reply_key: bytes, index: int, chunk: dict[str, Any], n: int, k: int) -> list[bytes]:
    """Seal chunk `index` and return its n fragment payloads (payload j for path j)."""
    plain = json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    sealed = ChaCha20Poly1305(reply_key).encrypt(_nonce(index), plain, REPLY_AAD)
    return [REPLY_HEAD.pack(index, j, n, k, len(sealed)) + fragment for j, fragment in enumerate(disperse(sealed, n, k))]


def reply_fragment_room(n: int, k: int, capacity: int) -> int:
    """The largest sealed chunk whose fragments fit one cell each."""
    return (capacity - REPLY_HEAD.size) * k


def chunk_fits(chunk: dict[str, Any], k: int, capacity: int) -> bool:
    """True when the sealed chunk's fragments each fit one cell of `capacity` payload bytes."""
    plain = len(json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return plain + 16 <= reply_fragment_room(0, k, capacity)


def split_to_fit(text: str, ids: list[int], k: int, capacity: int) -> list[tuple[str, list[int]]]:
    """Cut a piece of answer (its text and token ids) into parts whose {"text", "ids"} chunks fit one
    cell per fragment. Concatenating the parts' texts (and ids) gives back `text` (and `ids`)."""
    if chunk_fits({"text": text, "ids": ids}, k, capacity) or (len(text) <= 1 and len(ids) <= 1):
        return [(text, ids)]  # one character and one id always fit (a 6-byte escape, 10 digits)
    text_middle, ids_middle = len(text) // 2, len(ids) // 2
    return split_to_fit(text[:text_middle], ids[:ids_middle], k, capacity) + split_to_fit(
        text[text_middle:], ids[ids_middle:], k, capacity
    )


def text_chunk(chunk: dict[str, Any]) -> tuple[str, list[int]]:
    """The piece of text and its token ids in a {"text", "ids"} reply chunk, checked: a string, and at
    most MAX_TOKEN_IDS_PER_MESSAGE ids, each an integer in u32 (GarlicError otherwise)."""
    text, ids = chunk.get("text"), chunk.get("ids")
    if not isinstance(text, str) or not isinstance(ids, list) or len(ids) > MAX_TOKEN_IDS_PER_MESSAGE:
        raise GarlicError("a text chunk needs a string and a bounded list of token ids")
    if not all(type(token) is int and 0 <= token <= MAX_TOKEN_ID for token in ids):
        raise GarlicError("a token id is not an integer in 0..2**32-1")
    return text, ids


@dataclass
class ReplyAssembler:
    """The asker's side: fragments from any k paths -> chunks, released in order.

    Fragment j must arrive on path j (the seed sends it there), so a path can only spoil its own
    fragment. When k fragments do not rebuild an authentic chunk, the fragments that arrive later are
    tried too (every k of them), so any k honest paths deliver it. A path whose fragment is malformed
    or disagrees with the chunk's shape becomes a suspect (`take_suspects`): a relay on it is
    injecting cells, and the seed is not to blame.

    Memory is bounded whatever the paths send: only chunks within REPLY_WINDOW_CHUNKS of `next_index`
    are buffered, and at most MAX_REPLY_BUFFER_BYTES in all. The seed sends every chunk on every path in
    order, so an honest path is never that far ahead; a path that is (or that would overflow the
    buffer) becomes a suspect, its buffered fragments are dropped and its later ones ignored."""

    reply_key: bytes
    fragments: dict[int, dict[int, tuple[int, bytes]]] = field(default_factory=dict)  # chunk -> j -> (path, bytes)
    shape: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    next_index: int = 0
    ready: dict[int, dict[str, Any]] = field(default_factory=dict)
    suspects: set[int] = field(default_factory=set)
    ignored: set[int] = field(default_factory=set)  # paths cut off for overrunning the window or buffer
    buffered: int = 0  # bytes held in `fragments` and `ready`
    ready_bytes: dict[int, int] = field(default_factory=dict)

    def take_suspects(self) -> set[int]:
        found, self.suspects = self.suspects, set()
        return found

    def feed(self, payload: bytes, path: int = 0) -> list[dict[str, Any]]:
        """Add one fragment; return the chunks that became deliverable, in order."""
        if len(payload) < REPLY_HEAD.size:
            self.suspects.add(path)
            return []
        if path in self.ignored:
            return []
        index, j, n, k, length = REPLY_HEAD.unpack_from(payload)
        if index >= MAX_CHUNKS or not 1 <= k <= n or j >= n or j != path:
            # the seed sends fragment j on path j only: a path cannot speak for another one
            self.suspects.add(path)
            return []
        if index < self.next_index or index in self.ready:
            return self._release()  # late fragment of a chunk already rebuilt
        fragment = payload[REPLY_HEAD.size :]
        if index >= self.next_index + REPLY_WINDOW_CHUNKS or self.buffered + len(fragment) > MAX_REPLY_BUFFER_BYTES:
            self._ignore(path)
            return self._release()
        if self.shape.setdefault(index, (n, k, length)) != (n, k, length):
            self.suspects.add(path)  # disagrees with the first fragment of this chunk
            return self._release()
        have = self.fragments.setdefault(index, {})
        if j in have:
            self.buffered -= len(have[j][1])
        have[j] = (path, fragment)
        self.buffered += len(fragment)
        if len(have) >= k:
            self._try_rebuild(index, n, k, length)
        return self._release()

    def _ignore(self, path: int) -> None:
        """Cut a path off: drop what it has buffered and everything it sends from now on."""
        self.suspects.add(path)
        self.ignored.add(path)
        for index, have in list(self.fragments.items()):
            for j, (from_path, fragment) in list(have.items()):
                if from_path == path:
                    del have[j]
                    self.buffered -= len(fragment)
            if not have:
                del self.fragments[index]
                self.shape.pop(index, None)

    def _try_rebuild(self, index: int, n: int, k: int, length: int) -> None:
        from itertools import combinations

        have = self.fragments[index]
        for subset in combinations(sorted(have), k):
            try:
                sealed = recover({j: have[j][1] for j in subset}, n, k, length)
                plain = ChaCha20Poly1305(self.reply_key).decrypt(_nonce(index), sealed, REPLY_AAD)
                chunk = json.loads(plain)
            except (SidaError, InvalidTag, ValueError):
                continue
            if not isinstance(chunk, dict):
                continue
            self.ready[index] = chunk
            self.ready_bytes[index] = len(plain)
            self.buffered += len(plain) - sum(len(fragment) for _, fragment in have.values())
            del self.fragments[index]
            self.shape.pop(index, None)
            return
        if len(have) >= n:  # every fragment is in and no k of them rebuild the chunk
            raise GarlicError(f"reply chunk {index} failed authentication on every set of {k} paths")

    def _release(self) -> list[dict[str, Any]]:
        out = []
        while self.next_index in self.ready:
            out.append(self.ready.pop(self.next_index))
            self.buffered -= self.ready_bytes.pop(self.next_index)
            self.next_index += 1
        return out


# ------------------------------------------------------------------ transcript


def request_digest(request: bytes) -> bytes:
    return hashlib.sha256(request).digest()


def direct_request_bytes(body: dict[str, Any]) -> bytes:
    """The request bytes of a direct ask's transcript: the canonical JSON (protocol.canonical) of the
    `generate` body as the seed decoded it (without `v` and `t`, with `id`). The asker computes it from
    the decoding of the frames it sends, so both sides hash the same bytes."""
    return canonical(body)


def _text_bytes(text: str) -> bytes:
    # surrogatepass: a lying seed may send lone surrogates (JSON \ud800); they must hash, not crash, and
    # the encoding stays injective (a lone surrogate's 3 bytes never spell a 4-byte UTF-8 sequence)
    return text.encode("utf-8", "surrogatepass")


def token_ids_digest(token_ids: Sequence[int]) -> bytes:
    """SHA-256 of the token ids as consecutive little-endian u32 (4 bytes each, no separator)."""
    if any(not 0 <= token <= MAX_TOKEN_ID for token in token_ids):
        raise ValueError("a token id is outside 0..2**32-1")
    return hashlib.sha256(struct.pack(f"<{len(token_ids)}I", *token_ids)).digest()


def transcript(
    request: bytes, model_id: str, text: str, token_ids: Sequence[int], finish_reason: str
) -> bytes:
    """The bytes a seed signs for an answer, direct or private (v2):

        label "gtorrent/transcript/v2\n" (23 bytes)
        | sha256(request bytes) (32) | len(model id) (u16 BE) | model id (UTF-8)
        | sha256(answer text, UTF-8) (32) | sha256(token ids, each u32 LE) (32)
        | token count (u32 BE) | len(finish reason) (u8) | finish reason (UTF-8)

    Unambiguous: every field is either fixed-width or preceded by its length, so reading left to right
    recovers each field and its end exactly; no choice of model id, text or finish reason can shift
    bytes from one field into the next (a model id cannot swallow the text digest, "len"+"gth" is not
    "length"), and the last field ends where the bytes end. The count is len(token_ids): the asker
    refuses a `done` whose `tokens` differs. The label is versioned, so a v1 signature (label v1,
    request digest, bare model id, text digest) never verifies as a v2 transcript, nor the reverse.
    Raises ValueError for fields that cannot be encoded (an over-long model id or finish reason, an id
    outside u32): a seed sending such a thing is at fault."""
    model = _text_bytes(model_id)
    reason = _text_bytes(finish_reason)
    if len(model) > 0xFFFF or len(reason) > 0xFF or len(token_ids) > MAX_TOKEN_ID:
        raise ValueError("a transcript field is too long")
    return b"".join(
        (
            TRANSCRIPT_LABEL,
            request_digest(request),
            struct.pack(">H", len(model)),
            model,
            hashlib.sha256(_text_bytes(text)).digest(),
            token_ids_digest(token_ids),
            struct.pack(">IB", len(token_ids), len(reason)),
            reason,
        )
    )
