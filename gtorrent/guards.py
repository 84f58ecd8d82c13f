"""Guards: the few relays an asker uses as first hops, kept for weeks (pure; rng and clock injected).

The first hop of a private path is the one relay that sees the asker's address. Drawn afresh for every
ask, sooner or later a malicious relay is some ask's first hop: over many asks the chance of exposure
to a malicious relay (and, with a malicious seed, of being identified) grows to certainty. With a
small set of guards chosen once, that chance is paid once per rotation: either a guard is malicious
(probability 1 - (1 - f)^G for G guards) or, until the set rotates, no first hop ever is. This is Tor's
answer to the same problem (guard-spec), in a simpler form:

- guards are drawn uniformly from the relays that pass the asker's rules now (routing.RelayRules: old
  enough, and no two guards in one network unless the swarm is all on one host), one per machine;
- each guard is kept until its rotation time, drawn uniformly in GUARD_ROTATION_S (3 to 6 weeks) when
  it was chosen, so that guards do not all rotate at once;
- a guard no tracker lists is kept but unused; once unlisted for GUARD_UNLISTED_S it has left and is
  dropped (a relay restarting or a tracker briefly down must not cost the asker its guard);
- guards are held in the order chosen, and the first ones usable for an ask are its first hops: the
  set holds `set_size(paths)` = one per path (at least GUARD_COUNT) plus SPARE_GUARDS spares, which
  serve only while earlier guards are unusable (not listed, not trusted, or suspects within an ask);
- a failing guard is skipped (by reputation, or within the ask) but not replaced: otherwise whoever can
  make guards fail could push the asker to draw again until it draws theirs. Only guards no tracker
  lists are made up for (they cannot serve at all: the relay left, or the asker now uses other
  trackers); the set then keeps at most `held_limit(paths)`, dropping the longest-unlisted first.

The store (store.py) persists the set; concurrent asks on one home add guards in one transaction.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from .protocol import PeerRecord
from .routing import Aliases, RelayRules, candidate_records, marks_of, network_of, one_host

GUARD_COUNT = 4  # as many as a default private ask has paths: each path needs its own first hop
SPARE_GUARDS = 4  # used only while earlier guards are unusable
GUARD_ROTATION_S = (21 * 86400.0, 42 * 86400.0)  # a guard is replaced after 3 to 6 weeks
GUARD_UNLISTED_S = 86400.0  # a guard no tracker has listed for a day has left


@dataclass(frozen=True)
class Guard:
    """One guard as the store holds it: the record last seen and when it was chosen and rotates."""

    record: PeerRecord
    chosen_at: float
    rotate_at: float
    unlisted_since: float | None = None

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


def rotation_time(now: float, rng: random.Random) -> float:
    low, high = GUARD_ROTATION_S
    return now + rng.uniform(low, high)


def expired(guard: Guard, now: float) -> bool:
    """Due for rotation, or gone (unlisted for longer than GUARD_UNLISTED_S)."""
    gone = guard.unlisted_since is not None and now - guard.unlisted_since >= GUARD_UNLISTED_S
    return now >= guard.rotate_at or gone


def set_size(paths: int) -> int:
    """How many guards an asker of `paths` paths holds: one first hop per path (at least GUARD_COUNT)
    plus SPARE_GUARDS."""
    return max(GUARD_COUNT, paths) + SPARE_GUARDS


def held_limit(paths: int) -> int:
    """The most guards held at once, listed or not."""
    return 2 * set_size(paths)


def choose_guards(
    candidates: list[PeerRecord],
    held: list[PeerRecord],
    want: int,
    rng: random.Random,
    *,
    aliases: Aliases | None = None,
    listed_s: Mapping[str, float] | None = None,
    rules: RelayRules | None = None,
    target: PeerRecord | None = None,
) -> list[PeerRecord]:
    """New guards to add so that `want` are held: a uniform draw from the candidates that pass the rules,
    none of the same machine or (rules permitting) network as a held guard or as one another. Fewer
    when the candidates run out; none when `held` already has `want`."""
    rules = rules or RelayRules()
    need = want - len(held)
    if need <= 0:
        return []
    pool = candidate_records(candidates, target=target, exclude={g.peer_id for g in held}, rng=rng, aliases=aliases)
    local = one_host([*pool, *held], aliases)
    if not local and rules.min_age_s > 0:
        ages = listed_s or {}
        pool = [r for r in pool if ages.get(r.peer_id, 0.0) >= rules.min_age_s]
    taken_marks = set().union(*(marks_of(g, aliases) for g in held)) if held else set()
    taken_networks = {network_of(g, aliases) for g in held}
    distinct = rules.distinct_networks and not local
    rng.shuffle(pool)
    chosen: list[PeerRecord] = []
    for record in pool:
        marks = marks_of(record, aliases)
        network = network_of(record, aliases)
        if marks & taken_marks or (distinct and network in taken_networks):
            continue
        chosen.append(record)
        taken_marks |= marks
        taken_networks.add(network)
        if len(chosen) == need:
            break
    return chosen


__all__ = ["GUARD_COUNT", "SPARE_GUARDS", "Guard", "choose_guards", "expired", "held_limit", "rotation_time", "set_size"]
