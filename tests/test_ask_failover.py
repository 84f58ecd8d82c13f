"""Who is blamed when an ask fails: a dead seed must not burn healthy relays, a seed that failed (or
said `stopped`) is not asked again in the same ask, and a degraded route is told before any text."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gtorrent.asker import (
    AnswerSink,
    AskEvents,
    AskRequest,
    AskResult,
    AskTimeouts,
    RouteFailed,
    SeedFailed,
    SignerRefused,
    run_attempts,
)
from gtorrent.errors import GtorrentError
from gtorrent.identity import Identity
from gtorrent.private import ask_private
from gtorrent.protocol import PeerRecord
from gtorrent.store import Store

from .test_private import PROMPT, Swarm

pytestmark = pytest.mark.timeout(120)


async def kill_seed(swarm: Swarm, index: int) -> str:
    """Stop a seed's sockets without a goodbye: trackers keep listing it (as seed and relay)."""
    seed = swarm.seeds.pop(index)
    task = swarm.tasks[1 + index]  # the tracker's task comes first, then one per seed
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - cancelled
        pass
    seed.close()
    return seed.identity.peer_id


@pytest.mark.timeout(150)
async def test_a_dead_seed_burns_no_relays(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=12, seeds=2)
    alive = swarm.seeds[1].identity.peer_id
    dead = await kill_seed(swarm, 0)
    timeouts = AskTimeouts(accept_s=2.0)
    for round_number in range(4):
        store = Store.open(tmp_path / f"asker{round_number}")  # a fresh asker each time
        dead_first = round_number % 2 == 0
        if dead_first:  # a good past makes the dead seed rank first
            for _ in range(3):
                store.observe(dead, "ok", ttft_s=0.1, tokens_per_s=50.0)
        events: list[str] = []
        result = await ask_private(
            swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store,
            AskEvents(on_text=lambda piece, seen=events: seen.append("text"),
                      on_route=lambda *route, seen=events: seen.append("route")),
            timeouts,
        )
        assert result.text == swarm.local(8) and result.seed == alive
        relays = [peer for route in result.route for peer in route]
        assert dead not in relays and events[0] == "route"
        if dead_first:
            # the full route, over 12 distinct live relays: none was burnt by the dead seed's attempt.
            # (When the live seed ranks first, the dead one, also listed as a relay, may be drawn onto a
            # path: that path's relays before it are suspects too, as any of them may have lied.)
            assert result.privacy == {"paths": 4, "hops": 3, "k": 3, "degraded": False}
            assert len(set(relays)) == 12 and set(relays) <= set(swarm.relays)
            assert result.attempts == 2 and [f["seed"] for f in result.failures] == [dead]
            assert store.standing(dead).asks_failed == 1  # private failures count like direct ones
        assert store.standing(alive).asks_ok == 1 and store.standing(alive).asks_failed == 0
        store.close()


async def test_a_seed_dying_mid_answer_is_blamed_alone(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=12, seeds=2)
    services = {seed.identity.peer_id: seed for seed in swarm.seeds}
    store = Store.open(tmp_path)
    current: list[str] = []
    killed: list[str] = []

    def on_text(piece: str) -> None:
        if not killed:  # every path of the first attempt breaks at once: only the seed is to blame
            killed.append(current[-1])
            services[current[-1]].relay.close()
            services[current[-1]].server.close()

    events = AskEvents(on_text=on_text, on_attempt=lambda seed, number: current.append(seed.peer_id))
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=150), store, events)
    assert killed and result.seed != killed[0] and result.attempts == 2
    assert "every path to seed" in result.failures[0]["reason"]
    assert result.text == swarm.local(150)
    # no relay of the first attempt was blamed: the retry has the full route over 12 live relays
    assert result.privacy == {"paths": 4, "hops": 3, "k": 3, "degraded": False}
    assert len({peer for route in result.route for peer in route} & set(swarm.relays)) == 12
    assert store.standing(killed[0]).asks_failed == 1
    store.close()


# ---------------------------------------------------------------------- the shared attempt loop


def seed_record(number: int) -> PeerRecord:
    return PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{20000 + number}", roles=("seed",),
                           seq=1, expires=time.time() + 60)


MODEL_ID = "m" * 64


def answer(seed: PeerRecord) -> AskResult:
    return AskResult(text="ok", tokens=1, seed=seed.peer_id, model_id=MODEL_ID, finish_reason="length",
                     ttft_s=0.01, total_s=0.02, attempts=1)


async def test_a_seed_that_failed_is_not_asked_again_but_one_whose_route_failed_is(tmp_path: Path) -> None:
    first, second = seed_record(1), seed_record(2)
    store = Store.open(tmp_path)
    asked: list[str] = []
    restarts: list[str] = []

    async def attempt(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        asked.append(seed.peer_id)
        if seed is first:
            sink.add("partial")
            raise SeedFailed("died")
        if asked.count(second.peer_id) == 1:
            raise RouteFailed("relays broke", {"somerelay"})
        return answer(seed)

    events = AskEvents(on_restart=lambda seed, reason, lost: restarts.append(f"{reason}/{lost}"))
    result = await run_attempts([first, second], attempt, store, events, request=AskRequest(PROMPT),
                                started=time.perf_counter(), model_id=MODEL_ID, max_attempts=3)
    assert asked == [first.peer_id, second.peer_id, second.peer_id] and result.attempts == 3
    assert restarts == ["died/1", "relays broke/0"]
    assert store.standing(first.peer_id).asks_failed == 1
    assert store.standing(second.peer_id).asks_failed == 0 and store.standing(second.peer_id).asks_ok == 1
    # a failed seed is never asked again, even with attempts to spare
    asked.clear()

    async def always_fails(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        asked.append(seed.peer_id)
        raise SeedFailed("no")

    with pytest.raises(GtorrentError, match="failed after 2 attempt"):
        await run_attempts([first, second], always_fails, store, AskEvents(), request=AskRequest(PROMPT),
                           started=time.perf_counter(), model_id=MODEL_ID, max_attempts=5)
    assert asked == [first.peer_id, second.peer_id]
    store.close()


async def test_a_refused_signer_gets_its_entry_asked_again_with_forwarding_declined(tmp_path: Path) -> None:
    """The entry forwarded to a seed this asker refuses (SignerRefused): it is asked again at once, with
    forwarding declined, in an attempt beyond max_attempts and with nothing against it; relaying another
    signer's answer then (SeedFailed) is its failure, and the next seed is asked normally."""
    first, second = seed_record(1), seed_record(2)
    store = Store.open(tmp_path)
    asked: list[tuple[str, bool]] = []

    async def honest_entry(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        asked.append((seed.peer_id, forward))
        if forward:
            raise SignerRefused("relayed an answer signed by x, an untrusted seed")
        return answer(seed)

    result = await run_attempts([first, second], honest_entry, store, AskEvents(), request=AskRequest(PROMPT),
                                started=time.perf_counter(), model_id=MODEL_ID, max_attempts=1)
    assert asked == [(first.peer_id, True), (first.peer_id, False)] and result.seed == first.peer_id
    assert result.attempts == 2 and [f["seed"] for f in result.failures] == [first.peer_id]
    assert store.standing(first.peer_id).asks_failed == 0 and store.standing(first.peer_id).asks_ok == 1
    asked.clear()

    async def stubborn_entry(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        asked.append((seed.peer_id, forward))
        if seed is first:
            if forward:
                raise SignerRefused("relayed an answer signed by x, an untrusted seed")
            raise SeedFailed("relayed an answer signed by x, although the request declined forwarding")
        return answer(seed)

    result = await run_attempts([first, second], stubborn_entry, store, AskEvents(), request=AskRequest(PROMPT),
                                started=time.perf_counter(), model_id=MODEL_ID, max_attempts=2)
    assert asked == [(first.peer_id, True), (first.peer_id, False), (second.peer_id, True)]
    assert result.seed == second.peer_id and store.standing(first.peer_id).asks_failed == 1
    store.close()


async def test_a_seed_that_said_stopped_is_not_retried(tmp_path: Path) -> None:
    first, second = seed_record(1), seed_record(2)
    store = Store.open(tmp_path)
    asked: list[str] = []

    async def attempt(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        asked.append(seed.peer_id)
        if seed is first:
            raise RouteFailed("paths broke")  # not the seed's fault: it would be asked again...
        return answer(seed)

    async def listed(model_id: str) -> set[str] | None:
        return {second.peer_id}  # ...but the trackers no longer list it (it announced `stopped`)

    result = await run_attempts([first, second], attempt, store, AskEvents(), request=AskRequest(PROMPT),
                                started=time.perf_counter(), model_id=MODEL_ID, refresh=listed)
    assert asked == [first.peer_id, second.peer_id] and result.seed == second.peer_id
    store.close()


def test_answer_text_is_bounded_by_max_tokens() -> None:
    from gtorrent.asker import answer_budget

    seed = seed_record(1)
    sink = AnswerSink(seed, answer_budget(2), None)
    sink.add("x" * 1000)
    with pytest.raises(SeedFailed, match="more answer than --max-tokens allows"):
        for _ in range(10):
            sink.add("x" * 1000)
    flood = AnswerSink(seed, answer_budget(1), None)
    with pytest.raises(SeedFailed):
        for _ in range(100_000):
            flood.add("")  # empty pieces cost too
