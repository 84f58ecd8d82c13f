"""Path planning (pure, table-driven): Sybil copies of a peer's endpoint or keys are the same node,
the target seed's node is never on a plan, and the hop floor holds."""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import replace

import pytest

from gtorrent.identity import Identity
from gtorrent.protocol import RECORD_LABEL, PeerRecord, canonical
from gtorrent.routing import PrivacyError, RelayRules, candidate_records, normalise_endpoint, plan_paths

NO_FRICTION = RelayRules(min_age_s=0, distinct_networks=False)  # loopback relays with a remote seed


def relay(port: int, roles: tuple[str, ...] = ("relay",)) -> PeerRecord:
    return PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{port}", roles=roles, seq=1,
                           expires=time.time() + 60)


def copy_of(victim: PeerRecord, *, endpoint: str | None = None, curve: bool = False, onion: bool = False,
            port: int = 0) -> PeerRecord:
    """A valid record under a fresh identity that claims some of `victim`'s endpoint and keys."""
    identity = Identity.generate()
    own = relay(port or 40000 + secrets.randbelow(20000))
    record = replace(
        own,
        endpoint=endpoint if endpoint is not None else own.endpoint,
        curve_key=victim.curve_key if curve else own.curve_key,
        onion_key=victim.onion_key if onion else own.onion_key,
        signing_key=identity.signing_public,
        peer_id=identity.peer_id,
    )
    signed = replace(record, signature=identity.sign(RECORD_LABEL + canonical(record.unsigned_wire())))
    return PeerRecord.from_wire(signed.to_wire())  # a record any tracker would verify and hand out


def sybils_of(victim: PeerRecord, count: int) -> list[PeerRecord]:
    """Copies of every kind: the endpoint (in other spellings too), the curve key, the onion key, mixes."""
    upper = victim.endpoint.upper().replace("TCP://", "tcp://")
    kinds = [
        {"endpoint": victim.endpoint},
        {"endpoint": upper},
        {"curve": True},
        {"onion": True},
        {"endpoint": victim.endpoint, "curve": True, "onion": True},
        {"curve": True, "onion": True},
    ]
    return [copy_of(victim, **kinds[i % len(kinds)], port=30000 + i) for i in range(count)]  # type: ignore[arg-type]


def node_marks(record: PeerRecord) -> set[object]:
    return {normalise_endpoint(record.endpoint), record.curve_key, record.onion_key}


def test_thirty_copies_of_the_seed_never_reach_a_plan() -> None:
    seed = relay(9000, ("relay", "seed"))
    honest = [relay(10000 + i) for i in range(14)]
    copies = sybils_of(seed, 30)
    pool = [*copies, *honest, seed]
    marks = node_marks(seed)
    for draw in range(300):
        plan = plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=False,
                          rng=random.Random(draw))
        used = [r for path in plan.paths for r in path]
        assert all(r.peer_id in {h.peer_id for h in honest} for r in used), "a copy of the seed is on a plan"
        assert all(not node_marks(r) & marks for r in used)
        assert plan.describe() == {"paths": 4, "hops": 3, "k": 3, "degraded": False}


def test_a_copy_of_a_copy_is_not_the_seed() -> None:
    """Only a direct share bars a record: a copy of a copy shares nothing with the seed, so it cannot
    reach the seed's machine as a working hop (the handshake needs the seed's own keys)."""
    seed = relay(9000, ("relay", "seed"))
    first = copy_of(seed, onion=True, port=31000)  # shares the seed's onion key only
    second = copy_of(first, endpoint=first.endpoint)  # shares nothing with the seed, but first's endpoint
    honest = [relay(10000 + i) for i in range(12)]
    for draw in range(50):
        plan = plan_paths([first, second, *honest], exclude=set(), target=seed, paths=4, hops=3, k=3,
                          strict=True, rng=random.Random(draw))
        used = [r for path in plan.paths for r in path]
        assert first.peer_id not in {r.peer_id for r in used}
        assert all(not node_marks(r) & node_marks(seed) for r in used)


def test_glue_records_cannot_chain_honest_relays_to_the_seed() -> None:
    """The attack a transitive grouping let through: record i copies the previous record's endpoint
    and honest relay i's curve key, so one chain links the seed to every honest relay. Were the chain
    one node with the seed, every honest relay would be excluded and a plan of the attacker's own
    relays would come out undegraded. Honest relays must stay candidates."""
    seed = relay(9000, ("relay", "seed"))
    honest = [relay(10000 + i) for i in range(20)]
    attacker = [relay(20000 + i) for i in range(12)]
    glue: list[PeerRecord] = []
    previous = seed
    for number, victim in enumerate(honest):
        link = copy_of(victim, curve=True, port=32000 + number)
        link = copy_of(link, endpoint=previous.endpoint, curve=True)  # previous's endpoint, victim's curve key
        glue.append(link)
        previous = link
    honest_ids = {r.peer_id for r in honest}
    honest_hops = 0
    for draw in range(200):
        plan = plan_paths([*glue, *honest, *attacker], exclude=set(), target=seed, paths=4, hops=3, k=3,
                          strict=True, rng=random.Random(draw))
        used = [r for path in plan.paths for r in path]
        assert all(not node_marks(r) & node_marks(seed) for r in used)
        honest_hops += sum(r.peer_id in honest_ids for r in used)
    # honest relays are drawn about as often as their number says (the glue records that win a
    # conflict take some of their slots, the attacker's 12 relays get no more than their share)
    assert honest_hops / (200 * 12) > 0.3


def test_copies_of_one_relay_count_as_one_node() -> None:
    honest = [relay(10000 + i) for i in range(12)]
    victim = honest[0]
    copies = sybils_of(victim, 12)
    seed = relay(9000, ("relay", "seed"))
    for draw in range(200):
        plan = plan_paths([*honest, *copies], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=False,
                          rng=random.Random(draw))
        used = [r for path in plan.paths for r in path]
        # node-disjoint: no endpoint, curve key or onion key twice on a plan
        endpoints = [normalise_endpoint(r.endpoint) for r in used]
        assert len(set(endpoints)) == len(used)
        assert len({r.curve_key for r in used}) == len(used) and len({r.onion_key for r in used}) == len(used)
    # seen first, the victim wins every conflict: its 12 copies add no candidate, and without the 12th
    # honest relay there are 11
    first_seen = {r.peer_id: 1.0 for r in honest} | {c.peer_id: 2.0 for c in copies}

    def seniority(record: PeerRecord) -> float:
        return first_seen[record.peer_id]

    kept = candidate_records([*honest, *copies], target=None, exclude=set(), rng=random.Random(0), seniority=seniority)
    assert len(kept) == 12
    with pytest.raises(PrivacyError, match="need 12 relays; 11 are available"):
        plan_paths([*honest[:11], *copies], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                   rng=random.Random(0), seniority=seniority)


def test_the_first_seen_of_conflicting_records_is_kept() -> None:
    """A copy made later loses to the genuine record in a store that saw the genuine one first; the
    draw among machines stays uniform."""
    honest = [relay(10000 + i) for i in range(12)]
    copies = sybils_of(honest[0], 6)
    first_seen = {r.peer_id: 100.0 for r in honest} | {c.peer_id: 200.0 for c in copies}
    for draw in range(50):
        kept = candidate_records([*copies, *honest], target=None, exclude=set(), rng=random.Random(draw),
                                 seniority=lambda r: first_seen[r.peer_id])
        assert {r.peer_id for r in kept} == {r.peer_id for r in honest}


def test_an_excluded_peer_id_is_never_drawn_and_its_copies_do_not_exclude_it() -> None:
    """Exclusion is by peer id and does not spread: blaming a copy (a failed hop) must not take the
    genuine relay out with it, or copies would be a way to exclude honest relays."""
    honest = [relay(10000 + i) for i in range(13)]
    copies = sybils_of(honest[0], 6)
    seed = relay(9000, ("relay", "seed"))
    for draw in range(50):
        plan = plan_paths([*honest, *copies], exclude={honest[0].peer_id}, target=seed, paths=4, hops=3, k=3,
                          strict=True, rng=random.Random(draw))
        assert honest[0].peer_id not in {r.peer_id for path in plan.paths for r in path}
    seen_genuine = False
    for draw in range(100):
        kept = candidate_records([*honest, *copies], target=seed, exclude={c.peer_id for c in copies},
                                 rng=random.Random(draw))
        seen_genuine |= honest[0].peer_id in {r.peer_id for r in kept}
    assert seen_genuine


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("tcp://LocalHost:7000", "tcp://localhost:7000", True),
        ("tcp://[::1]:7000", "tcp://[0:0:0:0:0:0:0:1]:7000", True),
        ("tcp://example.org.:7000", "tcp://EXAMPLE.org:7000", True),
        ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001", False),
        ("tcp://10.0.0.1:7000", "tcp://10.0.0.2:7000", False),
        # on the asker's machine every loopback and unspecified address reaches a wildcard-bound socket
        ("tcp://127.0.0.1:7000", "tcp://127.0.0.2:7000", True),
        ("tcp://127.0.0.1:7000", "tcp://localhost:7000", True),
        ("tcp://127.0.0.1:7000", "tcp://0.0.0.0:7000", True),
        ("tcp://127.0.0.1:7000", "tcp://[::ffff:127.0.0.1]:7000", True),
        ("tcp://[::1]:7000", "tcp://[::]:7000", True),
        ("tcp://[::ffff:10.0.0.1]:7000", "tcp://10.0.0.1:7000", True),
    ],
)
def test_endpoint_spellings(one: str, other: str, same: bool) -> None:
    assert (normalise_endpoint(one) == normalise_endpoint(other)) is same


@pytest.mark.parametrize(
    ("relays", "min_hops", "expected"),
    [
        (12, 2, (4, 3, 3)),
        (9, 2, (3, 3, 3)),
        (7, 2, (3, 2, 3)),
        (6, 2, (3, 2, 3)),
        (5, 2, None),  # 3 paths of 2 hops do not fit: refused, k is not lowered
        (2, 2, None),
        (5, 1, (3, 1, 3)),
        (2, 1, (2, 1, 2)),  # only with one-hop paths allowed is k lowered
    ],
)
def test_the_hop_floor(relays: int, min_hops: int, expected: tuple[int, int, int] | None) -> None:
    pool = [relay(10000 + i) for i in range(relays)]
    if expected is None:
        with pytest.raises(PrivacyError) as refused:
            plan_paths(pool, exclude=set(), paths=4, hops=3, k=3, strict=False, rng=random.Random(0), min_hops=min_hops)
        assert "--allow-one-hop" in str(refused.value.hint)
        return
    plan = plan_paths(pool, exclude=set(), paths=4, hops=3, k=3, strict=False, rng=random.Random(0), min_hops=min_hops)
    assert (len(plan.paths), plan.hops, plan.k) == expected


def test_hops_below_the_floor_are_refused() -> None:
    pool = [relay(10000 + i) for i in range(12)]
    with pytest.raises(PrivacyError, match="below the floor"):
        plan_paths(pool, exclude=set(), paths=4, hops=1, k=3, strict=False, rng=random.Random(0))
    assert plan_paths(pool, exclude=set(), paths=4, hops=1, k=3, strict=False, rng=random.Random(0), min_hops=1).hops == 1


def test_private_asks_draw_paths_from_a_csprng() -> None:
    from gtorrent.private import RouteState

    state = RouteState([], 4, 3, 3, False, 2)
    assert isinstance(state.rng, secrets.SystemRandom)


def test_a_copy_under_a_name_that_resolves_to_the_seed_is_barred() -> None:
    """A copy of the seed's address under a host name (any DNS name pointing at it) is the seed: with the
    names the asker resolved, it never goes on a plan, so the asker never even connects to it."""
    from gtorrent.routing import host_of

    seed = PeerRecord.sign(Identity.generate(), endpoint="tcp://10.1.2.3:9000", roles=("relay", "seed"), seq=1,
                           expires=time.time() + 60)
    honest = [relay(10000 + i) for i in range(12)]
    named = [copy_of(seed, endpoint=f"tcp://seed-{i}.example.org:9000") for i in range(5)]
    assert host_of(named[0].endpoint) == "seed-0.example.org" and host_of(seed.endpoint) is None
    aliases = {normalise_endpoint(r.endpoint): frozenset({"10.1.2.3:9000"}) for r in named}
    for draw in range(100):
        plan = plan_paths([*named, *honest], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                          rng=random.Random(draw), aliases=aliases, rules=NO_FRICTION)
        assert not {r.peer_id for path in plan.paths for r in path} & {r.peer_id for r in named}


def test_resolve_names_ties_a_host_name_to_the_address_it_names() -> None:
    """The asker resolves host names in records before planning (the real resolver, on this machine's
    own host name), so a copy of the seed under a name that points at it is the seed."""
    import asyncio
    import socket

    from gtorrent.private import resolve_names

    address = socket.getaddrinfo(socket.gethostname(), 9000, type=socket.SOCK_STREAM)[0][4][0]
    seed = PeerRecord.sign(Identity.generate(), endpoint=f"tcp://[{address}]:9000" if ":" in address
                           else f"tcp://{address}:9000", roles=("relay", "seed"), seq=1, expires=time.time() + 60)
    named = copy_of(seed, endpoint=f"tcp://{socket.gethostname()}:9000")
    aliases = asyncio.run(resolve_names([named, seed, copy_of(seed, endpoint="tcp://no-such-host.invalid:9000")]))
    assert normalise_endpoint(seed.endpoint) in aliases[normalise_endpoint(named.endpoint)]
    assert len(aliases) == 1  # the IP literal needs no resolving; the unknown name resolves to nothing
    plan = plan_paths([named, *(relay(10000 + i) for i in range(12))], exclude=set(), target=seed, paths=4,
                      hops=3, k=3, strict=True, rng=random.Random(0), aliases=aliases, rules=NO_FRICTION)
    assert named.peer_id not in {r.peer_id for path in plan.paths for r in path}


# --------------------------------------------------------------------------- Sybil friction (issue 11)

OLD = 7200.0  # seconds listed: past the default minimum age


def remote(address: str, port: int = 7000) -> PeerRecord:
    host = f"[{address}]" if ":" in address else address
    return PeerRecord.sign(Identity.generate(), endpoint=f"tcp://{host}:{port}", roles=("relay",), seq=1,
                           expires=time.time() + 60)


def aged(records: list[PeerRecord], age: float = OLD) -> dict[str, float]:
    return {r.peer_id: age for r in records}


@pytest.mark.parametrize(
    ("endpoint", "network"),
    [
        ("tcp://203.0.113.7:9000", "203.0.0.0/16"),
        ("tcp://[::ffff:203.0.113.7]:9000", "203.0.0.0/16"),
        ("tcp://[2001:db8:aa:1::5]:9000", "2001:db8::/32"),
        ("tcp://127.0.0.2:9000", "loopback"),
        ("tcp://[::1]:9000", "loopback"),
        ("tcp://localhost:9000", "loopback"),
        ("tcp://relay.example.org:9000", "names"),  # not resolved: with every other such name
    ],
)
def test_network_of(endpoint: str, network: str) -> None:
    from gtorrent.routing import network_of

    record = replace(relay(9000), endpoint=endpoint)
    assert network_of(record) == network


def test_every_host_name_is_in_one_network() -> None:
    """The hop that connects resolves a name itself, so the asker's own lookup cannot place it: names
    that resolve (for the asker) to many networks still count as one, whatever they resolve to."""
    from gtorrent.routing import network_of

    record = replace(relay(9000), endpoint="tcp://relay.example.org:9000")
    assert network_of(record, {"relay.example.org:9000": frozenset({"198.51.100.9:9000"})}) == "names"
    seed = remote("198.51.7.7")
    named = [replace(relay(9000), endpoint=f"tcp://r{i}.example.org:9000") for i in range(8)]
    pool = [*named, *(remote(f"203.{n}.0.1") for n in range(12))]
    aliases = {f"r{i}.example.org:9000": frozenset({f"{10 + i}.1.0.1:9000"}) for i in range(8)}
    for draw in range(50):
        plan = plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                          rng=random.Random(draw), listed_s=aged(pool), aliases=aliases)
        assert all(sum(r in named for r in path) <= 1 for path in plan.paths)


@pytest.mark.parametrize(
    ("endpoint", "network"),
    [
        ("tcp://[2002:cb00:7107::1]:9000", "203.0.0.0/16"),  # 6to4 carrying 203.0.113.7
        ("tcp://[64:ff9b::cb00:7107]:9000", "203.0.0.0/16"),  # NAT64
        ("tcp://[2001:0:4136:e378:8000:63bf:34ff:fffe]:9000", "203.0.0.0/16"),  # Teredo client 203.0.0.1
    ],
)
def test_an_ipv4_address_inside_an_ipv6_one_is_its_ipv4_network(endpoint: str, network: str) -> None:
    from gtorrent.routing import network_of

    assert network_of(replace(relay(9000), endpoint=endpoint)) == network


def test_one_machine_cannot_fill_a_path_with_loopback_and_private_addresses() -> None:
    """A remote swarm: records at loopback, private, link-local or shared addresses lead, from each hop,
    to that hop's own machine or LAN, so one machine could stand for several networks. Never drawn
    (unless the whole swarm is on one host, or --allow-same-network for a LAN)."""
    seed = remote("198.51.7.7")
    public = [remote(f"203.{n}.0.1") for n in range(12)]
    hidden = [remote(a) for a in ("127.0.0.1", "10.1.0.1", "192.168.3.4", "169.254.0.1", "100.64.0.1", "172.16.0.9",
                                  "0.0.0.0", "::1", "fe80::1", "fd00::5", "::ffff:10.0.0.1")]
    ages = aged([*public, *hidden])
    for draw in range(100):
        plan = plan_paths([*public, *hidden], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                          rng=random.Random(draw), listed_s=ages)
        assert not {r.peer_id for path in plan.paths for r in path} & {r.peer_id for r in hidden}
    lan = [remote(f"10.1.0.{i}") for i in range(1, 13)]
    plan = plan_paths(lan, exclude=set(), target=remote("10.2.0.1"), paths=4, hops=3, k=3, strict=True,
                      rng=random.Random(0), listed_s=aged(lan), rules=RelayRules(distinct_networks=False))
    assert len(plan.paths) == 4


def test_no_two_relays_of_a_path_nor_a_relay_and_the_seed_share_a_network() -> None:
    from gtorrent.routing import network_of

    seed = remote("198.51.7.7")
    # 12 networks of 5 relays, 10 relays beside the seed, and an IPv6 /32 holding 5 more
    pool = [remote(f"203.{n}.{i}.1") for n in range(12) for i in range(5)]
    pool += [remote(f"198.51.{i}.2") for i in range(10)]
    pool += [remote(f"2a01:4f8:{i}::1") for i in range(5)]
    ages = aged(pool)
    for draw in range(200):
        plan = plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                          rng=random.Random(draw), listed_s=ages)
        for path in plan.paths:
            networks = [network_of(r) for r in path]
            assert len(set(networks)) == len(networks), networks
            assert "198.51.0.0/16" not in networks


def test_relays_of_one_network_cannot_fill_a_path_unless_allowed() -> None:
    seed = remote("198.51.7.7")
    pool = [remote(f"10.1.{i}.1") for i in range(12)]  # one LAN
    with pytest.raises(PrivacyError) as refused:
        plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=False, rng=random.Random(0),
                   listed_s=aged(pool))
    assert "share a network" in refused.value.message and "--allow-same-network" in str(refused.value.hint)
    plan = plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True, rng=random.Random(0),
                      listed_s=aged(pool), rules=RelayRules(distinct_networks=False))
    assert (len(plan.paths), plan.hops) == (4, 3)


def test_a_swarm_on_one_host_is_exempt_from_the_network_and_age_rules() -> None:
    pool = [relay(10000 + i) for i in range(13)]  # loopback, no listing age known
    plan = plan_paths(pool[:12], exclude=set(), target=pool[12], paths=4, hops=3, k=3, strict=True,
                      rng=random.Random(0))
    assert (len(plan.paths), plan.hops) == (4, 3)
    # one relay elsewhere and the swarm is no longer on one host: the rules hold again
    with pytest.raises(PrivacyError, match="listed for less than"):
        plan_paths([*pool[:12], remote("93.184.216.34")], exclude=set(), target=pool[12], paths=4, hops=3, k=3,
                   strict=True, rng=random.Random(0))


def test_relays_listed_for_less_than_the_minimum_age_are_never_drawn() -> None:
    seed = remote("198.51.7.7")
    old = [remote(f"203.{n}.0.1") for n in range(14)]
    young = [remote(f"192.{n}.0.1") for n in range(30)]
    ages = {**aged(old), **aged(young, 60.0)}  # listed for a minute
    for draw in range(100):
        plan = plan_paths([*old, *young], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                          rng=random.Random(draw), listed_s=ages)
        assert not {r.peer_id for path in plan.paths for r in path} & {r.peer_id for r in young}
    # an age nobody reported counts as none
    with pytest.raises(PrivacyError) as refused:
        plan_paths(young, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True, rng=random.Random(0))
    assert "--min-relay-age" in str(refused.value.hint)
    lowered = plan_paths(young, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True, rng=random.Random(0),
                         listed_s=ages, rules=RelayRules(min_age_s=30.0))
    assert len(lowered.paths) == 4


def test_first_hops_are_the_guards_in_their_order() -> None:
    seed = remote("198.51.7.7")
    pool = [remote(f"203.{n}.0.1") for n in range(40)]
    guards = pool[:8]
    beside_seed = remote("198.51.0.9")  # a guard in the seed's network is skipped for this seed only
    ages = aged([*pool, beside_seed])
    for draw in range(50):
        plan = plan_paths([*pool, beside_seed], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                          rng=random.Random(draw), listed_s=ages, guards=[beside_seed, *guards])
        assert {path[0].peer_id for path in plan.paths} == {g.peer_id for g in guards[:4]}
        # the spare guards may be middle hops; the guard in the seed's network is nowhere
        assert beside_seed.peer_id not in {r.peer_id for path in plan.paths for r in path}
    # guards excluded in this ask (suspects): the spares take their places
    plan = plan_paths(pool, exclude={guards[0].peer_id, guards[2].peer_id}, target=seed, paths=4, hops=3, k=3,
                      strict=True, rng=random.Random(1), listed_s=ages, guards=guards)
    assert {path[0].peer_id for path in plan.paths} == {g.peer_id for g in (guards[1], *guards[3:6])}
    # fewer usable guards than paths: fewer paths (at least k), never a first hop that is not a guard
    plan = plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=False, rng=random.Random(1),
                      listed_s=ages, guards=guards[:3])
    assert len(plan.paths) == 3 and {path[0].peer_id for path in plan.paths} == {g.peer_id for g in guards[:3]}
    with pytest.raises(PrivacyError, match="usable guards"):
        plan_paths(pool, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=False, rng=random.Random(1),
                   listed_s=ages, guards=guards[:2])
