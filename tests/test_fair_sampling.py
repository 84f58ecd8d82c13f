"""Tracker answers are uniform samples (issue 11, item 1): peer ids are hashes of keys anyone can grind,
and loads are whatever a peer says, so an answer ordered by either let a few cheap identities fill every
answer and with it every private path. Real signed records in a real TrackerTable, the real planner."""

from __future__ import annotations

import random
import time

import pytest

from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord
from gtorrent.routing import plan_paths
from gtorrent.tracker import DEFAULT_QUERY_LIMIT, TrackerTable

pytestmark = pytest.mark.timeout(120)


def relay_record(identity: Identity, port: int, now: float, queue: float = 0.0) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint=f"tcp://10.{port >> 16 & 255}.{port >> 8 & 255}.{port & 255}:7000",
                           roles=("relay",), load={"queue": queue}, seq=1, expires=now + 60)


def ground_identities(count: int) -> list[Identity]:
    """Identities whose peer ids sort before every ordinary one ('2' sorts before the letters)."""
    found: list[Identity] = []
    while len(found) < count:
        identity = Identity.generate()
        if identity.peer_id.startswith("2"):
            found.append(identity)
    return found


def test_ground_ids_get_no_more_than_their_share() -> None:
    now = 1_000_000.0
    table = TrackerTable(clock=lambda: now, rng=random.Random(7))
    honest = [relay_record(Identity.generate(), i, now) for i in range(1000)]
    ground = [relay_record(identity, 100_000 + i, now) for i, identity in enumerate(ground_identities(200))]
    for record in [*honest, *ground]:
        table.accept(record)
    ground_ids = {r.peer_id for r in ground}
    # every answer holds the ground ids at about their share (200 of 1,200), never all 200 of them
    in_answers = []
    for _ in range(50):
        answer = table.query(role="relay")
        assert len(answer) == DEFAULT_QUERY_LIMIT
        in_answers.append(sum(r.peer_id in ground_ids for r in answer))
    share = sum(in_answers) / (50 * DEFAULT_QUERY_LIMIT)
    assert 0.10 < share < 0.24, share  # fair: 1/6; sorted by peer id it was 1.0
    # and so on paths: the share of hops, and of paths they own whole, stays near a random 1/6's
    hops = owned = 0
    rng = random.Random(11)
    for _ in range(300):
        plan = plan_paths(table.query(role="relay"), exclude=set(), paths=4, hops=3, k=3, strict=True, rng=rng)
        for path in plan.paths:
            mine = sum(r.peer_id in ground_ids for r in path)
            hops += mine
            owned += mine == len(path)
    assert hops / (300 * 12) < 0.24
    assert owned / (300 * 4) < 0.03  # a random 1/6 owns a 3-hop path with probability ~0.005


def test_a_claimed_load_buys_no_place_in_the_answer() -> None:
    now = 1_000_000.0
    table = TrackerTable(clock=lambda: now, rng=random.Random(3))
    honest = [relay_record(Identity.generate(), i, now, queue=1.0) for i in range(600)]
    idle = [relay_record(Identity.generate(), 100_000 + i, now, queue=0.0) for i in range(100)]  # "never busy"
    for record in [*honest, *idle]:
        table.accept(record)
    idle_ids = {r.peer_id for r in idle}
    counts = [sum(r.peer_id in idle_ids for r in table.query(role="relay")) for _ in range(50)]
    assert sum(counts) / (50 * DEFAULT_QUERY_LIMIT) < 0.22  # fair: 1/7; sorted by load it was 0.5


def test_answers_are_fresh_per_query() -> None:
    now = time.time()
    table = TrackerTable(clock=lambda: now)
    for i in range(500):
        table.accept(relay_record(Identity.generate(), i, now))
    first, second = ({r.peer_id for r in table.query(role="relay")} for _ in range(2))
    assert first != second and len(first) == len(second) == DEFAULT_QUERY_LIMIT
