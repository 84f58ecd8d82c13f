"""Onion key rotation (pure: the clock and the key generator are injected).

A relay (every seed relays too) answers CREATEs with the private half of the onion key its signed
record announces. The ntor handshake (onion.py) already gives forward secrecy: the hop's ephemeral
key is forgotten once the circuit's keys are derived, so a stolen onion key does not open recorded
circuits. Rotation bounds the other use of a stolen onion key: answering CREATEs as that hop
(impersonating it to askers who still hold its record). A key is announced for `LIFETIME_S`, then
retired; a retired key is still honoured for `GRACE_S`, so askers holding a record signed before the
rotation still build circuits, and then it is dropped for good.

Invariants: onion private keys live only in this object's memory (never written to disk, never
derived from the identity file); at most one key is current; a key is honoured exactly while it is
current or within `GRACE_S` of its retirement; a CREATE names the public key it was made for, so the
hop never has to guess.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# One hour: long enough that rotation costs nothing noticeable (one extra announce an hour, and a
# record is re-announced every 30 s anyway), short enough that a key taken from a running relay lets
# an attacker impersonate it for at most an hour plus the grace period. Records live 90 s, so unlike
# Tor (weekly keys, consensus distribution) nothing forces a longer lifetime.
LIFETIME_S = 3600.0
# A retired key must outlive every record that still names it: a record lives RECORD_TTL_S = 90 s on
# trackers and in askers' hands, an asker whose clock is behind keeps using it up to CLOCK_SKEW_S = 60 s
# longer (relay.py refuses CREATEs outside that skew too), plus 30 s for an announce that did not reach
# every tracker at once and for a path being built while the rotation happens.
GRACE_S = 90.0 + 60.0 + 30.0


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class _Key:
    private: X25519PrivateKey
    public: bytes
    created: float  # clock time it became current
    retired: float | None = None  # clock time it stopped being current


class OnionKeyRing:
    """The current onion key and the retired ones still within their grace period."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        lifetime_s: float = LIFETIME_S,
        grace_s: float = GRACE_S,
        generate: Callable[[], X25519PrivateKey] = X25519PrivateKey.generate,
    ) -> None:
        if lifetime_s <= 0 or grace_s < 0:
            raise ValueError("lifetime must be positive and grace not negative")
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.grace_s = grace_s
        self.generate = generate
        self.rotations = 0
        self._current = self._new(clock())
        self._retired: list[_Key] = []

    def _new(self, now: float) -> _Key:
        private = self.generate()
        return _Key(private, public_bytes(private), now)

    @property
    def current_public(self) -> bytes:
        """The public key to announce now (a due rotation happens first)."""
        self.rotate_if_due()
        return self._current.public

    def rotate_if_due(self) -> bool:
        """Retire the current key once its lifetime is over; True when that happened (re-announce)."""
        now = self.clock()
        self._forget(now)
        if now < self._current.created + self.lifetime_s:
            return False
        self.rotate(now)
        return True

    def rotate(self, now: float | None = None) -> None:
        """Retire the current key at once (also on demand, e.g. after a suspected compromise)."""
        now = self.clock() if now is None else now
        old = self._current
        self._retired.append(_Key(old.private, old.public, old.created, now))
        self._current = self._new(now)
        self.rotations += 1
        self._forget(now)

    def private_for(self, public: bytes) -> X25519PrivateKey | None:
        """The private key of `public` if it is current or retired less than GRACE_S ago, else None."""
        now = self.clock()
        self._forget(now)
        if public == self._current.public:
            return self._current.private
        for key in self._retired:
            if key.public == public:
                return key.private
        return None

    def honoured(self) -> list[bytes]:
        """Public keys a CREATE may name right now, current first."""
        self._forget(self.clock())
        return [self._current.public, *(key.public for key in reversed(self._retired))]

    def _forget(self, now: float) -> None:
        # drop retired keys past their grace: the last reference to the private key goes with them
        self._retired = [key for key in self._retired if key.retired is not None and now < key.retired + self.grace_s]
