"""Choosing paths for private asks (pure; the random generator is injected).

A plan is n node-disjoint paths of L relays each, drawn at random from the relays the asker trusts,
never through the target seed. With too few relays it degrades explicitly and says so: first fewer
paths (while at least k remain, so the S-IDA threshold still holds), then shorter paths over k paths,
but never shorter than `min_hops` (the floor, 2 unless the asker allows one-hop paths). Only with the
floor at 1 may k be lowered, to as many one-hop paths as there are relays. `strict` refuses instead
of degrading.

Invariants:

- "Node" means the machine behind a record, not its peer id: a record may copy another peer's
  endpoint, CurveZMQ key or onion key under a fresh signing key (a Sybil copy). Records sharing an
  endpoint (host case and IP spelling normalised), a curve key or an onion key are one node (grouped
  transitively); a plan holds at most one record of a node, so disjointness is counted in nodes.
- The target seed's node, and every group that touches it in peer id, endpoint, curve key or onion
  key, is never on a plan: otherwise the seed would relay its own circuits and learn the asker.
- An excluded peer id (a suspect, a relay already in use) excludes its whole node.

Which record of a node is used is drawn at random: they all lead to the same machine (a hop's
CurveZMQ handshake and onion-key proof only succeed with that machine's keys).
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from .errors import GtorrentError
from .protocol import PeerRecord

DEFAULT_MIN_HOPS = 2  # below this one relay sees both the asker and the seed
ONE_HOP_HINT = "pass --allow-one-hop to accept one-hop paths (one relay then sees both you and the seed)"


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


def normalise_endpoint(endpoint: str) -> str:
    """`tcp://HOST:PORT` as one spelling per address: host lowercased, IPs in canonical form."""
    rest = endpoint.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]").lower().rstrip(".")
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass  # a host name: case is all that can be normalised without resolving it
    try:
        port = str(int(port))
    except ValueError:
        pass
    return f"{host}:{port}"


def _marks(record: PeerRecord) -> list[tuple[str, object]]:
    """What makes two records the same node."""
    return [
        ("id", record.peer_id),
        ("endpoint", normalise_endpoint(record.endpoint)),
        ("curve", record.curve_key),
        ("onion", record.onion_key),
    ]


def group_nodes(records: list[PeerRecord]) -> list[list[PeerRecord]]:
    """Records partitioned into nodes: transitively, those sharing any mark are one (union-find)."""
    parent = list(range(len(records)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    owner: dict[tuple[str, object], int] = {}
    for index, record in enumerate(records):
        for mark in _marks(record):
            other = owner.setdefault(mark, index)
            if other != index:
                parent[root(index)] = root(other)
    groups: dict[int, list[PeerRecord]] = {}
    for index, record in enumerate(records):
        groups.setdefault(root(index), []).append(record)
    return list(groups.values())


def candidate_nodes(relays: list[PeerRecord], *, target: PeerRecord | None, exclude: set[str]) -> list[list[PeerRecord]]:
    """The nodes a plan may use: never the target's, never one holding an excluded peer id."""
    unique = list({r.peer_id: r for r in relays}.values())
    if target is not None:
        unique = [r for r in unique if r.peer_id != target.peer_id] + [target]
    nodes = []
    for group in group_nodes(unique):
        ids = {r.peer_id for r in group}
        if ids & exclude or (target is not None and target.peer_id in ids):
            continue
        nodes.append(sorted(group, key=lambda r: r.peer_id))
    nodes.sort(key=lambda group: group[0].peer_id)  # the draw alone decides the order
    return nodes


def plan_paths(
    relays: list[PeerRecord],
    *,
    exclude: set[str],
    paths: int,
    hops: int,
    k: int,
    strict: bool,
    rng: random.Random,
    target: PeerRecord | None = None,
    min_hops: int = DEFAULT_MIN_HOPS,
) -> PathPlan:
    if not 1 <= k <= paths or hops < 1:
        raise PrivacyError(f"--paths {paths} / --hops {hops} with k={k}: need 1 <= k <= paths and hops >= 1")
    if hops < min_hops:
        raise PrivacyError(f"paths of {hops} hop(s) are below the floor of {min_hops}", hint=ONE_HOP_HINT)
    nodes = candidate_nodes(relays, target=target, exclude=exclude)
    available = len(nodes)
    if available >= paths * hops:
        use_paths, use_hops, use_k = paths, hops, k
    elif strict:
        raise PrivacyError(
            f"{paths} disjoint paths of {hops} relays need {paths * hops} relays; {available} are available",
            hint="start more relays (`gtorrent relay`), or drop --strict to accept fewer paths or hops",
        )
    elif available // hops >= k:
        use_paths, use_hops, use_k = available // hops, hops, k
    elif available // k >= max(min_hops, 1):
        use_paths, use_hops, use_k = k, available // k, k
    elif min_hops <= 1 and available > 0:
        use_paths, use_hops, use_k = available, 1, available
    elif available == 0:
        raise PrivacyError("no relay is available for a private ask")
    else:
        raise PrivacyError(
            f"{k} disjoint paths of at least {min_hops} relays need {k * min_hops} relays; {available} are available",
            hint=f"start more relays (`gtorrent relay`), or {ONE_HOP_HINT}",
        )
    chosen = rng.sample(nodes, use_paths * use_hops)
    picked = [rng.choice(node) for node in chosen]
    routes = [picked[i * use_hops : (i + 1) * use_hops] for i in range(use_paths)]
    return PathPlan(routes, use_k, paths, hops)
