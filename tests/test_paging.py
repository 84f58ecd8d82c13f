"""Paged listings and listing ages (issue 11, items 1 and 2): the pure TrackerTable rules with an injected
clock, then real trackers on 127.0.0.1 (real SQLite files where a restart matters) and a tracker that
lies about paging and ages, to show the client's bounds."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gtorrent.discovery import Discovery, TrackerClient, discover, listing_ages, max_pages
from gtorrent.identity import Identity
from gtorrent.protocol import RECORD_LABEL, Message, ModelInfo, PeerRecord, canonical
from gtorrent.tracker import (
    MAX_QUERY_LIMIT,
    TrackerDatabase,
    TrackerService,
    TrackerTable,
    sample_order,
)
from gtorrent.transport import Connection, Reply

from .test_tracker import Running

pytestmark = pytest.mark.timeout(60)

NOW = 1_000_000.0


def relay(identity: Identity, seq: int = 1, expires: float = NOW + 60, stopped: bool = False,
          endpoint: str = "tcp://10.0.0.1:7000") -> PeerRecord:
    return PeerRecord.sign(identity, endpoint=endpoint, roles=("relay",), seq=seq, expires=expires, stopped=stopped)


def live(identity: Identity, seq: int = 1) -> PeerRecord:
    """A record signed against the real clock (for trackers over sockets), valid for 3,000 s."""
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("relay",), seq=seq,
                           expires=time.time() + 3000)


def filled(count: int, now: float = NOW) -> tuple[TrackerTable, list[PeerRecord]]:
    table = TrackerTable(clock=lambda: now)
    records = [relay(Identity.generate(), expires=now + 60) for _ in range(count)]
    for rec in records:
        table.accept(rec)
    return table, records


# --------------------------------------------------------------------------- pages (pure)


def test_a_listing_is_ordered_by_the_keyed_hash_and_paged_by_offset() -> None:
    table, records = filled(25)
    key = os.urandom(16)
    expected = sorted((r.peer_id for r in records), key=lambda peer: sample_order(peer, key))
    seen, offset, nexts = [], 0, []
    while True:
        page = table.page(role="relay", limit=7, sample=key, offset=offset)
        assert page.total == 25 and len(page.listed_s) == len(page.records)
        seen += [r.peer_id for r in page.records]
        nexts.append(page.next)
        if page.next is None:
            break
        offset = page.next
    assert seen == expected  # exactly the keyed-hash order, every match once
    assert nexts == [7, 14, 21, None]
    assert table.page(role="relay", sample=key, offset=25).records == []  # past the end: empty, no next
    assert table.page(role="relay", sample=key, offset=99).next is None


def test_the_byte_budget_cuts_a_page_and_next_points_at_the_first_left_out() -> None:
    models = tuple(ModelInfo(f"{i:02x}" * 32, "x" * 62 + f"{i:02d}", 512) for i in range(8))
    table = TrackerTable(clock=lambda: NOW)
    for _ in range(130):  # ~2.5 KB each: more than 192 KiB in all
        table.accept(PeerRecord.sign(Identity.generate(), endpoint="tcp://10.0.0.1:7000", roles=("seed",),
                                     models=models, seq=1, expires=NOW + 60))
    key = os.urandom(16)
    first = table.page(sample=key, limit=MAX_QUERY_LIMIT)
    assert 50 <= len(first.records) < 130 and first.next == len(first.records) and first.total == 130
    rest = table.page(sample=key, limit=MAX_QUERY_LIMIT, offset=first.next)
    assert rest.next is None
    assert {r.peer_id for r in first.records} | {r.peer_id for r in rest.records} == set(table.entries)


def test_limit_is_capped_at_a_thousand() -> None:
    table, _ = filled(1005)
    page = table.page(role="relay", limit=5000)
    assert len(page.records) <= MAX_QUERY_LIMIT and page.next is not None and page.total == 1005


def test_peers_filter_is_exact() -> None:
    table, records = filled(40)
    wanted = [records[3].peer_id, records[17].peer_id, "no-such-peer", records[3].peer_id]
    page = table.page(peers=wanted)
    assert sorted(r.peer_id for r in page.records) == sorted({records[3].peer_id, records[17].peer_id})
    assert page.total == 2 and page.next is None
    assert table.page(peers=[records[3].peer_id[:-1]]).records == []  # a prefix is not a match
    assert table.page(peers=[records[3].peer_id], role="seed").records == []  # the other filters still apply


def test_without_a_key_each_page_is_a_fresh_sample() -> None:
    table, _ = filled(500)
    first, second = (table.page(role="relay") for _ in range(2))
    assert len(first.records) == len(second.records) == 200
    assert {r.peer_id for r in first.records} != {r.peer_id for r in second.records}


# --------------------------------------------------------------------------- listing age (pure)


def test_listing_age_continues_through_refreshes_and_restarts_after_stop_and_expiry() -> None:
    now = [NOW]
    table = TrackerTable(clock=lambda: now[0])
    peer, other = Identity.generate(), Identity.generate()
    assert table.listed_since(peer.peer_id) is None
    table.accept(relay(peer, seq=1, expires=now[0] + 90))
    table.accept(relay(other, seq=1, expires=now[0] + 3000))
    for seq in range(2, 8):  # refreshed every 30 s for three minutes: one continuous listing
        now[0] += 30
        table.accept(relay(peer, seq=seq, expires=now[0] + 90))
    assert table.listed_since(peer.peer_id) == NOW
    page = table.page(sample=b"k" * 16)
    ages = {r.peer_id: age for r, age in zip(page.records, page.listed_s, strict=True)}
    assert ages == {peer.peer_id: 180.0, other.peer_id: 180.0}
    # stopped, then back: listed from its return
    now[0] += 10
    table.accept(relay(peer, seq=8, expires=now[0] + 90, stopped=True))
    assert table.listed_since(peer.peer_id) is None
    now[0] += 10
    table.accept(relay(peer, seq=9, expires=now[0] + 90))
    assert table.listed_since(peer.peer_id) == now[0]
    # its record expired (not yet swept), then a new one: listed from the new one
    now[0] += 200
    assert table.listed_since(peer.peer_id) is None
    table.accept(relay(peer, seq=10, expires=now[0] + 90))
    assert table.listed_since(peer.peer_id) == now[0]
    # expired and swept, then back
    now[0] += 100
    table.expire()
    now[0] += 5
    table.accept(relay(peer, seq=11, expires=now[0] + 90))
    assert table.listed_since(peer.peer_id) == now[0]
    assert table.listed_since(other.peer_id) == NOW  # the other peer was never interrupted


def resigned(identity: Identity, record: PeerRecord, **changes: Any) -> PeerRecord:
    """The record with these fields changed, signed again by its identity."""
    changed = replace(record, **changes)
    return replace(changed, signature=identity.sign(RECORD_LABEL + canonical(changed.unsigned_wire())))


def test_listing_age_restarts_when_the_endpoint_or_link_key_changes_but_not_the_onion_key() -> None:
    """The age vouches for a relay at an address with a link key: one that moves (or swaps its CurveZMQ
    key) is listed anew; the onion key rotates every hour and keeps the age."""
    now = [NOW]
    table = TrackerTable(clock=lambda: now[0])
    peer = Identity.generate()
    table.accept(relay(peer, seq=1, expires=now[0] + 90))
    now[0] += 30
    table.accept(resigned(peer, relay(peer, seq=2, expires=now[0] + 90), onion_key=Identity.generate().onion_public))
    assert table.listed_since(peer.peer_id) == NOW  # a rotated onion key: the same listing
    now[0] += 30
    table.accept(relay(peer, seq=3, expires=now[0] + 90, endpoint="tcp://10.9.9.9:7000"))
    assert table.listed_since(peer.peer_id) == now[0]  # moved: listed from now
    moved_at = now[0]
    now[0] += 30
    table.accept(relay(peer, seq=4, expires=now[0] + 90, endpoint="tcp://10.9.9.9:7000"))
    assert table.listed_since(peer.peer_id) == moved_at  # refreshed where it now is: continuous
    now[0] += 30
    other_key = Identity.generate().curve_public
    table.accept(resigned(peer, relay(peer, seq=5, expires=now[0] + 90, endpoint="tcp://10.9.9.9:7000"),
                          curve_key=other_key))
    assert table.listed_since(peer.peer_id) == now[0]  # another link key: listed from now


def test_a_refused_announce_does_not_touch_the_listing_age() -> None:
    now = [NOW]
    table = TrackerTable(clock=lambda: now[0])
    peer = Identity.generate()
    table.accept(relay(peer, seq=5, expires=now[0] + 90))
    now[0] += 30
    with pytest.raises(Exception, match="not above"):
        table.accept(relay(peer, seq=5, expires=now[0] + 90))
    assert table.listed_since(peer.peer_id) == NOW


def test_listing_age_survives_a_restart_and_old_rows_count_from_the_load(tmp_path: Path) -> None:
    now = [NOW]
    table = TrackerTable(clock=lambda: now[0])
    peer = Identity.generate()
    table.accept(relay(peer, expires=now[0] + 3000))
    db = TrackerDatabase(tmp_path / "t.db")
    db.flush(table)
    db.close()
    now[0] += 600
    again = TrackerTable(clock=lambda: now[0])
    assert TrackerDatabase(tmp_path / "t.db").load_into(again) == 1
    assert again.listed_since(peer.peer_id) == NOW
    assert again.page(sample=b"k" * 16).listed_s == [600.0]
    # a database written before the column existed: its rows are listed from the load on
    old = TrackerDatabase(tmp_path / "t.db")
    old.db.execute("update tracker_records set listed_since = null")
    old.db.conn.commit()
    old.close()
    now[0] += 50
    third = TrackerTable(clock=lambda: now[0])
    TrackerDatabase(tmp_path / "t.db").load_into(third)
    assert third.listed_since(peer.peer_id) == now[0]


def test_a_database_from_before_listing_ages_is_migrated(tmp_path: Path) -> None:
    """The t001-only schema (no listed_since column) opens, gains the column, and loads its rows."""
    from sqlite_utils import Database

    from gtorrent.tracker import tracker_migrations

    path = tmp_path / "t.db"
    db = Database(path)
    tracker_migrations.apply(db, stop_before="t002_listed_since")
    peer = Identity.generate()
    rec = relay(peer, expires=NOW + 3000)
    db.table("tracker_records").insert({"peer_id": peer.peer_id, "seq": 1, "expires": NOW + 3000,
                                        "record": json.dumps(rec.to_wire())})
    db.close()
    table = TrackerTable(clock=lambda: NOW + 100)
    assert TrackerDatabase(path).load_into(table) == 1
    assert table.listed_since(peer.peer_id) == NOW + 100


# --------------------------------------------------------------------------- the client's side (pure)


def reply(records: int, **body: Any) -> Message:
    return Message("peers", {"records": [{}] * records, **body})


@pytest.mark.parametrize("ages", [
    None, [1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 3.0], [1.0, "2", 3.0], [1.0, True, 3.0], "123",
    [1.0, float("inf"), 3.0],
])
def test_malformed_ages_count_as_zero(ages: Any) -> None:
    body = {} if ages is None else {"listed_s": ages}
    assert listing_ages(reply(3, **body)) == [0.0, 0.0, 0.0]


def test_well_formed_ages_are_taken() -> None:
    assert listing_ages(reply(3, listed_s=[0, 1.5, 7200])) == [0.0, 1.5, 7200.0]


def test_merge_keeps_the_smallest_age_and_counts_a_missing_one_as_zero() -> None:
    a, b = relay(Identity.generate(), expires=time.time() + 60), relay(Identity.generate(), expires=time.time() + 60)
    found = Discovery()
    found.merge([a, b], time.time(), {a.peer_id: 900.0, b.peer_id: 50.0})
    found.merge([a], time.time(), {a.peer_id: 3000.0})  # an older claim does not raise the age
    assert found.listed_s == {a.peer_id: 900.0, b.peer_id: 50.0}
    found.merge([b], time.time())  # a tracker that sent no ages
    assert found.listed_s[b.peer_id] == 0.0


def test_page_bound_allows_for_budget_cut_pages() -> None:
    assert max_pages(200, 200) >= 200 // 47 + 2  # pages of the largest records hold ~47
    assert max_pages(1, 1) == 3


# --------------------------------------------------------------------------- real trackers


async def test_client_pages_one_listing_to_want_without_repeats(ctx: Any, launch: Any) -> None:
    tracker = await launch(None)
    client = TrackerClient(ctx, tracker.url)
    peers = [Identity.generate() for _ in range(450)]
    for peer in peers:
        await client.announce(live(peer))
    assert len(await client.query(role="relay")) == 200  # one page by default, as before
    listing = await client.listing(role="relay", want=450)
    assert set(listing.records) == {p.peer_id for p in peers}
    assert listing.pages >= 2  # 450 small records do not fit one 192 KiB page
    few = await client.listing(role="relay", want=30)
    assert len(few.records) == 30 and few.pages == 1
    found = await discover(ctx, [tracker.url], role="relay", want=1000)  # more than there are: all of them
    assert set(found.records) == {p.peer_id for p in peers}
    chosen = [peers[5].peer_id, peers[77].peer_id]
    assert set((await discover(ctx, [tracker.url], peers=chosen)).records) == set(chosen)


async def test_ages_over_sockets_are_the_minimum_across_trackers_and_survive_a_restart(
    tmp_path: Path, ctx: Any, launch: Any
) -> None:
    clock = [time.time()]
    one_id = Identity.generate()
    one = await launch(tmp_path / "one.db", one_id, clock=lambda: clock[0])
    two_clock = [time.time()]
    two = await launch(None, clock=lambda: two_clock[0])
    both, only_one = Identity.generate(), Identity.generate()
    await TrackerClient(ctx, one.url).announce(live(both))
    await TrackerClient(ctx, one.url).announce(live(only_one))
    clock[0] += 500
    two_clock[0] += 400
    await TrackerClient(ctx, one.url).announce(live(both, 2))  # a refresh keeps the age
    await TrackerClient(ctx, two.url).announce(live(both, 3))
    two_clock[0] += 100
    found = await discover(ctx, [one.url, two.url], role="relay")
    assert found.listed_s[both.peer_id] == pytest.approx(100.0, abs=0.01)  # the younger claim wins
    assert found.listed_s[only_one.peer_id] == pytest.approx(500.0, abs=0.01)
    assert found.records[both.peer_id].seq == 3
    url = one.url
    await one.stop()
    clock[0] += 60
    again = await launch(tmp_path / "one.db", one_id, bind=url, clock=lambda: clock[0])
    assert again.service.loaded == 2
    ages = (await TrackerClient(ctx, url).listing(role="relay")).listed_s
    assert ages == {both.peer_id: pytest.approx(560.0, abs=0.01), only_one.peer_id: pytest.approx(560.0, abs=0.01)}


async def test_an_old_client_gets_the_old_answer_and_bad_paging_fields_are_refused(ctx: Any, launch: Any) -> None:
    tracker = await launch(None)
    await TrackerClient(ctx, tracker.url).announce(live(Identity.generate()))
    own = await TrackerClient(ctx, tracker.url)._tracker_record()
    async with Connection(ctx, own.endpoint, server_key=own.curve_key) as conn:
        kinds = frozenset({"peers", "error"})
        plain = await conn.request("query", {"role": "relay"}, kinds, 5)
        assert plain.kind == "peers" and set(plain.body) == {"records"}  # no field an older client would refuse
        paged = await conn.request("query", {"role": "relay", "sample": "ab" * 16}, kinds, 5)
        assert set(paged.body) == {"records", "listed_s", "total"} and paged["total"] == 1  # no `next`: exhausted
        for bad in ({"sample": "ab" * 15}, {"sample": "zz" * 16}, {"peers": [1, 2]}, {"peers": [""]}):
            refused = await conn.request("query", bad, kinds, 5)
            assert refused.kind == "error" and refused["code"] == "invalid", bad


class LyingTracker(TrackerService):
    """Answers every query with `next` that never runs out, or one that goes nowhere, and bad ages."""

    def __init__(self, records: list[PeerRecord], mode: str) -> None:
        super().__init__(Identity.generate(), None)
        self.lies, self.mode, self.queries = records, mode, 0

    async def _on_message(self, reply: Reply, message: Message) -> None:
        if message.kind != "query":
            await super()._on_message(reply, message)
            return
        self.queries += 1
        offset = message.get("offset", 0)
        if self.mode == "endless":  # a fresh record each page, and always more to come
            body = {"records": [self.lies[offset % len(self.lies)].to_wire()], "next": offset + 1,
                    "listed_s": [10**9], "total": 10**6}
        elif self.mode == "stuck":  # more to come, at the same offset
            body = {"records": [r.to_wire() for r in self.lies[:2]], "next": offset, "listed_s": [5.0]}
        elif self.mode == "far":  # more to come, beyond any offset a tracker accepts
            body = {"records": [r.to_wire() for r in self.lies[:2]], "next": 1 << 30, "listed_s": [5.0]}
        elif self.mode == "fails" and offset:  # the second page is refused
            await reply.send("error", {"code": "internal", "message": "no"})
            return
        elif self.mode == "fails":
            body = {"records": [r.to_wire() for r in self.lies[:2]], "next": 2, "listed_s": [5.0, 6.0]}
        else:  # the same records again at every next offset
            body = {"records": [r.to_wire() for r in self.lies[:2]], "next": offset + 2, "listed_s": [5.0]}
        await reply.send("peers", body)


@pytest.mark.parametrize("mode", ["endless", "stuck", "repeat", "far", "fails"])
async def test_a_lying_tracker_cannot_keep_the_client_paging(ctx: Any, mode: str) -> None:
    lies = [live(Identity.generate()) for _ in range(40)]
    service = LyingTracker(lies, mode)
    service.bind("tcp://127.0.0.1:0")
    running = Running(service, asyncio.create_task(service.serve()))
    try:
        listing = await TrackerClient(ctx, service.url).listing(role="relay", want=5)
        bound = max_pages(5, 5)
        expected = {"endless": bound, "stuck": 1, "repeat": 2, "far": 1, "fails": 1}[mode]
        assert listing.pages == expected
        assert service.queries == expected + (mode == "fails")  # the refused page is not counted
        if mode == "endless":
            assert len(listing.records) == bound and set(listing.listed_s.values()) == {10**9}
        elif mode == "fails":  # the first page stands
            assert listing.listed_s == {lies[0].peer_id: 5.0, lies[1].peer_id: 6.0}
        else:  # a list of the wrong length: every age of the page is 0 (a negative age breaks the schema)
            assert set(listing.listed_s.values()) == {0.0}
    finally:
        await running.stop()
