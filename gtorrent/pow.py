"""Proof of work on new identities: a small, measured price for each peer id a tracker first lists.

work(signing key, nonce) = the number of leading zero bits of BLAKE2b-256("gtorrent/pow/v1" ‖ signing
public key ‖ nonce). The work is bound to the public key, not to a record: one nonce serves every record
the identity ever signs, so a peer solves once per identity and per difficulty (the announcer keeps the
nonce in the home, `pow.json`). Because the proof is about a public key, anyone can check it and no
signature makes it stronger; a record carries it as `pow` next to `signature`, outside the signed bytes.

Invariants: `work` is pure and cheap (one hash); `solve` returns a nonce with at least the asked work,
or raises `PowTooHard` above MAX_POW_BITS (a tracker cannot make a peer grind for ever); nonces are 8
bytes. What it buys (THREAT_MODEL.md): grinding ids that sort first is already useless (listings are
keyed by the client), so the work only prices identities: at `bits` of work, each new identity costs
about 2^bits hashes.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from .errors import GtorrentError
from .paths import ensure_private_dir, write_private_file

POW_LABEL = b"gtorrent/pow/v1"
NONCE_BYTES = 8
MAX_POW_BITS = 28  # ~2^28 hashes: minutes of one core; trackers may ask for no more
POW_FILE = "pow.json"


class PowTooHard(GtorrentError):
    default_hint = "ask the tracker's operator to lower --pow-bits, or announce to other trackers"


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def work(signing_key: bytes, nonce: bytes) -> int:
    """The work `nonce` proves for this signing public key (0 for an empty nonce)."""
    if not nonce:
        return 0
    return leading_zero_bits(hashlib.blake2b(POW_LABEL + signing_key + nonce, digest_size=32).digest())


def solve(signing_key: bytes, bits: int, start: int | None = None) -> bytes:
    """A nonce proving at least `bits` of work for this key (about 2^bits hashes)."""
    if bits > MAX_POW_BITS:
        raise PowTooHard(f"{bits} bits of proof of work asked; at most {MAX_POW_BITS} are done")
    if bits <= 0:
        return b""
    prefix = hashlib.blake2b(POW_LABEL + signing_key, digest_size=32)  # copied per try: the prefix is hashed once
    # a random start: two processes solving for one key do not repeat each other's work
    counter = secrets.randbits(62) if start is None else start
    threshold = 1 << (64 - bits)  # the first 8 bytes below this: at least `bits` leading zeros
    while True:
        nonce = counter.to_bytes(NONCE_BYTES, "big")
        hasher = prefix.copy()
        hasher.update(nonce)
        if int.from_bytes(hasher.digest()[:8], "big") < threshold:
            return nonce
        counter = (counter + 1) % (1 << 64)


class PowCache:
    """Solved nonces by peer id, in the home's `pow.json` (0600, replaced atomically)."""

    def __init__(self, home: Path) -> None:
        self.path = home / POW_FILE

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # missing or damaged: a nonce is only ever recomputed, never trusted blindly
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}

    def get(self, peer_id: str, signing_key: bytes, bits: int) -> bytes | None:
        """A cached nonce for this identity with at least `bits` of work (checked, not believed)."""
        text = self._load().get(peer_id)
        if text is None:
            return None
        try:
            nonce = bytes.fromhex(text)
        except ValueError:
            return None
        return nonce if len(nonce) == NONCE_BYTES and work(signing_key, nonce) >= bits else None

    def put(self, peer_id: str, nonce: bytes) -> None:
        data = self._load()
        data[peer_id] = nonce.hex()
        ensure_private_dir(self.path.parent)
        write_private_file(self.path, json.dumps(data, sort_keys=True).encode(), replace=True)
