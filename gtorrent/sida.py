"""S-IDA, secure information dispersal (Krawczyk; Garlic Cast): split a message into n cloves, any k rebuild it.

`split(message, n, k)`:

1. draw a fresh 32-byte key K and a 12-byte nonce from `rng`;
2. encrypt with ChaCha20-Poly1305; the associated data binds the header (`b"gtorrent/sida/v1"`, n, k
   and the ciphertext length, which is the message length + 28);
3. erasure-code the ciphertext (nonce || ct || tag), zero-padded to a multiple of k, into n fragments
   of ceil(length / k) bytes with zfec (an MDS Reed-Solomon code: any k fragments rebuild it);
4. Shamir-share K over GF(2^8) (polynomial 0x11B, generator 0x03): one random polynomial of degree
   k - 1 per key byte, constant term = the key byte, evaluated at x = 1..n.

Clove i carries fragment i and share i. `combine` takes the first k cloves with distinct indices,
Lagrange-interpolates K at x = 0, decodes the fragments and decrypts.

Invariants:

- any k cloves rebuild the message; the other n - k may be lost;
- k - 1 cloves reveal nothing about K: Shamir sharing with uniform coefficients is
  information-theoretically hiding, so they hold only ciphertext fragments under an unknown key;
- a corrupted clove among the k used (fragment, share, header or padding) makes `combine` raise
  `SidaError`, never return wrong plaintext: the AEAD tag fails, or the padding is not zero. Cloves
  beyond the first k are checked for matching n, k and length but otherwise unused.

Differences from the paper's artifact (shared/research/paper-notes.md §2.2): the artifact encrypts
with AES-256-CBC and hex-encodes the ciphertext, so a corrupted clove decrypts to garbage (or a
padding error) undetected; here an AEAD gives integrity and fragments are raw bytes. The artifact
draws Shamir coefficients from 1..255, which leaks (for k = 2 a share never equals its key byte);
here they are uniform over 0..255. The erasure code is zfec's systematic code rather than the
artifact's plain Vandermonde rows; clove layouts are not interoperable with the artifact.

Pure: no I/O, all randomness from `rng` (os.urandom by default). A seeded `rng` is for tests only:
the same seed for two messages reuses key and nonce.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import zfec  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = ["Clove", "SidaError", "combine", "split"]

VERSION = 1  # first byte of every serialized clove
AAD_LABEL = b"gtorrent/sida/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MIN_LENGTH = NONCE_BYTES + TAG_BYTES  # ciphertext of the empty message
MAX_LENGTH = 0xFFFF_FFFF  # the header stores the ciphertext length as u32
MAX_CLOVES = 255  # x-coordinates 1..n must be distinct non-zero elements of GF(2^8)
HEADER = struct.Struct(">BBBBI")  # version, index, n, k, ciphertext length
CLOVE_OVERHEAD_BYTES = HEADER.size + KEY_BYTES  # serialized clove = this + fragment

Rng = Callable[[int], bytes]
Bytes8 = npt.NDArray[np.uint8]


class SidaError(ValueError):
    """Bad split parameters, or cloves that are malformed, inconsistent, too few or corrupted."""


# --- GF(2^8), reduction polynomial x^8 + x^4 + x^3 + x + 1 (0x11B), generator 0x03 -------------------


def _build_tables() -> tuple[list[int], list[int]]:
    exp = [0] * 510  # doubled so exp[log a + log b] needs no reduction mod 255
    log = [0] * 256  # log[0] is undefined; every user masks zero first
    value = 1
    for power in range(255):
        exp[power] = exp[power + 255] = value
        log[value] = power
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= 0x11B
        value ^= doubled  # value * 3 = value * 2 + value
    return exp, log


_EXP, _LOG = _build_tables()
_exp = np.array(_EXP, dtype=np.uint8)
_log = np.array(_LOG, dtype=np.intp)
# _MUL[a] is the 256-byte table of b -> a * b: multiplying a vector by a scalar is one fancy index.
_MUL: Bytes8 = _exp[_log[:, None] + _log[None, :]]
_MUL[0, :] = 0
_MUL[:, 0] = 0


def gf_mul(a: int, b: int) -> int:
    """a * b in GF(2^8)."""
    return int(_MUL[a, b])


def gf_inv(a: int) -> int:
    """The multiplicative inverse of a non-zero a in GF(2^8)."""
    if not 0 < a < 256:
        raise ZeroDivisionError(f"{a} has no inverse in GF(2^8)")
    return _EXP[255 - _LOG[a]]


def gf_interpolate(points: Sequence[tuple[int, bytes]], at: int = 0) -> bytes:
    """Evaluate, bytewise at x = `at`, the polynomial of degree < len(points) through `points`.

    Each point is (x, y) with distinct x and equal-length y; byte j of every y is one polynomial.
    """
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise SidaError("interpolation points need distinct x")
    result = np.zeros(len(points[0][1]) if points else 0, dtype=np.uint8)
    for j, (x_j, y_j) in enumerate(points):
        # Lagrange basis at `at`: prod over m != j of (at - x_m) / (x_j - x_m); minus is xor here.
        basis = 1
        for m, x_m in enumerate(xs):
            if m != j:
                basis = gf_mul(basis, gf_mul(at ^ x_m, gf_inv(x_j ^ x_m)))
        result ^= _MUL[basis][np.frombuffer(y_j, dtype=np.uint8)]
    return result.tobytes()


def _shamir_shares(secret: bytes, n: int, k: int, rng: Rng) -> list[bytes]:
    """Shares of `secret` at x = 1..n; any k interpolate it at x = 0."""
    # Row t holds the coefficients of x^t for every byte; coefficients are uniform over all 256
    # values (including 0), which is what makes k - 1 shares independent of the secret.
    coefficients = np.frombuffer(secret + _draw(rng, (k - 1) * len(secret)), dtype=np.uint8)
    coefficients = coefficients.reshape(k, len(secret))
    shares = []
    for x in range(1, n + 1):
        mul_x = _MUL[x]
        value = coefficients[k - 1]
        for row in coefficients[: k - 1][::-1]:  # Horner, highest degree first
            value = mul_x[value] ^ row
        shares.append(value.tobytes())
    return shares


# --- cloves ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clove:
    """One of n pieces of a dispersed message; validated on construction."""

    index: int  # 1..n: the Shamir x-coordinate, and zfec block number index - 1
    n: int  # cloves made
    k: int  # cloves needed
    length: int  # ciphertext bytes (nonce || ct || tag) before padding to a multiple of k
    share: bytes = field(repr=False)  # KEY_BYTES: Shamir share of the key at x = index
    fragment: bytes = field(repr=False)  # ceil(length / k) bytes of erasure-coded ciphertext

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_CLOVES:
            raise SidaError(f"clove n={self.n} out of range 1..{MAX_CLOVES}")
        if not 1 <= self.k <= self.n:
            raise SidaError(f"clove k={self.k} out of range 1..n={self.n}")
        if not 1 <= self.index <= self.n:
            raise SidaError(f"clove index {self.index} out of range 1..n={self.n}")
        if not MIN_LENGTH <= self.length <= MAX_LENGTH:
            raise SidaError(f"clove length {self.length} out of range {MIN_LENGTH}..{MAX_LENGTH}")
        if len(self.share) != KEY_BYTES:
            raise SidaError(f"clove share is {len(self.share)} bytes, expected {KEY_BYTES}")
        expected = _fragment_bytes(self.length, self.k)
        if len(self.fragment) != expected:
            raise SidaError(
                f"clove fragment is {len(self.fragment)} bytes, expected {expected} "
                f"(length {self.length}, k={self.k})"
            )

    def to_bytes(self) -> bytes:
        """version u8 | index u8 | n u8 | k u8 | length u32 (big-endian) | share 32 B | fragment."""
        header = HEADER.pack(VERSION, self.index, self.n, self.k, self.length)
        return header + self.share + self.fragment

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Clove:
        """Parse `to_bytes` output; raise SidaError on anything malformed, including trailing bytes."""
        data = bytes(data)
        if len(data) < CLOVE_OVERHEAD_BYTES:
            raise SidaError(
                f"clove truncated: {len(data)} bytes, header and share need {CLOVE_OVERHEAD_BYTES}"
            )
        version, index, n, k, length = HEADER.unpack_from(data)
        if version != VERSION:
            raise SidaError(f"clove version {version} not supported (expected {VERSION})")
        share = data[HEADER.size : CLOVE_OVERHEAD_BYTES]
        fragment = data[CLOVE_OVERHEAD_BYTES:]
        return cls(index=index, n=n, k=k, length=length, share=share, fragment=fragment)


def _fragment_bytes(length: int, k: int) -> int:
    return -(-length // k)


def _draw(rng: Rng, size: int) -> bytes:
    data = rng(size)
    if len(data) != size:
        raise SidaError(f"rng returned {len(data)} bytes, asked for {size}")
    return bytes(data)


def _aad(n: int, k: int, length: int) -> bytes:
    return AAD_LABEL + struct.pack(">BBI", n, k, length)


@functools.lru_cache(maxsize=32)
def _encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@functools.lru_cache(maxsize=32)
def _decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


# --- split / combine -------------------------------------------------------------------------------


def split(message: bytes, n: int = 4, k: int = 3, *, rng: Rng = os.urandom) -> list[Clove]:
    """Disperse `message` into n cloves, any k of which rebuild it and any k - 1 reveal nothing."""
    if not 1 <= n <= MAX_CLOVES:
        raise SidaError(f"n={n} out of range 1..{MAX_CLOVES}")
    if not 1 <= k <= n:
        raise SidaError(f"k={k} out of range 1..n={n}")
    length = MIN_LENGTH + len(message)
    if length > MAX_LENGTH:
        raise SidaError(f"message of {len(message)} bytes too long (at most {MAX_LENGTH - MIN_LENGTH})")

    key = _draw(rng, KEY_BYTES)
    nonce = _draw(rng, NONCE_BYTES)
    ciphertext = nonce + ChaCha20Poly1305(key).encrypt(nonce, bytes(message), _aad(n, k, length))

    size = _fragment_bytes(length, k)
    padded = ciphertext.ljust(size * k, b"\0")
    chunks = [padded[i * size : (i + 1) * size] for i in range(k)]
    fragments: list[bytes] = _encoder(k, n).encode(chunks)

    shares = _shamir_shares(key, n, k, rng)
    return [
        Clove(index=i + 1, n=n, k=k, length=length, share=shares[i], fragment=fragments[i]) for i in range(n)
    ]


def combine(cloves: Sequence[Clove]) -> bytes:
    """Rebuild the message from the first k cloves with distinct indices (k read from the cloves)."""
    if not cloves:
        raise SidaError("no cloves to combine")
    first = cloves[0]
    n, k, length = first.n, first.k, first.length
    chosen: dict[int, Clove] = {}
    for clove in cloves:
        if (clove.n, clove.k, clove.length) != (n, k, length):
            raise SidaError(
                f"cloves from different splits: clove {clove.index} has n={clove.n} k={clove.k} "
                f"length={clove.length}, clove {first.index} has n={n} k={k} length={length}"
            )
        if len(chosen) < k:
            chosen.setdefault(clove.index, clove)
    if len(chosen) < k:
        raise SidaError(f"need {k} cloves with distinct indices to combine, got {len(chosen)}")

    used = list(chosen.values())
    key = gf_interpolate([(c.index, c.share) for c in used], at=0)
    chunks: list[bytes] = _decoder(k, n).decode([c.fragment for c in used], [c.index - 1 for c in used])
    padded = b"".join(chunks)
    if padded[length:].strip(b"\0"):
        # Padding is only zero bytes; anything else is a corrupted fragment that the tag cannot see.
        raise SidaError("clove corrupted: fragment padding is not zero")
    nonce, sealed = padded[:NONCE_BYTES], padded[NONCE_BYTES:length]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, sealed, _aad(n, k, length))
    except InvalidTag:
        raise SidaError("clove corrupted or cloves from different messages: authentication failed") from None


# --- erasure coding alone (IDA), for data that is already encrypted -----------------------------------


def disperse(data: bytes, n: int, k: int) -> list[bytes]:
    """Rabin IDA only: n fragments of ceil(len/k) bytes, any k of which rebuild `data` (with its length).

    For data that is already sealed end to end (a reply chunk under the reply key): no key sharing."""
    if not 1 <= k <= n <= MAX_CLOVES:
        raise SidaError(f"bad n={n}, k={k}")
    size = max(1, _fragment_bytes(len(data), k))
    padded = bytes(data).ljust(size * k, b"\0")
    result: list[bytes] = _encoder(k, n).encode([padded[i * size : (i + 1) * size] for i in range(k)])
    return result


def recover(fragments: dict[int, bytes], n: int, k: int, length: int) -> bytes:
    """Rebuild `length` bytes from any k fragments, keyed by their 0-based index."""
    if len(fragments) < k:
        raise SidaError(f"need {k} fragments, got {len(fragments)}")
    chosen = sorted(fragments.items())[:k]
    if len({len(fragment) for _, fragment in chosen}) != 1 or any(not 0 <= i < n for i, _ in chosen):
        raise SidaError("fragments of different sizes or out of range")
    chunks: list[bytes] = _decoder(k, n).decode([f for _, f in chosen], [i for i, _ in chosen])
    joined = b"".join(chunks)
    if len(joined) < length:
        raise SidaError("fragments too short for the stated length")
    return joined[:length]
