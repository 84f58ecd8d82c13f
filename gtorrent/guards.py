"""Guards: the few relays an asker uses as first hops, kept for weeks (pure; rng and clock injected).

The first hop of a private path is the one relay that sees the asker's address. Drawn afresh for every
ask, sooner or later a malicious relay is some ask's first hop: over many asks the chance of exposure
to a malicious relay (and, with a malicious seed, of being identified) grows to certainty. With a
small set of guards chosen once, that chance is paid once per rotation: either a guard is malicious
(probability 1 - (1 - f)^G for G guards) or, until the set rotates, no first hop ever is. This is Tor's
answer to the same problem (guard-spec), in a simpler form:

- guards are drawn uniformly from the relays that pass the asker's rules now (routing.RelayRules: old
  enough, at a global address, and no two guards in one network unless the swarm is all on one host),
  one per machine, of conflicting records the one seen first;
- a guard is confirmed by the guard itself: before it is added, and on every ask, the asker says
  `hello` to it over CurveZMQ (under the key its record names) and takes the signed record it answers.
  A copy of another relay's endpoint or keys cannot answer as itself, so it never becomes a guard; and
  the guards' identities are never named to a tracker (the guard itself already sees the asker);
- each guard is kept until its rotation time, drawn uniformly in GUARD_ROTATION_S (3 to 6 weeks) when
  it was chosen, so that guards do not all rotate at once;
- a guard that does not answer is kept but unused; once it has not answered for GUARD_GONE_S it has
  left and is replaced. Neither trackers (which may hide it) nor failures (which anyone on a path may
  cause) can push a guard out sooner: otherwise whoever can make guards fail or vanish could push the
  asker to draw again until it draws theirs;
- guards are held in the order chosen, and the first ones usable for an ask are its first hops: the
  set holds `set_size(paths)` = one per path (at least GUARD_COUNT) plus SPARE_GUARDS spares, which
  serve only while earlier guards are unusable (silent, not trusted, or suspects within an ask);
- one set per swarm (`swarm_key`: the trackers an ask uses): an asker that moves to other trackers
  gets a set of that swarm and keeps the old one for when it comes back.

The store (store.py) persists the set; concurrent asks on one home add guards in one transaction.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from .protocol import PeerRecord
from .routing import (
    Aliases,
    RelayRules,
    Seniority,
    candidate_records,
    is_public,
    marks_of,
    network_of,
    one_host,
)

GUARD_COUNT = 4  # as many as a default private ask has paths: each path needs its own first hop
SPARE_GUARDS = 4  # used only while earlier guards are unusable
GUARD_ROTATION_S = (21 * 86400.0, 42 * 86400.0)  # a guard is replaced after 3 to 6 weeks
GUARD_GONE_S = 86400.0  # a guard that has not answered for a day has left


@dataclass(frozen=True)
class Guard:
    """One guard as the store holds it: the record last seen and when it was chosen and rotates."""

    record: PeerRecord
    chosen_at: float
    rotate_at: float
    unreachable_since: float | None = None  # the first of the asks it has not answered since it last did

    @property
    def peer_id(self) -> str:
        return self.record.peer_id


def rotation_time(now: float, rng: random.Random) -> float:
    low, high = GUARD_ROTATION_S
    return now + rng.uniform(low, high)


def expired(guard: Guard, now: float) -> bool:
    """Due for rotation, or gone (silent for GUARD_GONE_S)."""
    gone = guard.unreachable_since is not None and now - guard.unreachable_since >= GUARD_GONE_S
    return now >= guard.rotate_at or gone


def swarm_key(trackers: list[str]) -> str:
    """Which guard set an ask uses: its trackers, in a canonical order."""
    return "\n".join(sorted(set(trackers)))


def set_size(paths: int) -> int:
    """How many guards an asker of `paths` paths holds: one first hop per path (at least GUARD_COUNT)
    plus SPARE_GUARDS."""
    return max(GUARD_COUNT, paths) + SPARE_GUARDS


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
    seniority: Seniority | None = None,
) -> list[PeerRecord]:
    """New guards to add so that `want` are held: a uniform draw from the candidates that pass the rules,
    none of the same machine or (rules permitting) network as a held guard or as one another. Fewer
    when the candidates run out; none when `held` already has `want`."""
    rules = rules or RelayRules()
    need = want - len(held)
    if need <= 0:
        return []
    pool = candidate_records(candidates, target=target, exclude={g.peer_id for g in held}, rng=rng, aliases=aliases,
                             seniority=seniority)
    local = one_host([*pool, *held], aliases)
    distinct = rules.distinct_networks and not local
    if distinct:
        pool = [r for r in pool if is_public(r, aliases)]
    if not local and rules.min_age_s > 0:
        ages = listed_s or {}
        pool = [r for r in pool if ages.get(r.peer_id, 0.0) >= rules.min_age_s]
    taken_marks = set().union(*(marks_of(g, aliases) for g in held)) if held else set()
    taken_networks = {network_of(g, aliases) for g in held}
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


__all__ = [
    "GUARD_COUNT", "GUARD_GONE_S", "SPARE_GUARDS", "Guard", "choose_guards", "expired", "rotation_time", "set_size",
    "swarm_key",
]
