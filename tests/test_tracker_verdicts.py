"""Verdicts through the trackers (issue 8 item 3; docs/PROTOCOL.md §12): real trackers on 127.0.0.1 with
real SQLite files. A tracker takes a verdict only verified and from a verifier it admits, one per
(verifier, seed, epoch), within its bounds, keeps it across a restart and serves it with the queries
that ask for it; a client believes no tracker: it re-verifies every verdict, keeps only those on the
records served, and stores them before it ranks seeds, so a seed made untrusted by its verifiers gets
no asks and shows `untrusted` in `gtorrent peers`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gtorrent.asker import AskEvents, AskRequest, NoSeedError, find_seeds
from gtorrent.discovery import TrackerClient, discover, submit_verdict
from gtorrent.identity import Identity
from gtorrent.protocol import ModelInfo, PeerRecord, Verdict
from gtorrent.store import Store
from gtorrent.tracker import Rejected, TrackerService, VerdictTable
from gtorrent.transport import new_context

from .procs import Proc

pytestmark = pytest.mark.timeout(60)

MODEL = ModelInfo("cd" * 32, "demo", 512)
EVIDENCE = "ef" * 32


def seed_record(identity: Identity, seq: int = 1) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=(MODEL,), seq=seq,
                           expires=time.time() + 120)


def verdict(verifier: Identity, seed: Identity | str, epoch: int = 1, credibility: float = 0.9) -> Verdict:
    peer = seed if isinstance(seed, str) else seed.peer_id
    return Verdict.sign(verifier, seed=peer, model_id=MODEL.model_id, epoch=epoch, credibility=credibility,
                        challenges=3, evidence=EVIDENCE)


class Running:
    def __init__(self, service: TrackerService, task: asyncio.Task[None]) -> None:
        self.service, self.task, self.stopped = service, task, False

    @property
    def url(self) -> str:
        return self.service.url

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.service.close()


async def announce(ctx: Any, url: str, *seeds: Identity) -> None:
    for seed in seeds:
        await TrackerClient(ctx, url).announce(seed_record(seed))


async def served(ctx: Any, url: str) -> list[Verdict]:
    return (await discover(ctx, [url], role="seed", verdicts=True)).verdicts


# ------------------------------------------------------------------ submit and serve


async def test_an_admitted_verifiers_verdict_is_served_and_lands_in_an_askers_store(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    verifier, seed = Identity.generate(), Identity.generate()
    tracker = await launch(verifiers=frozenset({verifier.peer_id}))
    ctx = new_context()
    store = Store.open(gtorrent_home)
    try:
        await announce(ctx, tracker.url, seed)
        given = verdict(verifier, seed)
        assert await submit_verdict(ctx, [tracker.url], given) == {}
        found = await discover(ctx, [tracker.url], role="seed", verdicts=True)
        assert found.verdicts == [given] and found.admitted == {verifier.peer_id}
        # without `verdicts` the answer carries none (older clients refuse unknown fields)
        assert (await discover(ctx, [tracker.url], role="seed")).verdicts == []
        await find_seeds(ctx, [tracker.url], AskRequest("hi", model="demo"), store, AskEvents())
        assert store.verdicts(seed.peer_id) == [given]  # with its signature, re-verified on the way out
        assert store.trusted_verifiers == {verifier.peer_id}  # no --verifier: the ones the trackers admit
        assert store.standing(seed.peer_id).state == "trusted"
    finally:
        store.close()
        ctx.destroy(linger=0)


async def test_a_verifier_the_tracker_does_not_admit_is_refused(launch: Callable[..., Awaitable[Running]]) -> None:
    admitted, stranger, seed = Identity.generate(), Identity.generate(), Identity.generate()
    tracker = await launch(verifiers=frozenset({admitted.peer_id}))
    open_tracker = await launch()  # no --verifier: any verifier's verdicts
    ctx = new_context()
    try:
        await announce(ctx, tracker.url, seed)
        await announce(ctx, open_tracker.url, seed)
        errors = await submit_verdict(ctx, [tracker.url, open_tracker.url], verdict(stranger, seed))
        assert list(errors) == [tracker.url] and "not admitted" in errors[tracker.url]
        assert tracker.service.verdicts.count == 0 and await served(ctx, tracker.url) == []
        assert await served(ctx, open_tracker.url) == [verdict(stranger, seed)]
        found = await discover(ctx, [open_tracker.url], role="seed", verdicts=True)
        assert found.admitted is None  # it advertises no list
    finally:
        ctx.destroy(linger=0)


async def test_forged_tampered_and_unlisted_verdicts_are_refused_by_the_tracker(
    launch: Callable[..., Awaitable[Running]],
) -> None:
    verifier, seed, other = Identity.generate(), Identity.generate(), Identity.generate()
    tracker = await launch()
    ctx = new_context()
    client = TrackerClient(ctx, tracker.url)
    try:
        await announce(ctx, tracker.url, seed)
        good = verdict(verifier, seed, credibility=0.1).to_wire()
        tampered = {**good, "credibility": 0.9}  # a higher C under the old signature
        forged = {**verdict(other, seed).to_wire(), "verifier": verifier.peer_id}  # someone else's key
        for doc in (tampered, forged, {**good, "epoch": "1"}, {**good, "extra": 1}):
            reply = await client._request("verdict", {"verdict": doc}, frozenset({"verdict_ok"}))
            assert reply.kind == "error" and reply["code"] == "invalid", doc
        # a verdict on a peer this tracker does not list holds nothing (a flood on made-up seeds)
        errors = await submit_verdict(ctx, [tracker.url], verdict(verifier, other))
        assert "not listed" in errors[tracker.url]
        assert tracker.service.verdicts.count == 0
        assert tracker.service.server.counters["dropped"] >= 5
    finally:
        ctx.destroy(linger=0)


async def test_a_lying_trackers_verdicts_are_dropped_by_the_client(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    verifier, seed, elsewhere = Identity.generate(), Identity.generate(), Identity.generate()
    liar = await launch()
    ctx = new_context()
    store = Store.open(gtorrent_home)
    try:
        await announce(ctx, liar.url, seed)
        genuine = verdict(verifier, seed, epoch=1, credibility=0.9)
        framed = {**verdict(verifier, seed, epoch=2, credibility=0.9).to_wire(), "credibility": 0.0}
        made_up = {**verdict(verifier, seed, epoch=3).to_wire(), "signature": genuine.to_wire()["signature"]}
        off_page = verdict(verifier, elsewhere, epoch=1).to_wire()  # signed, but on a peer it did not list

        def lies(seeds: list[str], budget: int = 0) -> list[dict[str, Any]]:
            return [framed, made_up, off_page, {"not": "a verdict"}, genuine.to_wire(), genuine.to_wire()]

        liar.service.verdicts.for_seeds = lies  # type: ignore[method-assign]
        found = await discover(ctx, [liar.url], role="seed", verdicts=True)
        assert found.verdicts == [genuine]  # verified, on the page's peers, once
        await find_seeds(ctx, [liar.url], AskRequest("hi", model="demo"), store, AskEvents())
        assert store.verdicts(seed.peer_id) == [genuine] and store.verdict_seeds() == [seed.peer_id]
    finally:
        store.close()
        ctx.destroy(linger=0)


async def test_duplicates_first_wins(launch: Callable[..., Awaitable[Running]]) -> None:
    verifier, seed = Identity.generate(), Identity.generate()
    tracker = await launch()
    ctx = new_context()
    client = TrackerClient(ctx, tracker.url)
    try:
        await announce(ctx, tracker.url, seed)
        first, second = verdict(verifier, seed, credibility=0.9), verdict(verifier, seed, credibility=0.0)
        answers = [await client._request("verdict", {"verdict": v.to_wire()}, frozenset({"verdict_ok"}))
                   for v in (first, first, second)]
        assert [(a.kind, a["stored"]) for a in answers] == [("verdict_ok", True), ("verdict_ok", False), ("verdict_ok", False)]
        assert await served(ctx, tracker.url) == [first]  # an equivocating verifier cannot rewrite the epoch
        assert await submit_verdict(ctx, [tracker.url], second) == {}  # held already: taken, not an error
    finally:
        ctx.destroy(linger=0)


# ------------------------------------------------------------------ bounds


def test_bounds_per_verifier_per_seed_and_in_all() -> None:
    now = [1000.0]
    table = VerdictTable(lambda: now[0], max_verdicts=7, max_verifiers=2, epochs_held=3, keep_s=100.0)
    a, b, c, seed, seed2 = (Identity.generate() for _ in range(5))
    for epoch in range(1, 6):
        assert table.accept(verdict(a, seed, epoch))
    held = table.by_seed[seed.peer_id][a.peer_id]
    assert sorted(held) == [3, 4, 5] and table.count == 3  # the newest epochs_held per (verifier, seed)
    with pytest.raises(Rejected) as older:
        table.accept(verdict(a, seed, 2))
    assert older.value.code == "capacity"
    assert table.accept(verdict(b, seed, 5))
    with pytest.raises(Rejected) as third:  # at most max_verifiers verifiers on one seed
        table.accept(verdict(c, seed, 5))
    assert third.value.code == "capacity"
    for epoch in (1, 2, 3):
        table.accept(verdict(c, seed2, epoch))
    assert table.count == 7
    with pytest.raises(Rejected) as full:  # the overall cap refuses a new verdict ...
        table.accept(verdict(b, seed, 6))
    assert full.value.code == "capacity"
    assert table.accept(verdict(c, seed2, 4)) and table.count == 7  # ... not one that replaces its own oldest
    # served newest first for every verifier and seed before any older one, within the byte budget
    size = len(json.dumps(verdict(a, seed, 9).to_wire(), separators=(",", ":"))) + 1
    served = table.for_seeds([seed.peer_id, seed2.peer_id], budget=3 * size)
    got = [(d["verifier"], d["seed"], d["epoch"]) for d in served]
    assert sorted(got[:2]) == sorted([(a.peer_id, seed.peer_id, 5), (b.peer_id, seed.peer_id, 5)])
    assert got[2:] == [(c.peer_id, seed2.peer_id, 4)]
    assert table.for_seeds([]) == []
    now[0] += 100.0  # kept keep_s after arrival, then forgotten (a stale verifier's slot frees)
    assert table.expire() == 7 and table.count == 0 and table.by_seed == {}
    assert table.accept(verdict(c, seed, 5))


async def test_a_tracker_restart_keeps_the_verdicts(launch: Callable[..., Awaitable[Running]], tmp_path: Path) -> None:
    verifier, dropped, seed = Identity.generate(), Identity.generate(), Identity.generate()
    identity, db = Identity.generate(), tmp_path / "tracker.db"
    tracker = await launch(db, identity)
    ctx = new_context()
    try:
        await announce(ctx, tracker.url, seed)
        kept, other = verdict(verifier, seed, 4, 0.25), verdict(dropped, seed, 4, 0.75)
        assert await submit_verdict(ctx, [tracker.url], kept) == {}
        assert await submit_verdict(ctx, [tracker.url], other) == {}
        await tracker.stop()
        # restarted with an admitted list: the verdicts of a verifier no longer admitted are dropped
        again = await launch(db, identity, verifiers=frozenset({verifier.peer_id}))
        assert again.service.loaded_verdicts == 1
        assert await served(ctx, again.url) == [kept]
        await again.stop()
        third = await launch(db, identity)
        assert third.service.loaded_verdicts == 1  # the dropped one was deleted from disk too
    finally:
        ctx.destroy(linger=0)


# ------------------------------------------------------------------ what clients make of them


async def test_median_framing_still_needs_a_majority_of_verifiers(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    honest = [Identity.generate() for _ in range(2)]
    liars = [Identity.generate() for _ in range(2)]
    victim, framed = Identity.generate(), Identity.generate()
    tracker = await launch()
    ctx = new_context()
    try:
        await announce(ctx, tracker.url, victim, framed)
        for epoch in range(1, 5):
            # victim: one liar of three says C = 0; framed: two liars of three do
            for seed, voters in ((victim, [*honest, liars[0]]), (framed, [honest[0], *liars])):
                for voter in voters:
                    credibility = 0.0 if voter in liars else 0.95
                    assert await submit_verdict(ctx, [tracker.url], verdict(voter, seed, epoch, credibility)) == {}
        trusted = {v.peer_id for v in (*honest, *liars)}
        store = Store.open(gtorrent_home, trusted)
        try:
            await find_seeds(ctx, [tracker.url], AskRequest("hi", model="demo"), store, AskEvents())
            assert len(store.verdicts(victim.peer_id)) == 12 and len(store.verdicts(framed.peer_id)) == 12
            assert store.standing(victim.peer_id).state == "trusted"
            assert store.standing(framed.peer_id).state == "untrusted"
        finally:
            store.close()
    finally:
        ctx.destroy(linger=0)


async def test_client_verifiers_choose_whose_verdicts_count(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    mine, theirs, seed = Identity.generate(), Identity.generate(), Identity.generate()
    tracker = await launch()  # admits any verifier
    ctx = new_context()
    try:
        await announce(ctx, tracker.url, seed)
        for epoch in range(1, 5):
            assert await submit_verdict(ctx, [tracker.url], verdict(theirs, seed, epoch, 0.0)) == {}
        store = Store.open(gtorrent_home, {mine.peer_id})  # --verifier MINE
        try:
            ranked = (await find_seeds(ctx, [tracker.url], AskRequest("hi", model="demo"), store, AskEvents()))[1]
            assert [r.peer_id for r in ranked] == [seed.peer_id]  # theirs do not count here: unverified
            assert store.standing(seed.peer_id).state == "unverified" and len(store.verdicts(seed.peer_id)) == 4
        finally:
            store.close()
    finally:
        ctx.destroy(linger=0)


async def test_a_seed_made_untrusted_through_the_tracker_gets_no_asks(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    verifier, honest, cheater = Identity.generate(), Identity.generate(), Identity.generate()
    tracker = await launch(verifiers=frozenset({verifier.peer_id}))
    ctx = new_context()
    store = Store.open(gtorrent_home)
    try:
        await announce(ctx, tracker.url, honest, cheater)
        for epoch in range(1, 4):
            for seed, credibility in ((honest, 0.95), (cheater, 0.0)):
                assert await submit_verdict(ctx, [tracker.url], verdict(verifier, seed, epoch, credibility)) == {}
        for _ in range(5):  # every ranking leaves the cheater out
            _, ranked = await find_seeds(ctx, [tracker.url], AskRequest("hi", model="demo"), store, AskEvents())
            assert [r.peer_id for r in ranked] == [honest.peer_id]
        assert store.standing(cheater.peer_id).state == "untrusted"
    finally:
        store.close()
        ctx.destroy(linger=0)


async def test_every_seed_untrusted_means_no_seed(launch: Callable[..., Awaitable[Running]], gtorrent_home: Path) -> None:
    verifier, cheater = Identity.generate(), Identity.generate()
    tracker = await launch()
    ctx = new_context()
    store = Store.open(gtorrent_home)
    try:
        await announce(ctx, tracker.url, cheater)
        for epoch in range(1, 4):
            assert await submit_verdict(ctx, [tracker.url], verdict(verifier, cheater, epoch, 0.0)) == {}
        with pytest.raises(NoSeedError, match="untrusted"):
            await find_seeds(ctx, [tracker.url], AskRequest("hi", model="demo"), store, AskEvents())
    finally:
        store.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(90)
def test_gtorrent_peers_shows_a_seed_untrusted_through_tracker_verdicts(cli: Any, tmp_path: Path) -> None:
    verifier, stranger, honest, cheater = (Identity.generate() for _ in range(4))
    proc = Proc(["tracker", "--bind", "tcp://127.0.0.1:0", "--verifier", verifier.peer_id], tmp_path / "tracker-home")
    try:
        url = proc.wait_for(r"tracker (tcp://\S+) .*verdicts from 1 verifiers").group(1)

        async def feed() -> dict[str, str]:
            ctx = new_context()
            try:
                await announce(ctx, url, honest, cheater)
                errors: dict[str, str] = {}
                for epoch in range(1, 4):
                    for seed, credibility in ((honest, 0.95), (cheater, 0.0)):
                        errors |= await submit_verdict(ctx, [url], verdict(verifier, seed, epoch, credibility))
                errors |= await submit_verdict(ctx, [url], verdict(stranger, honest, 9, 0.0))
                return errors
            finally:
                ctx.destroy(linger=0)

        errors = asyncio.run(feed())
        assert list(errors) == [url] and "not admitted" in errors[url]
        shown = cli("peers", "--tracker", url, "--json")
        assert shown.code == 0, shown
        states = {row["peer_id"]: row["state"] for row in json.loads(shown.out)}
        assert states[cheater.peer_id] == "untrusted" and states[honest.peer_id] == "trusted"
        table = cli("peers", "--tracker", url)
        assert table.code == 0 and "untrusted" in table.out and "1 untrusted" in table.out
        # --verifier on the client: a verifier named there that has said nothing leaves both unverified
        mine = cli("peers", "--tracker", url, "--json", "--verifier", stranger.peer_id)
        assert {row["state"] for row in json.loads(mine.out) if row["peer_id"] in states} == {"unverified"}
        bad = cli("peers", "--tracker", url, "--verifier", "nope")
        assert bad.code == 2 and "not a verifier's peer id" in bad.err
    finally:
        proc.terminate()
