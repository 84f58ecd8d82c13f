"""Verdicts through the trackers (issue 8 item 3; docs/PROTOCOL.md §12): real trackers on 127.0.0.1 with
real SQLite files. A tracker takes a verdict only verified, from a verifier it admits that never
equivocated, about an epoch neither in the future nor stale and a model the seed announces, one per
(verifier, seed, model, epoch), within its bounds and rates, keeps it across a restart and serves it
with the queries that ask for it, with the proofs of equivocation it holds; a client believes no
tracker: it re-verifies every verdict and proof, keeps only those on the records served, and stores
them before it ranks seeds, so a seed made untrusted by its verifiers gets no asks and shows
`untrusted` in `gtorrent peers`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gtorrent.asker import AskEvents, AskRequest, NoSeedError, find_seeds
from gtorrent.discovery import TrackerClient, admitted_by_majority, discover, submit_verdict
from gtorrent.identity import Identity
from gtorrent.protocol import VERDICT_MAX_AGE_S, Equivocation, ModelInfo, PeerRecord, Verdict
from gtorrent.store import Store
from gtorrent.tracker import Rejected, TrackerService, VerdictTable
from gtorrent.transport import new_context

from .procs import Proc

pytestmark = pytest.mark.timeout(60)

MODEL = ModelInfo("cd" * 32, "demo", 512)
OTHER_MODEL = ModelInfo("ab" * 32, "other", 512)
EVIDENCE = "ef" * 32


def seed_record(identity: Identity, seq: int = 1, models: tuple[ModelInfo, ...] = (MODEL,)) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=models, seq=seq,
                           expires=time.time() + 120)


def verdict(verifier: Identity, seed: Identity | str, epoch: int = 1, credibility: float = 0.9,
            model: ModelInfo = MODEL, **timing: Any) -> Verdict:
    peer = seed if isinstance(seed, str) else seed.peer_id
    return Verdict.sign(verifier, seed=peer, model_id=model.model_id, epoch=epoch, credibility=credibility,
                        challenges=3, evidence=EVIDENCE, **timing)


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


async def test_duplicates_are_taken_once_and_an_equivocation_is_proven_and_served(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    liar, honest, seed = Identity.generate(), Identity.generate(), Identity.generate()
    tracker = await launch()
    ctx = new_context()
    client = TrackerClient(ctx, tracker.url)
    try:
        await announce(ctx, tracker.url, seed)
        first, second = verdict(liar, seed, credibility=0.9), verdict(liar, seed, credibility=0.0)
        fair = verdict(honest, seed, credibility=0.8)
        assert await submit_verdict(ctx, [tracker.url], fair) == {}
        answers = [await client._request("verdict", {"verdict": v.to_wire()}, frozenset({"verdict_ok"}))
                   for v in (first, first, second, verdict(liar, seed, epoch=2))]
        assert [(a.kind, a.get("stored", a.get("code"))) for a in answers] == [
            ("verdict_ok", True), ("verdict_ok", False), ("error", "equivocated"), ("error", "equivocated")]
        # the proof holds both signed verdicts; the liar's verdicts are no longer held or served
        assert set(tracker.service.verdicts.proofs) == {liar.peer_id}
        found = await discover(ctx, [tracker.url], role="seed", verdicts=True)
        assert found.verdicts == [fair]
        assert found.equivocations == [Equivocation(first, second)]
        # a client stores the proof and drops the liar's verdicts, whoever else still serves them
        store = Store.open(gtorrent_home)
        try:
            store.add_verdicts([first])  # held from an earlier ask
            await find_seeds(ctx, [tracker.url], AskRequest("hi", model="demo"), store, AskEvents())
            assert store.equivocators() == {liar.peer_id}
            assert store.verdicts(seed.peer_id) == [fair]
        finally:
            store.close()
    finally:
        ctx.destroy(linger=0)


async def test_a_client_finds_an_equivocation_across_two_trackers(
    launch: Callable[..., Awaitable[Running]],
) -> None:
    # each tracker holds one of the two verdicts, so neither can tell; the client that reads both can
    liar, seed = Identity.generate(), Identity.generate()
    one, two = await launch(), await launch()
    ctx = new_context()
    try:
        await announce(ctx, one.url, seed)
        await announce(ctx, two.url, seed)
        first, second = verdict(liar, seed, credibility=0.9), verdict(liar, seed, credibility=0.0)
        assert await submit_verdict(ctx, [one.url], first) == {}
        assert await submit_verdict(ctx, [two.url], second) == {}
        found = await discover(ctx, [one.url, two.url], role="seed", verdicts=True)
        assert found.verdicts == []
        assert [proof.verifier for proof in found.equivocations] == [liar.peer_id]
        assert {found.equivocations[0].first, found.equivocations[0].second} == {first, second}
    finally:
        ctx.destroy(linger=0)


async def test_time_bounds_and_models_at_the_tracker(launch: Callable[..., Awaitable[Running]]) -> None:
    verifier, seed = Identity.generate(), Identity.generate()
    tracker = await launch()
    ctx = new_context()
    client = TrackerClient(ctx, tracker.url)
    try:
        await TrackerClient(ctx, tracker.url).announce(seed_record(seed, models=(MODEL, OTHER_MODEL)))
        now_ms = int(time.time() * 1000)
        future = verdict(verifier, seed, epoch=5, epoch_start_ms=now_ms + 3_600_000)
        long_ago = now_ms - int(VERDICT_MAX_AGE_S * 1000) - 3_600_000
        stale = verdict(verifier, seed, epoch=6, epoch_start_ms=long_ago)
        unannounced = verdict(verifier, seed, model=ModelInfo("00" * 32, "nothing", 512))
        codes = []
        for doc in (future, stale, unannounced):
            reply = await client._request("verdict", {"verdict": doc.to_wire()}, frozenset({"verdict_ok"}))
            codes.append(reply.get("code"))
        assert codes == ["invalid", "stale", "invalid"]
        # one verdict per model: two models of one seed, one epoch, one verifier are two verdicts
        both = [verdict(verifier, seed, epoch=7, model=model) for model in (MODEL, OTHER_MODEL)]
        for given in both:
            assert await submit_verdict(ctx, [tracker.url], given) == {}
        assert {v.key: v for v in await served(ctx, tracker.url)} == {v.key: v for v in both}
        # and the client refuses what a tracker should not have served: future or stale verdicts
        tracker.service.verdicts.for_seeds = lambda seeds, budget=0: [  # type: ignore[method-assign]
            future.to_wire(), stale.to_wire(), both[0].to_wire()]
        assert await served(ctx, tracker.url) == [both[0]]
    finally:
        ctx.destroy(linger=0)


# ------------------------------------------------------------------ bounds


def test_bounds_per_verifier_per_seed_and_in_all() -> None:
    now = [time.time()]
    table = VerdictTable(lambda: now[0], max_verdicts=7, max_verifiers=2, epochs_held=3, keep_s=100.0)
    a, b, c, seed, seed2 = (Identity.generate() for _ in range(5))
    for epoch in range(1, 6):
        assert table.accept(verdict(a, seed, epoch))
    held = table.by_seed[seed.peer_id][a.peer_id][MODEL.model_id]
    assert sorted(held) == [3, 4, 5] and table.count == 3  # the newest epochs_held per verifier, seed, model
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
    assert table.expire() == 7 and table.count == 0 and table.by_seed == {} == table.per_verifier == table.seeds_of
    assert table.accept(verdict(c, seed, 5))


def test_serving_verdicts_costs_what_the_answer_holds_not_the_table() -> None:
    """Review fix: `for_seeds` ranked every verdict held on a page's seeds before taking ~100 of them, so
    one `query {verdicts: true}` (free to send) cost the tracker ~0.4 s of CPU with the table full. Now
    it walks rank by rank and stops at the budget: the epochs of a group held beyond what is served are
    never looked at, and the order is the same (newest of each seed, verifier and model first)."""
    from gtorrent.tracker import _HeldVerdict

    looked = [0]

    class Epochs(dict[int, _HeldVerdict]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            looked[0] += 1
            return super().__iter__()

    table = VerdictTable()
    sample = verdict(Identity.generate(), Identity.generate())
    size = len(json.dumps(sample.to_wire(), separators=(",", ":"))) + 1
    seeds = [f"seed{i:03d}" for i in range(300)]
    for seed in seeds:
        for number in range(12):
            table.by_seed.setdefault(seed, {})[f"verifier{number:02d}"] = {
                MODEL.model_id: Epochs({epoch: _HeldVerdict(sample, size, 0.0, 1e12) for epoch in range(8)})}
    served = table.for_seeds(seeds)
    assert len(served) == 48 * 1024 // size
    assert looked[0] < 200, looked[0]  # HEAD: every one of the 3,600 groups
    # the same order as ranking everything: rank, then the seed's place, then verifier and model ids
    small = VerdictTable()
    a, b = sorted((Identity.generate() for _ in range(2)), key=lambda i: i.peer_id)
    one, two = Identity.generate(), Identity.generate()
    for who, seed, epoch, model in ((b, one, 3, MODEL), (a, one, 3, OTHER_MODEL), (a, one, 2, OTHER_MODEL),
                                    (a, one, 4, MODEL), (b, two, 1, MODEL), (b, one, 1, MODEL)):
        small.accept(verdict(who, seed, epoch, model=model), rated=False)
    got = [(d["verifier"], d["seed"], d["model_id"], d["epoch"]) for d in small.for_seeds([two.peer_id, one.peer_id])]
    models = sorted([MODEL.model_id, OTHER_MODEL.model_id])
    first = [(a.peer_id, one.peer_id, m, {MODEL.model_id: 4, OTHER_MODEL.model_id: 3}[m]) for m in models]
    assert got == [(b.peer_id, two.peer_id, MODEL.model_id, 1), *first, (b.peer_id, one.peer_id, MODEL.model_id, 3),
                   (a.peer_id, one.peer_id, OTHER_MODEL.model_id, 2), (b.peer_id, one.peer_id, MODEL.model_id, 1)]


def test_one_verifier_cannot_fill_the_table() -> None:
    # "no --verifier" admits any verifier: one identity is bounded on its own, whatever seeds it names
    table = VerdictTable(max_per_verifier=5, max_verdicts=100)
    hog = Identity.generate()
    seeds = [Identity.generate().peer_id for _ in range(8)]
    for seed in seeds[:5]:
        assert table.accept(verdict(hog, seed))
    with pytest.raises(Rejected) as full:
        table.accept(verdict(hog, seeds[5]))
    assert full.value.code == "capacity" and table.per_verifier == {hog.peer_id: 5}
    assert table.accept(verdict(Identity.generate(), seeds[5]))  # others are not held back by it


def test_rates_per_verifier_and_in_all_bound_a_flood_of_fresh_identities() -> None:
    now = [time.time()]
    table = VerdictTable(lambda: now[0], verifier_rate=(1.0, 3.0), total_rate=(10.0, 20.0))
    seeds = [Identity.generate().peer_id for _ in range(40)]
    noisy = Identity.generate()
    for seed in seeds[:3]:
        assert table.accept(verdict(noisy, seed))  # its burst
    with pytest.raises(Rejected) as slow_down:
        table.accept(verdict(noisy, seeds[3]))
    assert slow_down.value.code == "rate"
    now[0] += 1.0  # one more per second
    assert table.accept(verdict(noisy, seeds[3]))
    # fresh identities, one verdict each: the shared bucket (full again at 20 after the second, less the
    # one noisy just took) runs dry
    taken, refused = 0, 0
    for seed in seeds[4:]:
        try:
            taken += table.accept(verdict(Identity.generate(), seed))
        except Rejected as exc:
            assert exc.code == "rate"
            refused += 1
    assert (taken, refused) == (19, 17) and table.count == 4 + 19
    # review fix: the refused fresh identities leave no bucket behind (on HEAD each kept one until the
    # next sweep, so a flood while the shared bucket was empty grew the table without bound)
    assert len(table.buckets) == 1 + 19
    now[0] += 2.0  # refilled at 10/s: some room again
    assert table.accept(verdict(Identity.generate(), seeds[-1], epoch=2))
    # a refused verdict costs its sender's bucket nothing, and a refilled bucket is forgotten
    now[0] += 60.0
    table.expire()
    assert table.buckets == {}


def test_proofs_are_bounded_and_those_on_the_page_come_first() -> None:
    now = [time.time()]
    table = VerdictTable(lambda: now[0], max_proofs=20)
    seeds = [Identity.generate().peer_id for _ in range(30)]
    liars = []
    for seed in seeds:  # 30 equivocators, one a second
        now[0] += 1.0
        liar = Identity.generate()
        liars.append(liar.peer_id)
        assert table.accept(verdict(liar, seed, credibility=0.9))
        with pytest.raises(Rejected) as caught:
            table.accept(verdict(liar, seed, credibility=0.1))
        assert caught.value.code == "equivocated"
    assert list(table.proofs) == liars[10:] and table.count == 0  # the oldest went; no liar's verdict held
    # an answer: the proofs about the page's seeds first, then the newest, at most 16 (and the byte budget)
    served = table.proofs_for([seeds[12], seeds[3]])
    assert len(served) == 16 and served[0][0]["seed"] == seeds[12]  # seeds[3]'s proof was pushed out
    assert [proof[0]["verifier"] for proof in served[1:]] == liars[29:14:-1]
    one = len(json.dumps(served[0], separators=(",", ":"))) + 1
    assert len(table.proofs_for([], budget=2 * one)) == 2
    now[0] += 31 * 86_400.0  # PROOF_KEEP_S
    table.expire()
    assert table.proofs == {}


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
        liar = Identity.generate()
        assert await submit_verdict(ctx, [tracker.url], verdict(liar, seed, 4, 0.9)) == {}
        refused = await submit_verdict(ctx, [tracker.url], verdict(liar, seed, 4, 0.1))
        assert "proof kept" in refused[tracker.url]
        await tracker.stop()
        # restarted with an admitted list: the verdicts of a verifier no longer admitted are dropped
        again = await launch(db, identity, verifiers=frozenset({verifier.peer_id, liar.peer_id}))
        assert again.service.loaded_verdicts == 1
        assert await served(ctx, again.url) == [kept]
        # the proof survived the restart: still served, and the liar is still refused
        assert set(again.service.verdicts.proofs) == {liar.peer_id}
        refused = await submit_verdict(ctx, [again.url], verdict(liar, seed, 5))
        assert "two different verdicts" in refused[again.url]
        await again.stop()
        third = await launch(db, identity)
        assert third.service.loaded_verdicts == 1  # the dropped one was deleted from disk too
        assert set(third.service.verdicts.proofs) == {liar.peer_id}
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
            # and are not even kept: a flood of verdicts from identities the client does not trust costs nothing
            assert store.standing(seed.peer_id).state == "unverified" and store.verdicts(seed.peer_id) == []
        finally:
            store.close()
    finally:
        ctx.destroy(linger=0)


def test_admitted_by_majority_counts_a_verifier_only_where_most_trackers_name_it() -> None:
    """Pure rule (discovery.admitted_by_majority): one tracker is believed as it is; with more, a verifier
    counts only when more than half of those that answered name it, and an open tracker (None) names none
    of its own but makes the client trust any verifier when more than half of them are open."""
    a, b, rogue = "a" * 8, "b" * 8, "r" * 8
    assert admitted_by_majority([None]) is None  # one open tracker: any verifier, as before
    assert admitted_by_majority([frozenset({a, rogue})]) == {a, rogue}  # one tracker's list, as it is
    assert admitted_by_majority([frozenset({a}), frozenset({a}), frozenset({a, rogue})]) == {a}
    assert admitted_by_majority([None, frozenset({a, b}), frozenset({a, rogue})]) == {a}
    assert admitted_by_majority([None, None, frozenset({rogue})]) is None
    assert admitted_by_majority([frozenset({a}), frozenset({a, rogue})]) == {a}  # two: both must name it
    assert admitted_by_majority([None, frozenset({rogue})]) == frozenset()  # half is no majority: none counts
    assert admitted_by_majority([frozenset({a}), frozenset({b}), None, None]) == frozenset()


async def test_one_lying_tracker_of_three_cannot_make_its_own_verifiers_count(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    """On HEAD a client with no --verifier trusted the union of its trackers' admitted lists, so a liar
    among three trackers admitted four verifiers of its own, whose C = 0 outvoted (median) the three
    honest verifiers' 0.95 and made an honest seed untrusted, and whose verdicts were stored. Now a
    verifier counts only when more than half of the trackers that answered admit it."""
    honest = [Identity.generate() for _ in range(3)]
    rogues = [Identity.generate() for _ in range(4)]
    seed, quiet = Identity.generate(), Identity.generate()
    admitted = frozenset(v.peer_id for v in honest)
    trackers = [await launch(verifiers=admitted), await launch(verifiers=admitted),
                await launch(verifiers=admitted | {r.peer_id for r in rogues})]
    urls = [t.url for t in trackers]
    liar = trackers[2].url
    ctx = new_context()
    store = Store.open(gtorrent_home)  # no --verifier: the trackers say
    try:
        for url in urls:
            await announce(ctx, url, seed, quiet)
        for epoch in range(1, 4):
            for verifier in honest:
                assert await submit_verdict(ctx, urls, verdict(verifier, seed, epoch, 0.95)) == {}
            for rogue in rogues:  # the liar takes its own verifiers' frame-ups, on both seeds
                for victim in (seed, quiet):
                    assert await submit_verdict(ctx, [liar], verdict(rogue, victim, epoch, 0.0)) == {}
        found = await discover(ctx, urls, role="seed", verdicts=True)
        assert sorted(found.reached) == sorted(urls) and found.admitted == admitted
        _, ranked = await find_seeds(ctx, urls, AskRequest("hi", model="demo"), store, AskEvents())
        assert store.trusted_verifiers == set(admitted)
        assert {v.verifier for v in store.verdicts(seed.peer_id)} == set(admitted)  # no rogue's is stored
        assert store.verdicts(quiet.peer_id) == []
        assert store.standing(seed.peer_id).state == "trusted"  # per the honest verifiers
        assert store.standing(quiet.peer_id).state == "unverified"  # only the rogues judged it: no one did
        assert seed.peer_id in {r.peer_id for r in ranked}
    finally:
        store.close()
        ctx.destroy(linger=0)


async def test_two_trackers_of_three_admitting_a_verifier_make_it_count(
    launch: Callable[..., Awaitable[Running]], gtorrent_home: Path,
) -> None:
    """Two of three trackers naming a verifier make it count; one naming it does not; an open tracker
    (no --verifier) names none of its own, and two open trackers of three make any verifier count."""
    counted, single, seed = Identity.generate(), Identity.generate(), Identity.generate()
    open_tracker = await launch()
    named = await launch(verifiers=frozenset({counted.peer_id}))
    both = await launch(verifiers=frozenset({counted.peer_id, single.peer_id}))
    urls = [open_tracker.url, named.url, both.url]
    ctx = new_context()
    store = Store.open(gtorrent_home)
    try:
        for url in urls:
            await announce(ctx, url, seed)
        for epoch in range(1, 4):
            assert await submit_verdict(ctx, urls, verdict(counted, seed, epoch, 0.95)) == {}
            errors = await submit_verdict(ctx, urls, verdict(single, seed, epoch, 0.0))
            assert list(errors) == [named.url]  # not admitted there
        assert (await discover(ctx, urls, role="seed")).admitted == {counted.peer_id}
        await find_seeds(ctx, urls, AskRequest("hi", model="demo"), store, AskEvents())
        assert store.trusted_verifiers == {counted.peer_id}
        assert {v.verifier for v in store.verdicts(seed.peer_id)} == {counted.peer_id}
        assert store.standing(seed.peer_id).state == "trusted"
        second_open = await launch()
        await announce(ctx, second_open.url, seed)
        found = await discover(ctx, [open_tracker.url, second_open.url, named.url], role="seed")
        assert found.admitted is None  # more than half admit any verifier: any counts, as with one open tracker
    finally:
        store.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(90)
def test_gtorrent_peers_and_peers_peer_id_count_the_majoritys_verifiers(cli: Any, tmp_path: Path) -> None:
    """The list and one peer's history count the same verifiers (node.TrustSet): with three trackers, one
    of which admits two rogue verifiers that frame an honest seed, both show the seed trusted on the
    honest verifier's verdicts and say that only the verifier most trackers admit counts."""
    verifier, seed = Identity.generate(), Identity.generate()
    rogues = [Identity.generate() for _ in range(2)]
    honest_flags = ["--verifier", verifier.peer_id]
    liar_flags = [*honest_flags, *(flag for r in rogues for flag in ("--verifier", r.peer_id))]
    procs = [Proc(["tracker", "--bind", "tcp://127.0.0.1:0", *flags], tmp_path / f"tracker-{i}")
             for i, flags in enumerate((honest_flags, honest_flags, liar_flags))]
    try:
        urls = [p.wait_for(r"tracker (tcp://\S+) .*verdicts from \d+ verifiers").group(1) for p in procs]

        async def feed() -> dict[str, str]:
            ctx = new_context()
            try:
                errors: dict[str, str] = {}
                for url in urls:
                    await announce(ctx, url, seed)
                for epoch in range(1, 4):
                    errors |= await submit_verdict(ctx, urls, verdict(verifier, seed, epoch, 0.95))
                    for rogue in rogues:
                        errors |= await submit_verdict(ctx, urls[2:], verdict(rogue, seed, epoch, 0.0))
                return errors
            finally:
                ctx.destroy(linger=0)

        assert asyncio.run(feed()) == {}
        flags = [flag for url in urls for flag in ("--tracker", url)]
        listed = cli("peers", *flags, "--json")
        assert listed.code == 0, listed
        row = next(r for r in json.loads(listed.out) if r["peer_id"] == seed.peer_id)
        assert row["state"] == "trusted" and {v["verifier"] for v in row["verdicts"]} == {verifier.peer_id}
        history = cli("peers", seed.peer_id, *flags, "--json")
        assert history.code == 0, history
        doc = json.loads(history.out)
        assert doc["state"] == "trusted" and doc["trust"]["source"] == "trackers"
        assert doc["trust"]["verifiers"] == [verifier.peer_id] and doc["untrusted_verifiers"] == []
        assert {v["verifier"] for v in doc["verdicts"]} == {verifier.peer_id}  # the rogues' were never stored
        shown = " ".join(cli("peers", seed.peer_id, *flags).out.split())  # as wrapped to the console width
        assert "verdicts of the 1 verifier(s) the trackers admit count" in shown
        assert "more than half of the trackers that answered" in shown
    finally:
        for proc in procs:
            proc.terminate()


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
