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
from gtorrent.routing import PrivacyError, group_nodes, normalise_endpoint, plan_paths


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


def test_copies_chained_through_each_other_are_dropped_too() -> None:
    seed = relay(9000, ("relay", "seed"))
    first = copy_of(seed, onion=True, port=31000)  # shares the seed's onion key only
    second = copy_of(first, endpoint=first.endpoint)  # shares nothing with the seed, but first's endpoint
    honest = [relay(10000 + i) for i in range(12)]
    for draw in range(50):
        plan = plan_paths([first, second, *honest], exclude=set(), target=seed, paths=4, hops=3, k=3,
                          strict=True, rng=random.Random(draw))
        used = {r.peer_id for path in plan.paths for r in path}
        assert not used & {first.peer_id, second.peer_id}


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
    # the victim with its 12 copies is one node: 12 nodes in all, and 11 without the 12th honest relay
    assert len(group_nodes([*honest, *copies])) == 12
    with pytest.raises(PrivacyError, match="need 12 relays; 11 are available"):
        plan_paths([*honest[:11], *copies], exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True,
                   rng=random.Random(0))


def test_an_excluded_peer_excludes_its_copies() -> None:
    honest = [relay(10000 + i) for i in range(13)]
    copies = sybils_of(honest[0], 6)
    seed = relay(9000, ("relay", "seed"))
    for draw in range(50):
        plan = plan_paths([*honest, *copies], exclude={honest[0].peer_id}, target=seed, paths=4, hops=3, k=3,
                          strict=True, rng=random.Random(draw))
        used = {r.peer_id for path in plan.paths for r in path}
        assert not used & ({honest[0].peer_id} | {c.peer_id for c in copies})


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("tcp://LocalHost:7000", "tcp://localhost:7000", True),
        ("tcp://[::1]:7000", "tcp://[0:0:0:0:0:0:0:1]:7000", True),
        ("tcp://example.org.:7000", "tcp://EXAMPLE.org:7000", True),
        ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001", False),
        ("tcp://127.0.0.1:7000", "tcp://127.0.0.2:7000", False),
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
