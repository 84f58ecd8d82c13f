"""Who is blamed when relays misbehave in a private ask: a relay that reports a break (or goes silent)
is a suspect with the peers it accuses, paths that fall silent while the seed answers on others are
the relays' fault, `--strict` never sends over a route weaker than planned, a retry takes the relays'
fresh records, and a first relay that trickles junk cannot hold a circuit forever.

Real relays, seeds and a tracker on loopback (tests/test_private.py's Swarm); misbehaviour is added by
wrapping a relay's own handlers."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

import gtorrent.private as private
from gtorrent.asker import AskEvents, AskRequest, AskTimeouts
from gtorrent.circuit import CircuitClient, CircuitError
from gtorrent.identity import Identity
from gtorrent.onion import CELL_BYTES
from gtorrent.private import ask_private
from gtorrent.protocol import Message, PeerRecord
from gtorrent.relay import Circuit, RelayService, serve_relay
from gtorrent.routing import PathPlan, PrivacyError, plan_paths
from gtorrent.store import Store
from gtorrent.transport import Reply, Server, new_context

from .test_private import PROMPT, Swarm

pytestmark = pytest.mark.timeout(120)


class PlanSpy:
    """Records every path plan drawn in an ask: (the records offered, the peers left out, k)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[list[PeerRecord], set[str], int]] = []
        self.plans: list[PathPlan] = []
        original = plan_paths  # the one private.py uses

        def recording(relays: list[PeerRecord], **kwargs: Any) -> PathPlan:
            self.calls.append((list(relays), set(kwargs["exclude"]), kwargs["k"]))
            plan = original(relays, **kwargs)
            self.plans.append(plan)
            return plan

        monkeypatch.setattr(private, "plan_paths", recording)

    def attempt_plans(self) -> list[tuple[list[PeerRecord], set[str], int]]:
        """The plans that started an attempt (replacement paths are drawn with k = 1)."""
        return [call for call in self.calls if call[2] != 1]

    def replacements(self) -> list[tuple[list[PeerRecord], set[str], int]]:
        return [call for call in self.calls if call[2] == 1]


# ---------------------------------------------------------------------- one deadline per receive


async def trickle(reply: Reply, wrong_cid: int, stop: asyncio.Event) -> None:
    """Junk for another circuit id every 0.2 s: each one used to restart the asker's wait."""
    while not stop.is_set():
        await reply.send("cell", {"cid": wrong_cid}, os.urandom(CELL_BYTES))
        await reply.send("destroy", {"cid": wrong_cid, "reason": "not yours"})
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass


async def test_a_first_relay_trickling_junk_cannot_hold_a_circuit() -> None:
    ctx = new_context()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    closers: list[Any] = []
    try:
        # 1. a bare peer on a real CurveZMQ socket that answers anything with junk for another cid
        identity = Identity.generate()
        server = Server(ctx, curve_secret=identity.curve_secret)
        closers.append(server)
        endpoint = server.bind("tcp://127.0.0.1:0")
        record = PeerRecord.sign(identity, endpoint=endpoint, roles=("relay",), seq=1, expires=time.time() + 60)
        client = CircuitClient(ctx, [record])

        async def junk(reply: Reply, message: Message) -> None:
            tasks.append(asyncio.create_task(trickle(reply, client.cid ^ 1 or 2, stop)))

        tasks.append(asyncio.create_task(server.serve(junk, frozenset({"destroy"}))))
        await client.conn.send("destroy", {"cid": client.cid, "reason": "hello"})  # opens the way back
        started = time.monotonic()
        with pytest.raises(CircuitError, match="no cell"):
            await asyncio.wait_for(client.receive(1.0), 10.0)  # TimeoutError here: the wait never ended
        assert time.monotonic() - started < 2.0
        client.conn.close()

        # 2. a real relay that answers CREATE, then trickles junk instead of extending: build ends
        hop = Identity.generate()
        relay_server = Server(ctx, curve_secret=hop.curve_secret)
        closers.append(relay_server)
        relay_endpoint = relay_server.bind("tcp://127.0.0.1:0")
        service = RelayService(hop, ctx)
        closers.append(service)
        original = service.handle

        async def stall(reply: Reply, message: Message) -> None:
            if message.kind == "cell":  # the EXTEND
                tasks.append(asyncio.create_task(trickle(reply, message["cid"] ^ 1 or 2, stop)))
                return
            await original(reply, message)

        service.handle = stall  # type: ignore[method-assign]
        tasks.append(asyncio.create_task(serve_relay(relay_server, service)))
        first = PeerRecord.sign(hop, endpoint=relay_endpoint, roles=("relay",), seq=1,
                                onion_key=service.onion_public, expires=time.time() + 60)
        circuit = CircuitClient(ctx, [first, record])
        started = time.monotonic()
        with pytest.raises(CircuitError, match="extending") as failed:
            await asyncio.wait_for(circuit.build(1.0), 10.0)
        assert time.monotonic() - started < 3.0
        assert (failed.value.first, failed.value.hop) == (0, 1)  # the relay that stalled is a suspect too
        circuit.conn.close()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for closer in closers:
            closer.close()
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------- relays that misbehave


def wrap_backward(swarm: Swarm, act: Any) -> None:
    """Put `act(peer_id, service, circuit, message)` in front of every relay's backward handler; it
    returns True when it took care of the message (the relay's own handler is skipped)."""
    for peer_id, (_, service) in swarm.relays.items():
        original = service.from_next

        async def from_next(circuit: Circuit, message: Message, original: Any = original, peer_id: str = peer_id,
                            service: RelayService = service) -> None:
            if not await act(peer_id, service, circuit, message):
                await original(circuit, message)

        service.from_next = from_next  # type: ignore[method-assign]


@pytest.mark.timeout(150)
async def test_paths_that_fall_silent_while_others_answer_blame_their_relays_not_the_seed(
    swarm: Swarm, tmp_path: Path
) -> None:
    await swarm.start(relays=12)
    seed_id = swarm.seeds[0].identity.peer_id
    droppers: set[str] = set()
    dropped: list[str] = []

    async def swallow(peer_id: str, service: RelayService, circuit: Circuit, message: Message) -> bool:
        if peer_id in droppers and message.kind == "cell":  # the seed's answer: never passed back
            dropped.append(peer_id)
            return True
        return False

    wrap_backward(swarm, swallow)
    routes: list[list[list[str]]] = []

    def on_route(seed: PeerRecord, privacy: dict[str, object], route: list[list[str]]) -> None:
        routes.append(route)
        if len(routes) == 1:  # armed after building: the middle relays of two of the four paths
            droppers.update({route[0][1], route[1][1]})

    store = Store.open(tmp_path)
    timeouts = AskTimeouts(accept_s=3.0, first_token_s=5.0, between_tokens_s=5.0)
    # use_guards=False: the relays of two of four paths become suspects, and with guards the retry would
    # need spare guards outside them (tests/test_guards.py covers guards under failures)
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store,
                               AskEvents(on_route=on_route), timeouts, use_guards=False)
    assert dropped and result.attempts == 2 and result.seed == seed_id
    assert "went silent" in result.failures[0]["reason"]
    assert result.text == swarm.local(8)
    # the retry left out every relay of the silent paths; the seed was asked again and is not blamed
    silent = {peer for route in routes[0][:2] for peer in route}
    assert not {peer for route in result.route for peer in route} & silent
    assert store.standing(seed_id).asks_failed == 0 and store.standing(seed_id).asks_ok == 1
    store.close()


async def test_a_first_relay_reporting_a_break_mid_answer_is_a_suspect_itself(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await swarm.start(relays=12)
    spy = PlanSpy(monkeypatch)
    framers: set[str] = set()
    fired: list[str] = []

    async def frame(peer_id: str, service: RelayService, circuit: Circuit, message: Message) -> bool:
        if peer_id in framers and peer_id not in fired and message.kind == "cell" and circuit.state == "relaying":
            fired.append(peer_id)  # says the circuit broke further on; its successors are healthy
            await service.destroy(circuit, "destroyed by successor")
            return True
        return False

    wrap_backward(swarm, frame)

    def on_route(seed: PeerRecord, privacy: dict[str, object], route: list[list[str]]) -> None:
        if not framers:  # the first relays of two paths: 2 of 4 left, below k = 3
            framers.update({route[0][0], route[1][0]})

    store = Store.open(tmp_path)
    # use_guards=False: two of 12 relays' paths are blamed whole, and with guards the retry would need
    # a spare guard outside them (tests/test_guards.py covers guards under failures)
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store,
                               AskEvents(on_route=on_route), use_guards=False)
    assert sorted(fired) == sorted(framers) and result.attempts == 2
    assert result.text == swarm.local(8)
    retry_plan = spy.attempt_plans()[1]
    assert framers <= retry_plan[1]  # the reporters are left out of the retry, with those they accused
    assert not framers & {peer for route in result.route for peer in route}
    assert store.standing(swarm.seeds[0].identity.peer_id).asks_failed == 0
    store.close()


async def test_a_relay_destroying_on_extend_is_a_suspect_with_the_hop_it_accuses(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await swarm.start(relays=12)
    spy = PlanSpy(monkeypatch)
    framers: set[str] = set()
    refused: list[str] = []
    for peer_id, (_, service) in swarm.relays.items():
        original = service._extend

        async def extend(circuit: Circuit, data: bytes, original: Any = original, peer_id: str = peer_id,
                         service: RelayService = service) -> None:
            if not framers:  # the first relay of the first path drawn
                framers.add(spy.plans[0].paths[0][0].peer_id)
            if peer_id in framers:  # claims the next hop never answered; it was never asked
                refused.append(peer_id)
                await service.destroy(circuit, "next hop did not answer")
                return
            await original(circuit, data)

        service._extend = extend  # type: ignore[method-assign]
    store = Store.open(tmp_path)
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store,
                               timeouts=AskTimeouts(accept_s=3.0))
    assert refused and result.text == swarm.local(8)
    accused = spy.plans[0].paths[0][1].peer_id
    # the replacement path is drawn without the accused hop and without the relay that accused it
    assert spy.replacements() and {accused, *framers} <= spy.replacements()[0][1]
    assert not framers & {peer for route in result.route for peer in route}
    store.close()


# ---------------------------------------------------------------------- --strict


async def test_strict_never_sends_the_request_over_fewer_paths_than_planned(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=12)
    seed = swarm.seeds[0]
    cells: list[str] = []
    original = seed.relay.handle

    async def spy(reply: Reply, message: Message) -> None:
        if message.kind == "cell":  # a clove (nothing else reaches the seed as a cell)
            cells.append(message.kind)
        await original(reply, message)

    seed.relay.handle = spy  # type: ignore[method-assign]
    # one relay dies but stays listed: 12 relays are just enough for a strict 4 x 3 plan, so its path
    # fails to build and no fresh relay is left to replace it
    victim = next(iter(swarm.relays))
    server, service = swarm.relays[victim]
    service.close()
    server.close()
    routes: list[dict[str, object]] = []
    store = Store.open(tmp_path)
    with pytest.raises(PrivacyError, match="need 12 relays"):  # the retry cannot plan 4 x 3 without it
        await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store,
                          AskEvents(on_route=lambda seed, privacy, route: routes.append(privacy)),
                          AskTimeouts(accept_s=2.0), strict=True)
    assert routes == [] and cells == []  # no route was reported and no clove went out
    assert store.standing(seed.identity.peer_id).asks_failed == 0
    store.close()


# ---------------------------------------------------------------------- fresh records on a retry


async def test_a_retry_plans_with_the_relays_fresh_records(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    swarm.onion_grace_s = 0.0  # a rotated-away key is refused at once (as after the grace period)
    await swarm.start(relays=12)
    spy = PlanSpy(monkeypatch)
    original_build = private.build_paths
    rotated: list[str] = []

    async def rotate_then_build(*args: Any) -> list[CircuitClient]:
        if not rotated:  # while the ask is under way, every relay rotates its onion key and re-announces
            for peer_id, (_, service) in swarm.relays.items():
                service.onion_keys.rotate()
                await swarm.announcers[peer_id].announce()
                rotated.append(peer_id)
        return await original_build(*args)

    monkeypatch.setattr(private, "build_paths", rotate_then_build)
    store = Store.open(tmp_path)
    # use_guards=False: every first hop's CREATE is refused here, which makes suspects of all the guards
    # a first attempt can use (guards are confirmed afresh before each ask, so this takes a rotation with
    # no grace between that and the CREATE)
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store, use_guards=False)
    # the first attempt held the old records (every CREATE refused); the retry took the new ones
    assert result.attempts == 2 and result.text == swarm.local(8)
    first, retry = spy.attempt_plans()[:2]
    current = {peer_id: service.onion_public for peer_id, (_, service) in swarm.relays.items()}
    offered = [[record for record in plan[0] if record.peer_id in current] for plan in (first, retry)]
    assert len(offered[0]) == len(offered[1]) == 12  # (the seed relays too, and did not rotate)
    assert all(record.onion_key != current[record.peer_id] for record in offered[0])
    assert all(record.onion_key == current[record.peer_id] for record in offered[1])
    assert first[1] <= retry[1]  # the suspects of the first attempt stay out
    store.close()
