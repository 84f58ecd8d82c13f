"""Merging several trackers' listings under one key, and hostile trackers (security review of issue 11,
findings 4, 8 and 10): the pure `merge_listings` rules table-driven over records placed by a known key,
then real trackers on 127.0.0.1 — an honest one next to one that lies about ages, trackers that send
numbers out of every bound, and one that answers each page just in time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from gtorrent.discovery import Announcer, Listing, TrackerClient, TrackerUnreachable, discover, merge_listings
from gtorrent.identity import Identity
from gtorrent.protocol import Message, PeerRecord
from gtorrent.tracker import Page, TrackerService, sample_order
from gtorrent.transport import Reply

from .test_tracker import Running, start

pytestmark = pytest.mark.timeout(60)

KEY = b"k" * 16
NOW = time.time()


def relay(identity: Identity, seq: int = 1, expires: float = NOW + 3000, stopped: bool = False) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("relay",), seq=seq, expires=expires,
                           stopped=stopped)


IDENTITIES = [Identity.generate() for _ in range(10)]
# R[0] .. R[9]: records in the order of the listing keyed by KEY (the order every honest tracker uses)
R = sorted((relay(i) for i in IDENTITIES), key=lambda r: sample_order(r.peer_id, KEY))


def listing(entries: list[tuple[int, float]], exhausted: bool = False) -> Listing:
    """What one tracker sent: R[index] with the age it claimed, in the order given."""
    found = Listing(pages=1, exhausted=exhausted)
    for index, age in entries:
        found.add(R[index], age)
    return found


def honest(indices: range | list[int], age: float = 5000.0, exhausted: bool = False,
           ages: dict[int, float] | None = None) -> Listing:
    return listing([(i, (ages or {}).get(i, age)) for i in indices], exhausted)


ALL = range(10)
CASES: dict[str, tuple[list[Listing], dict[int, float], set[int]]] = {
    # name: (the trackers' listings, the merged {index: age}, the trackers (positions) that failed)
    "one tracker is believed": (
        [honest(range(6), ages={2: 7.0})], {0: 5000.0, 1: 5000.0, 2: 7.0, 3: 5000.0, 4: 5000.0, 5: 5000.0}, set()),
    "liar ages a new relay (3 trackers): the median is 0": (
        [honest(ALL, ages={3: 0.0}), honest(ALL, ages={3: 0.0}), listing([(3, 1e6)], exhausted=True)],
        {i: 0.0 if i == 3 else 5000.0 for i in ALL}, set()),
    "liar ages a new relay (2 trackers): the smaller wins": (
        [honest(ALL, ages={3: 0.0}), listing([(3, 1e6)], exhausted=True)],
        {i: 0.0 for i in ALL}, set()),  # it "covers" every place and lists no other: it can delay, not hasten
    "liar hides the honest relays (3 trackers): they keep their age": (
        [honest(ALL, 4000.0), honest(ALL, 6000.0), listing([], exhausted=True)], {i: 4000.0 for i in ALL}, set()),
    "liar's own Sybil (3 trackers): kept, but at age 0": (
        [honest([0, 1, 2, 4, 5, 6, 7, 8, 9]), honest([0, 1, 2, 4, 5, 6, 7, 8, 9]), listing([(3, 1e6)], exhausted=True)],
        {i: 0.0 if i == 3 else 5000.0 for i in ALL}, set()),
    "liar with a tiny frontier (3 trackers) hides nothing": (
        [honest(ALL), honest(ALL, 6000.0), listing([(0, 1e6)])], {0: 6000.0} | {i: 5000.0 for i in range(1, 10)}, set()),
    "liar out of order fails; the others stand": (
        [honest(ALL), listing([(5, 1e6), (1, 1e6)])], {i: 5000.0 for i in ALL}, {1}),
    "a repeated record is in order": (
        [listing([(0, 9.0), (1, 9.0), (1, 9.0), (2, 9.0)])], {0: 9.0, 1: 9.0, 2: 9.0}, set()),
    "two trackers: only the stretch both cover is kept": (
        [honest(ALL), honest(range(5), 6000.0)], {i: 5000.0 for i in range(5)}, set()),
    "an exhausted listing covers every place": (
        [honest(range(10)), honest(range(5), 6000.0, exhausted=True)],
        {i: 5000.0 for i in range(5)} | {i: 0.0 for i in range(5, 10)}, set()),
    "both exhausted": (
        [honest([0, 2, 4], exhausted=True), honest([0, 2, 4], 100.0, exhausted=True)], {0: 100.0, 2: 100.0, 4: 100.0}, set()),
    "a listing that returned nothing and is not exhausted covers nothing": (
        [honest(ALL), honest(ALL), listing([])], {i: 5000.0 for i in ALL}, set()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_merge_listings(name: str) -> None:
    listings, expected, failed = CASES[name]
    urls = {f"tcp://t{n}:1": one for n, one in enumerate(listings)}
    found = merge_listings(urls, KEY, NOW)
    assert {R.index(found.records[p]): age for p, age in found.listed_s.items()} == expected
    assert set(found.records) == set(found.listed_s)
    assert set(found.failed) == {f"tcp://t{n}:1" for n in failed}
    assert found.reached == [url for n, url in enumerate(urls) if n not in failed]
    assert all("out of the listing's order" in message for message in found.failed.values())


def test_merge_keeps_the_newest_record_and_drops_stopped_and_expired_ones() -> None:
    by_peer = {i.peer_id: i for i in IDENTITIES}
    newer = relay(by_peer[R[0].peer_id], seq=5)
    gone = relay(by_peer[R[1].peer_id], seq=5, stopped=True)
    old = relay(by_peer[R[2].peer_id], seq=5, expires=NOW - 1)
    a, b = honest(range(3), exhausted=True), Listing(pages=1, exhausted=True)
    for record in (newer, gone, old):  # in the listing's order, as R[0], R[1], R[2]
        b.add(record, 5000.0)
    found = merge_listings({"a": a, "b": b}, KEY, NOW)
    assert list(found.records.values()) == [newer] and found.reached == ["a", "b"]


# --------------------------------------------------------------------------- real trackers


def live(identity: Identity, seq: int = 1) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("relay",), seq=seq,
                           expires=time.time() + 3000)


async def test_a_lying_tracker_ages_no_sybil_and_takes_no_bigger_share(ctx: Any) -> None:
    """An honest tracker lists 150 relays, listed for 2,000 s by its clock. The other lists the same
    relays and 150 Sybils of its own, answers in the client's keyed order (so it is not caught out of
    order) but claims 10^6 s for everything. Merged: no Sybil is older than 0 s, the honest relays keep
    the honest tracker's age, and the Sybils hold no more of the pool than their share of the liar's
    listing (half), where one key per tracker let them in at 10^6 s."""
    clock = [time.time()]
    good = await start(None, clock=lambda: clock[0])
    liar = await start(None)
    page = liar.service.table.page

    def lying_page(*args: Any, **kwargs: Any) -> Page:
        honest_page = page(*args, **kwargs)
        return replace(honest_page, listed_s=[1e6] * len(honest_page.records))

    liar.service.table.page = lying_page  # type: ignore[method-assign]
    try:
        relays = [Identity.generate() for _ in range(150)]
        sybils = [Identity.generate() for _ in range(150)]
        for peer in relays:
            await TrackerClient(ctx, good.url).announce(live(peer))
            await TrackerClient(ctx, liar.url).announce(live(peer))
        for peer in sybils:
            await TrackerClient(ctx, liar.url).announce(live(peer))
        clock[0] += 2000
        sybil_ids = {p.peer_id for p in sybils}
        in_pool = pool = 0
        for _ in range(5):
            found = await discover(ctx, [good.url, liar.url], role="relay", want=60)
            assert found.reached == [good.url, liar.url] and not found.failed
            aged = [p for p in sybil_ids & set(found.records) if found.listed_s[p] > 0]
            assert not aged, f"{len(aged)} Sybils aged by the lying tracker"
            honest_ages = [found.listed_s[p.peer_id] for p in relays if p.peer_id in found.records]
            assert honest_ages and all(1999 <= age <= 2001 for age in honest_ages)
            in_pool += len(sybil_ids & set(found.records))
            pool += len(found.records)
        assert in_pool / pool < 0.65  # ~0.5: the liar's Sybils are half of its listing, no more
    finally:
        await good.stop()
        await liar.stop()


class HostileTracker(TrackerService):
    """Answers queries, and announces, with attacker-chosen bodies (sent whatever the schema says)."""

    def __init__(self, query_body: dict[str, Any] | None = None, announce_body: dict[str, Any] | None = None) -> None:
        super().__init__(Identity.generate(), None)
        self.query_body, self.announce_body = query_body, announce_body

    async def _on_message(self, reply: Reply, message: Message) -> None:
        if message.kind == "query" and self.query_body is not None:
            await reply.send("peers", self.query_body)
        else:
            await super()._on_message(reply, message)

    async def _on_announces(self, batch: list[tuple[Reply, Message]]) -> None:
        if self.announce_body is None:
            await super()._on_announces(batch)
            return
        for reply, _ in batch:
            await reply.send("announce_ok", self.announce_body)


async def hostile(**bodies: Any) -> Running:
    service = HostileTracker(**bodies)
    service.bind("tcp://127.0.0.1:0")
    return Running(service, asyncio.create_task(service.serve()))


BAD_PAGES = {
    "huge integer age": {"listed_s": [10**400], "total": 1},
    "huge float age": {"listed_s": [1e300], "total": 1},
    "negative age": {"listed_s": [-1.0], "total": 1},
    "huge total": {"listed_s": [1.0], "total": 10**400},
    "huge next": {"listed_s": [1.0], "total": 2, "next": 10**400},
    "age not a number": {"listed_s": ["1"], "total": 1},
}


@pytest.mark.parametrize("bad", list(BAD_PAGES))
async def test_a_tracker_sending_numbers_out_of_bounds_is_a_failed_tracker(ctx: Any, bad: str) -> None:
    record = live(Identity.generate())
    evil = await hostile(query_body={"records": [record.to_wire()], **BAD_PAGES[bad]})
    good = await start(None)
    try:
        other = live(Identity.generate())
        await TrackerClient(ctx, good.url).announce(other)
        for want in (None, 10):
            found = await discover(ctx, [evil.url, good.url], role="relay", want=want, timeout_s=0.5)
            assert found.reached == [good.url] and set(found.records) == {other.peer_id}
            assert "invalid answer" in found.failed[evil.url], found.failed
            with pytest.raises(TrackerUnreachable, match="invalid answer"):
                await discover(ctx, [evil.url], role="relay", want=want, timeout_s=0.5)
    finally:
        await evil.stop()
        await good.stop()


@pytest.mark.parametrize("body", [{"interval_s": 10**400, "peers": 1}, {"interval_s": 1e300, "peers": 1},
                                  {"interval_s": 30, "peers": 10**400}])
async def test_an_announce_answer_out_of_bounds_is_that_trackers_error(ctx: Any, body: dict[str, Any]) -> None:
    evil = await hostile(announce_body=body)
    good = await start(None)
    try:
        identity = Identity.generate()
        announcer = Announcer(ctx, [evil.url, good.url], lambda stopped: live(identity), max_interval_s=20.0)
        announcer.trackers[0].timeout_s = 0.5
        errors = await announcer.announce()
        assert list(errors) == [evil.url.split("#")[0]] and "invalid answer" in errors[evil.url]
        assert announcer.interval_s == 20.0  # the honest tracker's 30 s, clamped
        assert [r.peer_id for r in await TrackerClient(ctx, good.url).query()] == [identity.peer_id]
    finally:
        await evil.stop()
        await good.stop()


class SlowTracker(TrackerService):
    """Answers each page just before the client's timeout, always with one more page to come."""

    def __init__(self, records: list[PeerRecord], delay_s: float) -> None:
        super().__init__(Identity.generate(), None)
        self.lies, self.delay_s, self.queries = records, delay_s, 0

    async def _on_message(self, reply: Reply, message: Message) -> None:
        if message.kind != "query":
            await super()._on_message(reply, message)
            return
        self.queries += 1
        offset = message.get("offset", 0)
        await asyncio.sleep(self.delay_s)
        await reply.send("peers", {"records": [self.lies[offset % len(self.lies)].to_wire()], "next": offset + 1,
                                   "listed_s": [0.0], "total": 10**6})


async def test_a_slow_tracker_holds_a_listing_no_longer_than_its_deadline(ctx: Any) -> None:
    service = SlowTracker([live(Identity.generate()) for _ in range(40)], delay_s=0.3)
    service.bind("tcp://127.0.0.1:0")
    running = Running(service, asyncio.create_task(service.serve()))
    try:
        client = TrackerClient(ctx, service.url, timeout_s=0.5)
        started = time.monotonic()
        listing = await client.listing(role="relay", want=1000)  # max_pages allows 24 pages: 7.2 s
        took = time.monotonic() - started
        assert took < 2 * 0.5 + 0.5, f"the listing took {took:.1f} s"
        assert 1 <= listing.pages <= 4 and len(listing.records) == listing.pages  # the pages it had stand
        assert not listing.exhausted
    finally:
        await running.stop()
