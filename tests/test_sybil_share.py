"""Issue 11's "done when" at swarm scale: 200 Sybil relays whose peer ids were ground to sort before
all 10,000 honest ones get no more than the share of a random 2 %: of the hops, and of the paths they
own whole. Real signed records in a real TrackerTable, listed the way an asker lists them (a paged
sample under a key of its own), planned by the real planner under the default relay rules.

The old tracker answered with the lowest peer ids: these 200 then held every hop of every path."""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord
from gtorrent.routing import plan_paths
from gtorrent.tracker import TrackerTable

pytestmark = pytest.mark.timeout(300)

HONEST = 10_000
SYBILS = 200
ASKS = 250
SAMPLE = 1000  # what an asker lists (private.RELAY_SAMPLE)


def identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate(), X25519PrivateKey.generate(), X25519PrivateKey.generate())


def record(who: Identity, n: int, now: float) -> PeerRecord:
    # every relay in a /16 of its own: the attacker's best case (the network rule costs it nothing)
    return PeerRecord.sign(who, endpoint=f"tcp://{11 + n // 250}.{n % 250}.0.1:7000", roles=("relay",), seq=1,
                           expires=now + 3000)


def test_ground_sybils_own_no_more_than_a_random_two_percent() -> None:
    clock = [1_000_000.0]
    table = TrackerTable(clock=lambda: clock[0], rng=random.Random(1), max_entries=2 * HONEST)
    honest: list[Identity] = []
    ground: list[Identity] = []
    while len(honest) < HONEST or len(ground) < SYBILS:
        one = identity()
        if one.peer_id.startswith("2"):  # '2' sorts before every letter: before every honest id below
            if len(ground) < SYBILS:
                ground.append(one)
        elif len(honest) < HONEST:
            honest.append(one)
    for n, one in enumerate([*honest, *ground]):
        table.accept(record(one, n, clock[0]))
    clock[0] += 2400.0  # all listed for 40 minutes: past the minimum age (30), not yet expired (50)
    ground_ids = {g.peer_id for g in ground}
    random_ids = {h.peer_id for h in random.Random(2).sample(honest, SYBILS)}  # a random 2 % to compare with
    seed = PeerRecord.sign(Identity.generate(), endpoint="tcp://250.0.0.1:7000", roles=("seed",), seq=1,
                           expires=clock[0] + 600)
    rng = random.Random(3)
    hops = {"ground": 0, "random": 0}
    owned = {"ground": 0, "random": 0}
    total_hops = total_paths = 0
    for _ in range(ASKS):
        key, offset, listed, ages = rng.randbytes(16), 0, [], {}
        while len(listed) < SAMPLE:  # the asker's paged listing under one key of its own
            page = table.page(role="relay", limit=1000, sample=key, offset=offset)
            listed += page.records
            ages.update({r.peer_id: age for r, age in zip(page.records, page.listed_s, strict=True)})
            if page.next is None:
                break
            offset = page.next
        plan = plan_paths(listed, exclude=set(), target=seed, paths=4, hops=3, k=3, strict=True, rng=rng, listed_s=ages)
        for path in plan.paths:
            total_paths += 1
            total_hops += len(path)
            for name, ids in (("ground", ground_ids), ("random", random_ids)):
                mine = sum(r.peer_id in ids for r in path)
                hops[name] += mine
                owned[name] += mine == len(path)
    share = SYBILS / (HONEST + SYBILS)
    for name in ("ground", "random"):
        # 3,000 hops at 1.96 %: about 59 expected, standard deviation about 8
        assert abs(hops[name] / total_hops - share) < 0.01, (name, hops[name], total_hops)
        # a random 2 % owns a 3-hop path with probability 8e-6: over 1,000 paths, almost surely none
        assert owned[name] <= 1, (name, owned[name])
