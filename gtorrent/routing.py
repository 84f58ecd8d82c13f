"""Choosing paths for private asks (pure; the random generator is injected).

A plan is n node-disjoint paths of L relays each, drawn at random from the relays the asker trusts,
never through the target seed. With too few relays it degrades explicitly and says so: first fewer
paths (while at least k remain, so the S-IDA threshold still holds), then shorter paths over k paths,
but never shorter than `min_hops` (the floor, 2 unless the asker allows one-hop paths). Only with the
floor at 1 may k be lowered, to as many one-hop paths as there are relays. `strict` refuses instead
of degrading.

Invariants:

- "Node" means the machine behind a record, not its peer id: a record may copy another peer's
  endpoint, CurveZMQ key or onion key under a fresh signing key (a Sybil copy). Two records that share
  an endpoint (host case and IP spelling normalised), a curve key or an onion key conflict: a plan
  never holds both, so disjointness is counted in machines.
- Every record that shares any of these with the target seed (or is the seed) is never on a plan:
  otherwise the seed would relay its own circuits and learn the asker. Only a direct share counts.
  Conflicts are not followed transitively: "glue" records that each share one mark with two others
  would otherwise chain honest relays to the seed and exclude them all, leaving the attacker's own
  relays as the only candidates with nothing degraded.
- A copy never works as a hop: the CurveZMQ handshake needs the copied curve key's secret, and the
  ntor AUTH binds the hop's signing key and onion key. So among conflicting records the one seen
  first (`seniority`, e.g. the asker's first sighting) is kept, ties broken at random; copies made
  later lose to the genuine record in a store that saw it first.
- Which machines go on a plan is a uniform draw from the kept records: seniority only settles
  conflicts, it never makes a record likelier to be drawn.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Mapping
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
    """`tcp://HOST:PORT` as one spelling per address: host lowercased, IPs in canonical form, and every
    loopback or unspecified address as `loopback` (on the asker's machine 127.0.0.2, ::1 and 0.0.0.0
    all reach a socket bound to every interface)."""
    rest = endpoint.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]").lower().rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            host = "loopback"
        # else a host name: only what the asker resolved it to (`aliases`) can tie it to an address
    else:
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        address = mapped or address
        host = "loopback" if address.is_loopback or address.is_unspecified else address.compressed
    try:
        port = str(int(port))
    except ValueError:
        pass
    return f"{host}:{port}"


Aliases = Mapping[str, frozenset[str]]  # normalised endpoint -> the normalised IP:port it resolved to


def host_of(endpoint: str) -> str | None:
    """The host name of a `tcp://` endpoint when it is a name, not an IP literal (what needs resolving)."""
    host = endpoint.split("://", 1)[-1].rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".") or None
    return None


def _marks(record: PeerRecord, aliases: Aliases | None = None) -> set[tuple[str, object]]:
    """What two records of one machine share: an endpoint (under any name it resolved to), keys."""
    endpoint = normalise_endpoint(record.endpoint)
    marks: set[tuple[str, object]] = {("endpoint", endpoint), ("curve", record.curve_key), ("onion", record.onion_key)}
    for alias in (aliases or {}).get(endpoint, frozenset()):
        marks.add(("endpoint", alias))
    return marks


Seniority = Callable[[PeerRecord], float]  # smaller: seen earlier


def candidate_records(
    relays: list[PeerRecord],
    *,
    target: PeerRecord | None,
    exclude: set[str],
    rng: random.Random,
    seniority: Seniority | None = None,
    aliases: Aliases | None = None,
) -> list[PeerRecord]:
    """The records a plan may draw from, pairwise free of conflicts: never the target's or one sharing
    a mark with it, never an excluded peer id; of conflicting records the senior one (ties: random)."""
    unique = list({r.peer_id: r for r in relays}.values())
    barred = _marks(target, aliases) if target is not None else set()
    eligible = [
        r for r in unique
        if r.peer_id not in exclude and (target is None or r.peer_id != target.peer_id) and not _marks(r, aliases) & barred
    ]
    order = sorted(eligible, key=lambda r: r.peer_id)  # rng alone breaks ties, whatever the input order
    rng.shuffle(order)
    if seniority is not None:
        order.sort(key=seniority)  # stable: the shuffle breaks ties
    kept: list[PeerRecord] = []
    taken: set[tuple[str, object]] = set()
    for record in order:
        marks = _marks(record, aliases)
        if marks & taken:
            continue  # a machine already kept (or a copy of it): one record per machine
        kept.append(record)
        taken |= marks
    return kept


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
    seniority: Seniority | None = None,
    aliases: Aliases | None = None,
) -> PathPlan:
    if not 1 <= k <= paths or hops < 1:
        raise PrivacyError(f"--paths {paths} / --hops {hops} with k={k}: need 1 <= k <= paths and hops >= 1")
    if hops < min_hops:
        raise PrivacyError(f"paths of {hops} hop(s) are below the floor of {min_hops}", hint=ONE_HOP_HINT)
    nodes = candidate_records(relays, target=target, exclude=exclude, rng=rng, seniority=seniority, aliases=aliases)
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
    picked = rng.sample(nodes, use_paths * use_hops)
    routes = [picked[i * use_hops : (i + 1) * use_hops] for i in range(use_paths)]
    return PathPlan(routes, use_k, paths, hops)
