"""S-IDA (pure): any k of n cloves rebuild, k - 1 reveal nothing about the key, corruption is detected."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtorrent import sida
from gtorrent.sida import Clove, SidaError, combine, split

SHAPES = [(4, 3), (5, 2), (3, 3), (1, 1), (2, 1), (6, 4)]


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


class RecordingRng:
    """A seeded rng that keeps what it handed out: split draws key, nonce, then Shamir coefficients."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self.draws: list[bytes] = []

    def __call__(self, size: int) -> bytes:
        self.draws.append(self._random.randbytes(size))
        return self.draws[-1]


def scripted(draws: list[bytes]) -> Callable[[int], bytes]:
    """An rng that hands out `draws` in order, whatever size is asked."""
    remaining = iter(draws)
    return lambda size: next(remaining)


def flip_bit(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def slow_gf_mul(a: int, b: int) -> int:
    """Shift-and-add multiplication modulo 0x11B, independent of the module's tables."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11B
        b >>= 1
    return product


# --- GF(2^8) -----------------------------------------------------------------------------------------


def test_gf_known_product_and_inverses() -> None:
    assert sida.gf_mul(0x57, 0x83) == 0xC1  # FIPS-197 §4.2
    assert sida.gf_mul(0x57, 0x13) == 0xFE  # FIPS-197 §4.2.1
    for a in range(1, 256):
        assert sida.gf_mul(a, sida.gf_inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        sida.gf_inv(0)


def test_gf_table_matches_shift_and_add() -> None:
    for a in range(256):
        row = sida._MUL[a]
        assert [int(v) for v in row] == [slow_gf_mul(a, b) for b in range(256)]


# --- any k of n rebuild ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("size", [0, 1, 31, 4096, 100 * 1024])
def test_every_k_subset_rebuilds(n: int, k: int, size: int) -> None:
    message = random.Random(size).randbytes(size)
    cloves = split(message, n, k, rng=seeded(n * 1000 + k))
    assert [c.index for c in cloves] == list(range(1, n + 1))
    for subset in itertools.combinations(cloves, k):
        assert combine(subset) == message
        assert combine(subset[::-1]) == message


@settings(max_examples=60, deadline=None)
@given(
    message=st.binary(max_size=2048),
    shape=st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
    data=st.data(),
)
def test_any_k_rebuild_property(message: bytes, shape: tuple[int, int], data: st.DataObject) -> None:
    n, k = shape
    cloves = split(message, n, k)
    chosen = data.draw(st.permutations(cloves))[:k]
    assert combine(chosen) == message


def test_default_shape_is_4_of_3() -> None:
    cloves = split(b"prompt")
    assert (len(cloves), cloves[0].n, cloves[0].k) == (4, 4, 3)


def test_extra_and_duplicate_cloves_are_fine() -> None:
    cloves = split(b"hello", 5, 3)
    assert combine([cloves[0], cloves[0], cloves[2], cloves[0], cloves[4], cloves[1]]) == b"hello"
    assert combine(cloves + cloves) == b"hello"


def test_fewer_than_k_distinct_is_refused() -> None:
    cloves = split(b"hello", 4, 3)
    with pytest.raises(SidaError, match="need 3 cloves with distinct indices to combine, got 2"):
        combine([cloves[0], cloves[1], cloves[1], cloves[0]])
    with pytest.raises(SidaError, match="no cloves"):
        combine([])


def test_cloves_of_different_splits_are_refused() -> None:
    a = split(b"first message", 4, 3)
    with pytest.raises(SidaError, match="different splits"):
        combine([a[0], a[1], split(b"first message", 5, 3)[2]])
    with pytest.raises(SidaError, match="different splits"):
        combine([a[0], a[1], split(b"first message", 4, 2)[2]])
    with pytest.raises(SidaError, match="different splits"):
        combine([a[0], a[1], split(b"other length", 4, 3)[2]])
    # Same shape and length, different key: the tag catches it.
    with pytest.raises(SidaError, match="authentication failed"):
        combine([a[0], a[1], split(b"other message", 4, 3)[2]])
    # An inconsistent extra clove is refused even though the first k would do.
    with pytest.raises(SidaError, match="different splits"):
        combine([a[0], a[1], a[2], split(b"x", 4, 3)[3]])


@pytest.mark.parametrize(("n", "k"), [(0, 1), (256, 3), (3, 0), (3, 4), (-1, -1)])
def test_bad_shape_is_refused(n: int, k: int) -> None:
    with pytest.raises(SidaError, match="out of range"):
        split(b"x", n, k)


def test_largest_shape() -> None:
    cloves = split(b"many cloves", 255, 255, rng=seeded(7))
    assert combine(cloves[::-1]) == b"many cloves"


# --- k - 1 cloves reveal nothing -----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(4, 3), (5, 2), (3, 3), (5, 4), (2, 1)])
def test_k_minus_1_shares_leave_every_key_byte_possible(n: int, k: int) -> None:
    rng = RecordingRng(n * 31 + k)
    cloves = split(b"secret prompt", n, k, rng=rng)
    key = rng.draws[0]
    # Sanity: k shares do determine the key.
    assert sida.gf_interpolate([(c.index, c.share) for c in cloves[:k]], at=0) == key

    for known in itertools.combinations(cloves, k - 1):
        points = [(c.index, c.share[:1]) for c in known]
        # Each value c at an unused x = n + 1 completes a unique polynomial of degree <= k - 1 through
        # the known shares; its constant term is the key byte that choice implies.
        constants = set()
        for value in range(256):
            completed = [*points, (n + 1, bytes([value]))]
            for x, y in points:
                assert sida.gf_interpolate(completed, at=x) == y
            constants.add(sida.gf_interpolate(completed, at=0)[0])
        # All 256 key bytes are consistent with what the k - 1 cloves show: they pin down nothing.
        assert constants == set(range(256))


def test_one_share_is_uniform_whatever_the_key() -> None:
    """For k = 2 each coefficient gives a distinct share: uniform coefficients make a uniform share.

    (The paper's artifact draws coefficients from 1..255, so a share there never equals its key byte.)
    """
    for key_byte in (0x00, 0x5A, 0xFF):
        seen = set()
        for coefficient in range(256):
            cloves = split(
                b"", 2, 2, rng=scripted([bytes([key_byte]) * 32, bytes(12), bytes([coefficient]) * 32])
            )
            seen.add(cloves[0].share[0])
        assert seen == set(range(256))


def test_fragments_do_not_contain_the_plaintext() -> None:
    message = b"a very recognisable prompt about the weather " * 20
    for clove in split(message, 4, 3):
        assert b"recognisable" not in clove.fragment


# --- corruption is detected --------------------------------------------------------------------------


@pytest.mark.parametrize("parity_first", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "size"),
    [(4, 3, 100), (5, 2, 0), (3, 3, 1), (1, 1, 40), (4, 3, 29), (10, 9, 0), (7, 5, 3)],
)
def test_every_bit_flip_of_a_used_clove_is_detected(n: int, k: int, size: int, parity_first: bool) -> None:
    message = random.Random(size).randbytes(size)
    cloves = split(message, n, k, rng=seeded(size))
    # zfec is systematic: clove i <= k holds chunk i - 1 verbatim. Using the last cloves makes combine
    # rebuild the first chunks from parity; using all but the k-th rebuilds the last chunk, which holds
    # the zero padding (all of it for (10, 9, 0)), where only the padding check can see corruption.
    used = cloves[n - k :] if parity_first else [*cloves[: k - 1], cloves[-1]]
    for position in range(k):
        victim = used[position].to_bytes()
        for bit in range(len(victim) * 8):
            with pytest.raises(SidaError):
                corrupted = Clove.from_bytes(flip_bit(victim, bit))
                combine([*used[:position], corrupted, *used[position + 1 :]])


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_sampled_bit_flips_in_fragment_or_share_are_detected(data: st.DataObject) -> None:
    message = data.draw(st.binary(min_size=0, max_size=5000))
    n = data.draw(st.integers(1, 7))
    k = data.draw(st.integers(1, n))
    cloves = data.draw(st.permutations(split(message, n, k)))[:k]
    position = data.draw(st.integers(0, k - 1))
    victim = cloves[position]
    if data.draw(st.booleans()):
        bit = data.draw(st.integers(0, len(victim.fragment) * 8 - 1))
        victim = replace(victim, fragment=flip_bit(victim.fragment, bit))
    else:
        bit = data.draw(st.integers(0, sida.KEY_BYTES * 8 - 1))
        victim = replace(victim, share=flip_bit(victim.share, bit))
    cloves[position] = victim
    with pytest.raises(SidaError):
        combine(cloves)


def test_swapped_indices_are_detected() -> None:
    a, b, c, _ = split(b"order matters", 4, 3)
    with pytest.raises(SidaError, match="authentication failed"):
        combine([replace(a, index=b.index), replace(b, index=a.index), c])


# --- serialization -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k", "size"), [(4, 3, 0), (4, 3, 4096), (5, 2, 17), (1, 1, 3), (255, 200, 9)])
def test_serialization_round_trips(n: int, k: int, size: int) -> None:
    message = bytes(range(256)) * (size // 256) + bytes(size % 256)
    cloves = split(message, n, k, rng=seeded(1))
    for clove in cloves:
        data = clove.to_bytes()
        assert len(data) == sida.CLOVE_OVERHEAD_BYTES + -(-(len(message) + 28) // k)
        assert Clove.from_bytes(data) == clove
        assert Clove.from_bytes(bytearray(data)) == clove
    assert combine([Clove.from_bytes(c.to_bytes()) for c in cloves[-k:]]) == message


def test_clove_layout() -> None:
    clove = split(b"abc", 4, 3, rng=seeded(2))[1]
    data = clove.to_bytes()
    assert data[:8] == bytes([1, 2, 4, 3]) + (31).to_bytes(4, "big")  # 3 + 12 nonce + 16 tag
    assert data[8:40] == clove.share
    assert data[40:] == clove.fragment
    assert len(clove.fragment) == 11  # ceil(31 / 3)


def test_repr_hides_share() -> None:
    clove = split(b"abc", 2, 2)[0]
    assert clove.share.hex() not in repr(clove)
    assert "share" not in repr(clove)


def _with_header(data: bytes, **fields: int) -> bytes:
    version, index, n, k, length = sida.HEADER.unpack_from(data)
    values = {"version": version, "index": index, "n": n, "k": k, "length": length, **fields}
    return sida.HEADER.pack(*values.values()) + data[sida.HEADER.size :]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 0}, "version 0 not supported"),
        ({"version": 2}, "version 2 not supported"),
        ({"index": 0}, "index 0 out of range"),
        ({"index": 5}, "index 5 out of range"),
        ({"k": 5}, "k=5 out of range"),
        ({"k": 0}, "k=0 out of range"),
        ({"n": 0}, "n=0 out of range"),
        ({"n": 2}, "k=3 out of range"),
        ({"length": 27}, "length 27 out of range"),
        ({"length": 100}, "fragment is 11 bytes, expected 34"),
    ],
)
def test_from_bytes_rejects_bad_header(change: dict[str, int], message: str) -> None:
    data = split(b"abc", 4, 3)[0].to_bytes()
    with pytest.raises(SidaError, match=message):
        Clove.from_bytes(_with_header(data, **change))


def test_from_bytes_rejects_truncated_and_extended() -> None:
    data = split(b"abcdefgh", 4, 3)[0].to_bytes()
    for cut in range(len(data)):
        with pytest.raises(SidaError):
            Clove.from_bytes(data[:cut])
    with pytest.raises(SidaError, match="fragment is 13 bytes, expected 12"):
        Clove.from_bytes(data + b"\0")


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=120))
def test_from_bytes_never_crashes_on_garbage(garbage: bytes) -> None:
    try:
        clove = Clove.from_bytes(garbage)
    except SidaError:
        return
    assert clove.to_bytes() == garbage


def test_clove_constructor_validates() -> None:
    clove = split(b"abc", 4, 3)[0]
    with pytest.raises(SidaError, match="share is 31 bytes"):
        replace(clove, share=clove.share[:31])
    with pytest.raises(SidaError, match="n=256 out of range"):
        replace(clove, n=256)


# --- randomness is injected ------------------------------------------------------------------------------


def test_seeded_rng_is_reproducible() -> None:
    first = split(b"same input", 5, 3, rng=seeded(42))
    assert split(b"same input", 5, 3, rng=seeded(42)) == first
    assert split(b"same input", 5, 3, rng=seeded(43)) != first
    assert [c.to_bytes() for c in first] == [c.to_bytes() for c in split(b"same input", 5, 3, rng=seeded(42))]


def test_rng_draws_key_nonce_then_coefficients() -> None:
    rng = RecordingRng(9)
    split(b"x", 4, 3, rng=rng)
    assert [len(d) for d in rng.draws] == [32, 12, 64]


def test_short_rng_is_refused() -> None:
    with pytest.raises(SidaError, match="rng returned 3 bytes, asked for 32"):
        split(b"x", rng=lambda size: b"abc")


def test_default_rng_gives_fresh_cloves() -> None:
    assert split(b"x", 2, 2) != split(b"x", 2, 2)
