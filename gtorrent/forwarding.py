"""Where a request that arrived at a seed should be served: the routing policy of a model group (pure).

The entry seed calls `choose` with the request's prompt-prefix digests (runtime.prefix_cache.chunk_hashes)
and what it knows of its group (itself included): each member's prefix summary (its HR-tree), LB factor,
queue and whether it is trusted. The answer is the peer id that should serve, `self_id` meaning "serve
here". No clock, no I/O, no randomness: the same inputs give the same answer (the forwarding benchmark's
simulation imports this module, so the real seeds and the simulation route alike).

Policies (`gtorrent seed --forwarding`):
- `off`: always self.
- `rr`: round robin over the eligible members in peer-id order, by the entry's per-request `turn`.
- `least-load`: the fewest queued/running requests, then the lowest LB factor.
- `tree`: the longest HR-tree match only; among the members matching that deep, the lowest LB factor
  (on a miss every member matches 0 chunks, so the lowest LB factor).
- `tree+lb` (the paper's, shared/research/paper-notes.md §3): on a hit (some member matches > 0 chunks),
  among the members matching deepest the lowest LB factor, unless that factor is above the group's 80th
  percentile, in which case step down one chunk at a time to members sharing a shorter prefix (partial
  cache reuse), and at depth 0 take the lowest LB factor overall; on a miss the lowest LB factor.

Invariants:
- an untrusted member (`trusted=False`, reputation < 0.3 in the entry's view) is never chosen; the entry
  itself is always eligible (serving here is the fallback of every policy, and no hop is needed);
- ties go to the entry itself first (a hop that gains nothing is not taken), then to the smaller peer id,
  so every choice is deterministic;
- the 80th percentile is the nearest-rank one over the eligible members' LB factors that have a sample
  (a factor of 0 means "no request served yet", as in the paper's code); with fewer than two such
  factors no member counts as overloaded.

Load-aware factor (a deliberate departure from the paper's scheduler, which sees every node's pending
count the moment it changes): members learn each other's state once a second, and on the demo model a
second spans tens to hundreds of requests. Ranking by the latency EWMA alone sends all of them to the same
member until its next state arrives (the forwarding benchmark's simulation measured least-load at 27x
round robin's mean that way). So members are ranked by `factor` = LB factor x (1 + queue), the expected
wait of one more request there (the artifact's per-node variant multiplies by its queue in batches the
same way), and the 80th-percentile rule applies to that factor. A member with no latency sample yet
takes the mean of the others' (1 s when nobody has one), so an idle newcomer is not a free-for-all.
The caller keeps `queue` live: the seed's own waiting + running, and for each other member its last
reported queue plus the requests this entry forwarded to it since that report (group.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: importing gtorrent.runtime loads ONNX Runtime, and the CLI imports this
    from .runtime.prefix_cache import PrefixSummary

POLICIES = ("off", "rr", "least-load", "tree", "tree+lb")
DEFAULT_POLICY = "tree+lb"
LB_WEIGHT = 1 / 8  # the paper's EWMA weight of the latest latency (its "last 8" window)
PERCENTILE = 0.8  # above the group's 80th percentile of LB factors a hit member counts as overloaded


class LbFactor:
    """The paper's LB factor: an EWMA, weight 1/8, of a seed's end-to-end request latencies in seconds.
    The first sample is taken as it is; 0 until then ("no data", never counted as overloaded)."""

    def __init__(self) -> None:
        self.value = 0.0
        self.samples = 0

    def add(self, latency_s: float) -> None:
        if not math.isfinite(latency_s):
            return
        latency_s = max(0.0, float(latency_s))
        self.value = latency_s if self.samples == 0 else (1 - LB_WEIGHT) * self.value + LB_WEIGHT * latency_s
        self.samples += 1


@dataclass(frozen=True)
class Member:
    """One seed of the group as the entry sees it (the entry itself included)."""

    peer_id: str
    summary: PrefixSummary  # its HR-tree, as its last group_state gave it
    lb: float  # its LB factor in seconds (0: no request served yet)
    queue: int  # requests waiting or running there
    trusted: bool = True  # False: untrusted in the entry's verdict view (never a target)


def _eligible(members: Sequence[Member], self_id: str) -> list[Member]:
    return [m for m in members if m.trusted or m.peer_id == self_id]


def factors(members: Sequence[Member]) -> dict[str, float]:
    """Each member's load-aware factor, LB factor x (1 + queue) (module doc); a member without a latency
    sample takes the mean of the others' (1 s when none has one)."""
    sampled = [m.lb for m in members if m.lb > 0]
    default = sum(sampled) / len(sampled) if sampled else 1.0
    return {m.peer_id: (m.lb if m.lb > 0 else default) * (1 + max(m.queue, 0)) for m in members}


def _best(candidates: Sequence[Member], factor: dict[str, float], self_id: str) -> Member:
    """The lowest factor; ties to self, then the smaller peer id."""
    return min(candidates, key=lambda m: (factor[m.peer_id], m.peer_id != self_id, m.peer_id))


def percentile_lb(members: Sequence[Member]) -> float | None:
    """The nearest-rank 80th percentile of the members' factors (None while fewer than two members have a
    latency sample: nobody counts as overloaded yet)."""
    if sum(1 for m in members if m.lb > 0) < 2:
        return None
    ranked = sorted(factors(members).values())
    return ranked[max(math.ceil(PERCENTILE * len(ranked)) - 1, 0)]


def choose(policy: str, digests: Sequence[bytes], members: Sequence[Member], self_id: str, *, turn: int) -> str:
    """The peer id that should serve a request with these prefix digests (`self_id`: serve here)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown forwarding policy {policy!r} (one of {', '.join(POLICIES)})")
    candidates = _eligible(members, self_id)
    if policy == "off" or not candidates:
        return self_id
    if policy == "rr":
        ordered = sorted(candidates, key=lambda m: m.peer_id)
        return ordered[turn % len(ordered)].peer_id
    if policy == "least-load":
        return min(candidates, key=lambda m: (m.queue, m.lb, m.peer_id != self_id, m.peer_id)).peer_id
    factor = factors(candidates)
    depths = {m.peer_id: m.summary.longest_match(digests) for m in candidates}
    deepest = max(depths.values())
    if policy == "tree":
        return _best([m for m in candidates if depths[m.peer_id] == deepest], factor, self_id).peer_id
    # tree+lb
    cutoff = percentile_lb(candidates)
    for depth in range(deepest, 0, -1):
        best = _best([m for m in candidates if depths[m.peer_id] >= depth], factor, self_id)
        if cutoff is None or factor[best.peer_id] <= cutoff:
            return best.peer_id
    return _best(candidates, factor, self_id).peer_id
