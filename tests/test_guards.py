"""Guards (issue 11, item 3): the first hops of private asks come from a small set kept in the store,
chosen once with the relay rules, kept across runs, rotated after weeks, replaced when they leave, and
not replaced when they merely fail. Real stores, real services on loopback for the asks."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from gtorrent.asker import AskRequest
from gtorrent.guards import (
    GUARD_COUNT,
    GUARD_UNLISTED_S,
    SPARE_GUARDS,
    Guard,
    choose_guards,
    held_limit,
    rotation_time,
    set_size,
)
from gtorrent.identity import Identity
from gtorrent.private import ask_private, relay_view
from gtorrent.protocol import PeerRecord
from gtorrent.routing import RelayRules, marks_of, network_of
from gtorrent.store import Store

from .test_private import PROMPT, Swarm

pytestmark = pytest.mark.timeout(120)


def remote(address: str) -> PeerRecord:
    return PeerRecord.sign(Identity.generate(), endpoint=f"tcp://{address}:7000", roles=("relay",), seq=1,
                           expires=time.time() + 60)


def test_guards_are_one_per_machine_and_network_and_old_enough() -> None:
    pool = [remote(f"203.{n}.{i}.1") for n in range(10) for i in range(3)]  # 10 networks of 3
    young = [remote(f"192.{n}.0.1") for n in range(10)]
    copy = PeerRecord.sign(Identity.generate(), endpoint=pool[0].endpoint, roles=("relay",), seq=1,
                           expires=time.time() + 60)  # another identity on pool[0]'s endpoint
    ages = {r.peer_id: 7200.0 for r in [*pool, copy]} | {r.peer_id: 10.0 for r in young}
    held = [pool[0]]
    for draw in range(30):
        chosen = choose_guards([*pool, *young, copy], held, 8, random.Random(draw), listed_s=ages)
        assert len(chosen) == 7  # topped up to 8 held
        everyone = [*held, *chosen]
        networks = [network_of(r) for r in everyone]
        assert len(set(networks)) == len(networks)  # pool[0]'s network is taken: none of its neighbours
        assert not {r.peer_id for r in chosen} & {r.peer_id for r in [*young, copy]}
        for i, one in enumerate(everyone):
            assert all(not marks_of(one) & marks_of(other) for other in everyone[i + 1 :])
    # only 10 networks: at most 10 guards, whatever is wanted; and none once the set is full
    assert len(choose_guards(pool, [], 16, random.Random(0), listed_s=ages)) == 10
    assert choose_guards(pool, pool[:8], 8, random.Random(0), listed_s=ages) == []
    # on a LAN, with the network rule lifted, one network gives as many as wanted
    lan = [remote(f"10.1.0.{i}") for i in range(1, 20)]
    lifted = RelayRules(distinct_networks=False)
    assert len(choose_guards(lan, [], 8, random.Random(0), listed_s={r.peer_id: 7200.0 for r in lan}, rules=lifted)) == 8


def test_the_store_keeps_guards_in_their_order_and_bounds_the_set(tmp_path: Path) -> None:
    records = [remote(f"203.{n}.0.1") for n in range(12)]
    now = time.time()
    rng = random.Random(5)
    first, second = Store(tmp_path / "gtorrent.db"), Store(tmp_path / "gtorrent.db")  # two asks on one home
    first.add_guards([Guard(r, now, rotation_time(now, rng)) for r in records[:6]], limit=8)
    second.add_guards([Guard(r, now, rotation_time(now, rng)) for r in records[6:]], limit=8)  # chose its own
    held = first.guards()
    assert [g.peer_id for g in held] == [r.peer_id for r in records[:8]]  # the order chosen, not peer-id order
    first.close()
    second.close()
    again = Store(tmp_path / "gtorrent.db")  # another run
    assert [g.peer_id for g in again.guards()] == [r.peer_id for r in records[:8]]
    for guard in again.guards():
        assert 21 * 86400 <= guard.rotate_at - guard.chosen_at <= 42 * 86400
    again.close()


async def test_guards_persist_across_runs_and_are_the_first_hops(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=14)
    runs: list[tuple[list[str], set[str]]] = []
    for _ in range(3):
        store = Store.open(tmp_path)  # a fresh process would open the same file
        result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=4), store)
        guards = [g.peer_id for g in store.guards()]
        runs.append((guards, {route[0] for route in result.route}))
        store.close()
    guards = runs[0][0]
    assert len(guards) == set_size(4) == GUARD_COUNT + SPARE_GUARDS
    seed = swarm.seeds[0].identity.peer_id  # seeds relay too: a guard may be the seed, never its own first hop
    for held, first_hops in runs:
        assert held == guards  # the same set, in the same order, every run
        assert first_hops == set([g for g in guards if g != seed][:4])  # spares only when those cannot serve


async def test_a_dead_guard_is_skipped_for_a_spare_and_not_replaced(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=14)
    store = Store.open(tmp_path)
    await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=4), store)
    guards = [g.peer_id for g in store.guards()]
    dead = next(g for g in guards if g in swarm.relays)  # the first guard that is not the seed (seeds relay too)
    server, service = swarm.relays[dead]  # dies, but stays listed
    service.close()
    server.close()
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=4), store)
    assert result.text == swarm.local(4) and result.privacy is not None and not result.privacy["degraded"]
    first_hops = {route[0] for route in result.route}
    assert dead not in first_hops and first_hops <= set(guards)
    assert [g.peer_id for g in store.guards()] == guards  # failing is not leaving: no new draw
    store.close()


async def test_guards_rotate_and_leave(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=14)
    store = Store.open(tmp_path)
    await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=4), store)
    held = [g for g in store.guards() if g.peer_id in swarm.relays]  # not the seed (seeds relay too)
    now = time.time()
    due, gone, away = held[0], held[1], held[2]
    # one due for rotation, one unlisted for more than a day, one that just stopped announcing
    store.drop_guards([due.peer_id])
    store.add_guards([Guard(due.record, now - 50 * 86400, now - 1)], limit=set_size(4))
    store.update_guards([], [gone.peer_id], now=now - GUARD_UNLISTED_S - 60)
    await swarm.announcers[away.peer_id].stop()
    view = await relay_view(swarm.ctx, [swarm.url], store, RelayRules(), paths=4)
    after = {g.peer_id: g for g in store.guards()}
    for left in (due, gone):  # replaced (a fresh draw may pick the same relay again, as a new choice)...
        assert left.peer_id not in after or after[left.peer_id].chosen_at >= now
    listed = [g for g in after.values() if g.unlisted_since is None]
    assert len(listed) == set_size(4)  # ...by fresh ones, and the unlisted one made up for
    assert after[away.peer_id].unlisted_since is not None  # kept for now (a restart, a tracker blip), unused
    assert view.guards is not None and away.peer_id not in {r.peer_id for r in view.guards}
    # it comes back: listed again, used again
    await swarm.announcers[away.peer_id].announce()
    view = await relay_view(swarm.ctx, [swarm.url], store, RelayRules(), paths=4)
    assert store.guards()[[g.peer_id for g in store.guards()].index(away.peer_id)].unlisted_since is None
    assert view.guards is not None and away.peer_id in {r.peer_id for r in view.guards}
    store.close()


def test_guards_command_lists_and_resets(cli, gtorrent_home: Path) -> None:  # type: ignore[no-untyped-def]
    records = [remote(f"203.{n}.0.1") for n in range(3)]
    store = Store.open(gtorrent_home)
    now = time.time()
    store.add_guards([Guard(r, now, now + 30 * 86400) for r in records], limit=8)
    store.close()
    listed = cli("guards")
    assert listed.code == 0 and all(r.peer_id[:8] in listed.out for r in records), listed
    shown = cli("guards", "--json")
    assert shown.code == 0 and '"203.1.0.1' not in shown.out and "tcp://203.1.0.1:7000" in shown.out
    reset = cli("guards", "--reset")
    assert reset.code == 0 and "forgot 3 guards" in reset.err
    store = Store.open(gtorrent_home)
    assert store.guards() == []
    store.close()


async def test_guards_of_another_swarm_are_made_up_for_at_once(swarm: Swarm, tmp_path: Path) -> None:
    """An asker that moves to other trackers finds none of its guards listed there: it must not wait a
    day for them to count as gone. It draws guards in the new swarm; the old ones are pushed out first
    once the set is full."""
    await swarm.start(relays=12)
    store = Store.open(tmp_path)
    await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=4), store)
    old = {g.peer_id for g in store.guards()}
    other = Swarm()
    try:
        await other.start(relays=12)
        there = set(other.relays) | {seed.identity.peer_id for seed in other.seeds}  # seeds relay too
        for _ in range(2):
            result = await ask_private(other.ctx, [other.url], AskRequest(PROMPT, max_tokens=4), store)
            assert {route[0] for route in result.route} <= there
        held = store.guards()
        assert len(held) <= held_limit(4)
        assert {g.peer_id for g in held if g.unlisted_since is None} <= there
        assert {g.peer_id for g in held if g.unlisted_since is not None} <= old
    finally:
        await other.close()
    # back in the first swarm: its guards are listed again and serve again, ahead of the newer ones
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=4), store)
    assert {route[0] for route in result.route} <= old
    store.close()
