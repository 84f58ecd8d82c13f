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

Sybil friction (`RelayRules`, in the manner of Tor's relay flags; what each buys is in THREAT_MODEL.md):

- a relay is drawn only once it has been continuously listed for `min_age_s` (the trackers measure it:
  discovery.Discovery.listed_s); an age nobody reported counts as 0;
- no two relays of one path, nor a relay and the seed, share a network (an IPv4 /16 or an IPv6 /32;
  `network_of`), so one address block buys at most one hop of a path;
- and, with that rule, only relays at global addresses: a loopback, private or link-local address
  leads to a different machine from every hop (often the hop's own), so one machine could announce
  itself under several such addresses and fill a path; relays refuse such EXTENDs too (relay.py);
- all of these are lifted when the whole swarm is on one host (every relay and the seed on loopback):
  loopback endpoints reach only processes of the asker's own machine, where every address is one
  network; `--allow-same-network` lifts the network rules for a swarm on one LAN.

Guards: given `guards` (guards.py), every path's first hop is one of them, so repeated asks do not keep
redrawing the relay that sees the asker. They are taken in the order given (the asker's preference);
one that breaks a rule for this ask (it is the seed, shares its network, is excluded) is skipped;
guards not used as first hops may be middle hops.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .errors import GtorrentError
from .protocol import PeerRecord

DEFAULT_MIN_HOPS = 2  # below this one relay sees both the asker and the seed
ONE_HOP_HINT = "pass --allow-one-hop to accept one-hop paths (one relay then sees both you and the seed)"
DEFAULT_MIN_RELAY_AGE_S = 1800.0  # a new identity waits this long before it carries private asks
LOOPBACK = "loopback"
NAMED = "names"  # every host name: one network among them (network_of)


@dataclass(frozen=True)
class RelayRules:
    """The Sybil-friction rules of one asker (see the module docstring)."""

    min_age_s: float = DEFAULT_MIN_RELAY_AGE_S
    distinct_networks: bool = True  # --allow-same-network turns it off (a swarm on one LAN)


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


@functools.lru_cache(maxsize=1 << 16)  # pure, and called per record per plan
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


NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: an IPv4 address in the last 32 bits


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a host literal names, with an IPv4 address carried inside an IPv6 one unwrapped
    (IPv4-mapped, 6to4, Teredo, NAT64): the same machine must not pass for two networks."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]  # the client's address
        if address in NAT64_PREFIX:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@functools.lru_cache(maxsize=1 << 16)
def _network_of_host(host: str) -> str | None:
    address = _address(host)
    if address is None:
        return None
    if address.is_loopback or address.is_unspecified:
        return LOOPBACK
    prefix = 16 if address.version == 4 else 32
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def network_of(record: PeerRecord, aliases: Aliases | None = None) -> str:
    """The network a record's endpoint is in: its IPv4 /16 or IPv6 /32, or `loopback`. Every host name is
    in NAMED: which address a name leads to is decided by whoever resolves it when connecting (the
    previous hop, at EXTEND time), not by the asker's own lookup, so a name's owner could show the asker
    one network and the hop another (split-horizon DNS, rebinding). Named relays: one per path."""
    host = normalise_endpoint(record.endpoint).rpartition(":")[0]
    if host == LOOPBACK:
        return LOOPBACK
    network = _network_of_host(host)
    return network if network is not None else NAMED


@functools.lru_cache(maxsize=1 << 16)
def public_host(host: str) -> bool | None:
    """Whether an IP literal is a global address (an IPv4 one inside IPv6 unwrapped); None for a name."""
    address = _address(host.strip("[]"))
    return None if address is None else address.is_global


def is_public(record: PeerRecord, aliases: Aliases | None = None) -> bool:
    """True when the record's endpoint is a global address (or a host name whose every resolved address
    is): loopback, private, link-local, shared and reserved addresses lead somewhere else on every
    machine, so outside a swarm on one host or one LAN they may be any machine's own (or its LAN's)."""
    endpoint = normalise_endpoint(record.endpoint)
    host = endpoint.rpartition(":")[0]
    if host == LOOPBACK:
        return False
    public = public_host(host)
    if public is not None:
        return public
    resolved = (aliases or {}).get(endpoint, frozenset())
    return all(public_host(alias.rpartition(":")[0]) for alias in resolved)


def one_host(records: list[PeerRecord], aliases: Aliases | None = None) -> bool:
    """True when every record is on loopback: a swarm on the asker's own machine."""
    return all(network_of(r, aliases) == LOOPBACK for r in records)


def marks_of(record: PeerRecord, aliases: Aliases | None = None) -> set[tuple[str, object]]:
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
    barred = marks_of(target, aliases) if target is not None else set()
    eligible = [
        r for r in unique
        if r.peer_id not in exclude and (target is None or r.peer_id != target.peer_id) and not marks_of(r, aliases) & barred
    ]
    order = sorted(eligible, key=lambda r: r.peer_id)  # rng alone breaks ties, whatever the input order
    rng.shuffle(order)
    if seniority is not None:
        order.sort(key=seniority)  # stable: the shuffle breaks ties
    kept: list[PeerRecord] = []
    taken: set[tuple[str, object]] = set()
    for record in order:
        marks = marks_of(record, aliases)
        if marks & taken:
            continue  # a machine already kept (or a copy of it): one record per machine
        kept.append(record)
        taken |= marks
    return kept


def _capacity(pool: list[PeerRecord], hops: int, network: Callable[[PeerRecord], str]) -> int:
    """How many paths of `hops` relays, no two of a path in one network, the pool can fill: the largest
    P with sum over networks of min(relays in it, P) >= P * hops (each network gives a path one relay)."""
    if hops <= 0:
        return len(pool) + 1_000_000  # nothing to fill
    counts = Counter(network(r) for r in pool)
    low, high = 0, len(pool) // hops
    while low < high:
        mid = (low + high + 1) // 2
        if sum(min(c, mid) for c in counts.values()) >= mid * hops:
            low = mid
        else:
            high = mid - 1
    return low


def _deal(pool: list[PeerRecord], paths: int, hops: int, rng: random.Random,
          network: Callable[[PeerRecord], str]) -> list[list[PeerRecord]]:
    """`paths` groups of `hops` relays, no two of a group in one network (needs _capacity >= paths).

    A uniform draw of paths*hops relays with at most `paths` from any network, laid out network by
    network (networks in random order) and dealt round-robin: the relays of one network sit in a run of
    at most `paths`, so they land in different groups. Each group's order is then shuffled."""
    if hops == 0:
        return [[] for _ in range(paths)]
    order = list(pool)
    rng.shuffle(order)
    taken: dict[str, list[PeerRecord]] = {}
    count = 0
    for record in order:
        group = taken.setdefault(network(record), [])
        if len(group) < paths:
            group.append(record)
            count += 1
            if count == paths * hops:
                break
    blocks = list(taken.values())
    rng.shuffle(blocks)
    laid = [record for block in blocks for record in block]
    groups = [laid[i::paths] for i in range(paths)]
    for group in groups:
        rng.shuffle(group)
    return groups


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
    guards: list[PeerRecord] | None = None,
    listed_s: Mapping[str, float] | None = None,
    rules: RelayRules | None = None,
) -> PathPlan:
    rules = rules or RelayRules()
    if not 1 <= k <= paths or hops < 1:
        raise PrivacyError(f"--paths {paths} / --hops {hops} with k={k}: need 1 <= k <= paths and hops >= 1")
    if hops < min_hops:
        raise PrivacyError(f"paths of {hops} hop(s) are below the floor of {min_hops}", hint=ONE_HOP_HINT)
    if guards is not None:  # confirmed by the guards themselves: they win every conflict with a copy
        confirmed, before = {g.peer_id for g in guards}, seniority

        def seniority(record: PeerRecord) -> float:
            if record.peer_id in confirmed:
                return float("-inf")
            return before(record) if before is not None else 0.0

    nodes = candidate_records(relays, target=target, exclude=exclude, rng=rng, seniority=seniority, aliases=aliases)
    local = one_host([*nodes, *([target] if target is not None else [])], aliases)
    why: list[str] = []  # what, besides their number, limits the relays (for the error)
    hints: list[str] = []
    distinct = rules.distinct_networks and not local
    if distinct:  # a swarm spread over networks: an address that is not global may be anyone's own
        hidden = [r for r in nodes if not is_public(r, aliases)]
        if hidden:
            nodes = [r for r in nodes if is_public(r, aliases)]
            why.append(f"{len(hidden)} more at loopback or private addresses")
    guard_ids = {g.peer_id for g in guards or []}
    if not local and rules.min_age_s > 0:
        # guards passed the age rule when they were chosen (guards.py); they are confirmed by the
        # guards themselves, not listed, so they have no listing age here
        ages = listed_s or {}
        young = [r for r in nodes if r.peer_id not in guard_ids and ages.get(r.peer_id, 0.0) < rules.min_age_s]
        if young:
            held = {r.peer_id for r in young}
            nodes = [r for r in nodes if r.peer_id not in held]
            why.append(f"{len(young)} more listed for less than {rules.min_age_s:g} s")
            hints.append("new relays are used once listed for a while; --min-relay-age SECONDS lowers the wait")

    networks: dict[str, str] = {}

    def network(record: PeerRecord) -> str:
        if not distinct:
            return record.peer_id  # rule off: each relay its own network
        known = networks.get(record.peer_id)
        if known is None:
            known = networks[record.peer_id] = network_of(record, aliases)
        return known

    if distinct and target is not None:
        barred = network_of(target, aliases)
        near = [r for r in nodes if network(r) == barred]
        if near:
            nodes = [r for r in nodes if network(r) != barred]
            why.append(f"{len(near)} more in the seed's network")
    if distinct:
        why.append(f"no two relays of a path may share a network ({len(set(map(network, nodes)))} networks)")
        hints.append("on a LAN, --allow-same-network lets a path use relays of one network")
    firsts: list[PeerRecord] | None = None
    if guards is not None:
        by_id = {r.peer_id: r for r in nodes}
        # in the asker's order of preference (guards.py: spares serve only when earlier ones cannot)
        firsts = [by_id[pid] for pid in dict.fromkeys(g.peer_id for g in guards) if pid in by_id]
        why.append(f"first hops come from your {len(firsts)} usable guards")
    available = len(nodes)

    def draw(count: int, length: int) -> list[list[PeerRecord]] | None:
        """`count` paths of `length` hops, or None when they do not fit."""
        if firsts is None:
            if _capacity(nodes, length, network) < count:
                return None
            return _deal(nodes, count, length, rng, network)
        if len(firsts) < count:
            return None
        chosen = firsts[:count]
        blocked = {network(g) for g in chosen}
        used = {g.peer_id for g in chosen}
        pool = [r for r in nodes if r.peer_id not in used and network(r) not in blocked]
        if _capacity(pool, length - 1, network) < count:
            return None
        return [[guard, *rest] for guard, rest in zip(chosen, _deal(pool, count, length - 1, rng, network), strict=True)]

    def refused(message: str, hint: str) -> PrivacyError:
        detail = f" ({'; '.join(why)})" if why else ""
        return PrivacyError(message + detail, hint="; ".join([hint, *hints]))

    routes = draw(paths, hops)
    use_k = k
    if routes is None and strict:
        raise refused(
            f"{paths} disjoint paths of {hops} relays need {paths * hops} relays; {available} are available",
            "start more relays (`gtorrent relay`), or drop --strict to accept fewer paths or hops",
        )
    if routes is None:
        routes = next((r for count in range(paths - 1, k - 1, -1) if (r := draw(count, hops)) is not None), None)
    if routes is None:
        routes = next((r for length in range(hops - 1, max(min_hops, 1) - 1, -1) if (r := draw(k, length)) is not None), None)
    if routes is None and min_hops <= 1:
        routes = next((r for count in range(k - 1, 0, -1) if (r := draw(count, 1)) is not None), None)
        use_k = len(routes) if routes is not None else k
    if routes is None:
        if available == 0:
            raise refused("no relay is available for a private ask", "start relays (`gtorrent relay`)")
        raise refused(
            f"{k} disjoint paths of at least {min_hops} relays need {k * min_hops} relays; {available} are available",
            f"start more relays (`gtorrent relay`), or {ONE_HOP_HINT}",
        )
    return PathPlan(routes, use_k, paths, hops)
