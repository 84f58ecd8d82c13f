"""Tracker answers are uniform samples (issue 11, item 1): peer ids are hashes of keys anyone can grind,
and loads are whatever a peer says, so an answer ordered by either let a few cheap identities fill every
answer and with it every private path. Real signed records in a real TrackerTable, the real planner;
paged listings (one client-chosen key per listing) are held to the same share, and over real sockets."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from gtorrent.discovery import TrackerClient, discover
from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord
from gtorrent.routing import RelayRules, plan_paths
from gtorrent.tracker import DEFAULT_QUERY_LIMIT, TrackerTable
from gtorrent.transport import new_context

from .test_tracker import start

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
        # the age and network rules are routing's (tests/test_routing.py): here only the sample's fairness
        plan = plan_paths(table.query(role="relay"), exclude=set(), paths=4, hops=3, k=3, strict=True, rng=rng,
                          rules=RelayRules(min_age_s=0, distinct_networks=False))
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


def swarm_with_ground_ids(honest: int, ground: int, now: float, seed: int) -> tuple[TrackerTable, set[str]]:
    table = TrackerTable(clock=lambda: now, rng=random.Random(seed))
    ground_records = [relay_record(identity, 100_000 + i, now) for i, identity in enumerate(ground_identities(ground))]
    for record in [*(relay_record(Identity.generate(), i, now) for i in range(honest)), *ground_records]:
        table.accept(record)
    return table, {r.peer_id for r in ground_records}


def paged(table: TrackerTable, key: bytes, limit: int = DEFAULT_QUERY_LIMIT, pages: int | None = None) -> list[list[str]]:
    """The pages of one listing (one key), as peer ids, up to `pages` of them or to the end."""
    found: list[list[str]] = []
    offset = 0
    while pages is None or len(found) < pages:
        page = table.page(role="relay", limit=limit, sample=key, offset=offset)
        found.append([r.peer_id for r in page.records])
        if page.next is None:
            break
        offset = page.next
    return found


def test_ground_ids_get_no_more_than_their_share_of_paged_listings() -> None:
    now = 1_000_000.0
    table, ground_ids = swarm_with_ground_ids(1000, 200, now, seed=5)
    first_pages, two_pages = [], []
    for _ in range(50):
        pages = paged(table, os.urandom(16), pages=2)
        first_pages.append(sum(peer in ground_ids for peer in pages[0]) / len(pages[0]))
        two_pages.append(sum(peer in ground_ids for page in pages for peer in page) / sum(map(len, pages)))
    # fair: 1/6 of every page; ordered by peer id, the first page was all ground ids
    assert 0.10 < sum(first_pages) / 50 < 0.24 and max(first_pages) < 0.35
    assert 0.10 < sum(two_pages) / 50 < 0.24
    # on paths built from the first page of each listing, as an asker does
    hops = owned = 0
    rng = random.Random(13)
    for _ in range(300):
        relays = table.page(role="relay", sample=os.urandom(16)).records
        plan = plan_paths(relays, exclude=set(), paths=4, hops=3, k=3, strict=True, rng=rng,
                          rules=RelayRules(min_age_s=0, distinct_networks=False))
        for path in plan.paths:
            mine = sum(r.peer_id in ground_ids for r in path)
            hops += mine
            owned += mine == len(path)
    assert hops / (300 * 12) < 0.24
    assert owned / (300 * 4) < 0.03


def test_a_claimed_load_buys_no_place_in_a_paged_listing() -> None:
    now = 1_000_000.0
    table = TrackerTable(clock=lambda: now)
    idle = [relay_record(Identity.generate(), 100_000 + i, now, queue=0.0) for i in range(100)]
    for record in [*(relay_record(Identity.generate(), i, now, queue=1.0) for i in range(600)), *idle]:
        table.accept(record)
    idle_ids = {r.peer_id for r in idle}
    counts = [sum(peer in idle_ids for peer in paged(table, os.urandom(16), pages=1)[0]) for _ in range(50)]
    assert sum(counts) / (50 * DEFAULT_QUERY_LIMIT) < 0.22  # fair: 1/7


def test_pages_of_one_listing_cover_every_match_exactly_once() -> None:
    now = 1_000_000.0
    table, _ = swarm_with_ground_ids(1000, 50, now, seed=9)
    key = os.urandom(16)
    for limit in (1, 7, 200, 1000):
        pages = paged(table, key, limit=limit)
        listed = [peer for page in pages for peer in page]
        assert len(listed) == len(set(listed)) == 1050  # no repeats, nothing left out
        assert set(listed) == set(table.entries)
        if limit == 200:
            order = listed
    assert [peer for page in paged(table, key, limit=200) for peer in page] == order  # one key: one order
    again = [peer for page in paged(table, os.urandom(16), limit=200) for peer in page]
    assert again != order and set(again) == set(order)  # a new key: a new order of the same records
    # and a different first page, so one listing's head is not the next one's
    assert len(set(again[:200]) & set(order[:200])) < 100


@pytest.mark.timeout(120)
async def test_ground_ids_get_their_share_of_paged_discovery_over_sockets() -> None:
    ctx: Any = new_context()
    tracker = await start(None)
    try:
        client = TrackerClient(ctx, tracker.url)
        ground = ground_identities(60)
        for identity in [*(Identity.generate() for _ in range(300)), *ground]:
            record = PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("relay",), seq=1,
                                     expires=time.time() + 600)
            await client.announce(record)
        ground_ids = {identity.peer_id for identity in ground}
        shares = []
        for _ in range(20):
            found = await discover(ctx, [tracker.url], role="relay", want=120)
            assert len(found.records) >= 120
            shares.append(sum(peer in ground_ids for peer in found.records) / len(found.records))
        assert 0.08 < sum(shares) / 20 < 0.26  # fair: 1/6; sorted by peer id it was 0.5
    finally:
        await tracker.stop()
        ctx.destroy(linger=0)
