"""Choosing paths for private asks (pure; the random generator is injected).

A plan is n node-disjoint paths of L relays each, drawn at random from the relays the asker trusts,
never through the target seed. With too few relays it degrades explicitly and says so: first fewer
paths (while at least k remain, so the S-IDA threshold still holds), then shorter paths over k paths,
then (with fewer than k relays) as many one-hop paths as there are relays with k lowered to match.
`strict` refuses instead of degrading.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import GtorrentError
from .protocol import PeerRecord


class PrivacyError(GtorrentError):
    default_hint = "start more relays (`gtorrent relay`), lower --paths/--hops, or use --direct"


@dataclass(frozen=True)
class PathPlan:
    paths: list[list[PeerRecord]]
    k: int
    wanted_paths: int
    wanted_hops: int

    @property
    def hops(self) -> int:
        return len(self.paths[0]) if self.paths else 0

    @property
    def degraded(self) -> bool:
        return len(self.paths) < self.wanted_paths or self.hops < self.wanted_hops

    def describe(self) -> dict[str, object]:
        return {"paths": len(self.paths), "hops": self.hops, "k": self.k, "degraded": self.degraded}


def plan_paths(
    relays: list[PeerRecord],
    *,
    exclude: set[str],
    paths: int,
    hops: int,
    k: int,
    strict: bool,
    rng: random.Random,
) -> PathPlan:
    if not 1 <= k <= paths or hops < 1:
        raise PrivacyError(f"--paths {paths} / --hops {hops} with k={k}: need 1 <= k <= paths and hops >= 1")
    unique = {r.peer_id: r for r in relays if r.peer_id not in exclude}
    candidates = sorted(unique.values(), key=lambda r: r.peer_id)
    available = len(candidates)
    if available >= paths * hops:
        use_paths, use_hops, use_k = paths, hops, k
    elif strict:
        raise PrivacyError(
            f"{paths} disjoint paths of {hops} relays need {paths * hops} relays; {available} are available",
            hint="start more relays (`gtorrent relay`), or drop --strict to accept fewer paths or hops",
        )
    elif available // hops >= k:
        use_paths, use_hops, use_k = available // hops, hops, k
    elif available >= k:
        use_paths, use_hops, use_k = k, available // k, k
    elif available > 0:
        use_paths, use_hops, use_k = available, 1, available
    else:
        raise PrivacyError("no relay is available for a private ask")
    chosen = rng.sample(candidates, use_paths * use_hops)
    routes = [chosen[i * use_hops : (i + 1) * use_hops] for i in range(use_paths)]
    return PathPlan(routes, use_k, paths, hops)
