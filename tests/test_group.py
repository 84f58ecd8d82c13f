"""Model groups (gtorrent/group.py): who is a member, what a state must be to count, and real seeds
joining and leaving each other's groups."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gtorrent.discovery import Discovery, discover
from gtorrent.forwarding import Member
from gtorrent.group import (
    CLOCK_SKEW_S,
    MAX_SUMMARY_DIGESTS,
    GroupMember,
    LocalState,
    ModelGroup,
    decode_summary,
    signed_bytes,
)
from gtorrent.identity import Identity, b64
from gtorrent.protocol import MAX_MESSAGE_BYTES, Message, ModelInfo, PeerRecord, ProtocolError, decode, encode
from gtorrent.runtime.prefix_cache import PrefixSummary, chunk_hashes
from gtorrent.transport import Connection, TransportError, new_context

from .procs import Proc, start_seed, start_tracker

MODEL = ModelInfo("ab" * 32, "demo", 512)
OTHER_MODEL = ModelInfo("cd" * 32, "other", 512)


def record_of(identity: Identity, model: ModelInfo = MODEL, port: int = 1, stopped: bool = False) -> PeerRecord:
    now = time.time()
    return PeerRecord.sign(identity, endpoint=f"tcp://127.0.0.1:{port}", roles=("relay", "seed"), models=(model,),
                           seq=int(now * 1000), expires=now + 60, stopped=stopped)


def group_of(me: Identity, *others: PeerRecord, summary: PrefixSummary | None = None) -> ModelGroup:
    state = LocalState(summary or PrefixSummary(frozenset()), 1, 2, 0.5)
    group = ModelGroup(me, new_context(), ["tcp://127.0.0.1:9"], MODEL.model_id, lambda: state)
    group.update(Discovery(records={r.peer_id: r for r in others}))
    return group


def state_from(sender: Identity, to: str, *, ts: int | None = None, model_id: str = MODEL.model_id,
               summary: bytes = b"", lb: float = 1.5, signer: Identity | None = None) -> Message:
    body: dict[str, Any] = {"from": sender.peer_id, "to": to, "model_id": model_id,
                            "ts": int(time.time() * 1000) if ts is None else ts, "summary": b64(summary),
                            "queue": 3, "in_flight": 1, "lb": lb}
    body["sig"] = b64((signer or sender).sign(signed_bytes(body)))
    return decode(encode("group_state", body))  # through the schema, as the transport hands it over


def test_membership_is_the_listed_seeds_of_the_model() -> None:
    me, peer, stranger, stopped = (Identity.generate() for _ in range(4))
    group = group_of(me, record_of(peer), record_of(stranger, OTHER_MODEL), record_of(stopped, stopped=True),
                     record_of(me))
    assert set(group.members) == {peer.peer_id}
    assert group.live_members() == []  # listed, but not heard from yet


def test_a_valid_state_is_taken_and_makes_the_member_live() -> None:
    me, peer = Identity.generate(), Identity.generate()
    group = group_of(me, record_of(peer))
    digests = chunk_hashes(list(range(40)))
    member = group.take_state(state_from(peer, me.peer_id, summary=b"".join(sorted(digests[:2]))))
    assert member.live and member.lb == 1.5 and member.queue == 3 and member.in_flight == 1
    assert member.summary.longest_match(digests) == 2
    view = group.routing_view(Member(me.peer_id, PrefixSummary(frozenset()), 0.0, 0))
    assert [m.peer_id for m in view] == [me.peer_id, peer.peer_id] and view[1].queue == 4
    group.note_forward(peer.peer_id)  # forwards since its last state count in its queue ...
    group.note_forward(peer.peer_id)
    assert group.routing_view(view[0])[1].queue == 6
    group.take_state(state_from(peer, me.peer_id, ts=member.last_ts + 1))  # ... until its next state
    assert group.routing_view(view[0])[1].queue == 4


@pytest.mark.parametrize("problem", ["unlisted", "other_seed", "forged", "other_model", "old_clock", "bad_summary"])
def test_states_that_do_not_count_are_refused(problem: str) -> None:
    me, peer, stranger, third = (Identity.generate() for _ in range(4))
    group = group_of(me, record_of(peer), record_of(third))
    now = int(time.time() * 1000)
    group.take_state(state_from(peer, me.peer_id, ts=now - 10))
    message = {
        "unlisted": lambda: state_from(stranger, me.peer_id),  # not a listed seed of the model
        "other_seed": lambda: state_from(peer, third.peer_id),  # signed for another member
        "forged": lambda: state_from(peer, me.peer_id, signer=stranger),  # a copy of peer's id, other key
        "other_model": lambda: state_from(peer, me.peer_id, model_id=OTHER_MODEL.model_id),
        "old_clock": lambda: state_from(peer, me.peer_id, ts=now - int((CLOCK_SKEW_S + 5) * 1000)),
        "bad_summary": lambda: state_from(peer, me.peer_id, summary=b"x" * 17),  # not whole digests
    }[problem]()
    with pytest.raises(ProtocolError, match="not_member" if problem == "unlisted" else "invalid"):
        group.take_state(message)
    assert group.members[peer.peer_id].lb == 1.5  # the refused state changed nothing


def test_an_older_state_shows_the_member_alive_but_is_not_taken() -> None:
    me, peer = Identity.generate(), Identity.generate()
    group = group_of(me, record_of(peer))
    now = int(time.time() * 1000)
    member = group.take_state(state_from(peer, me.peer_id, ts=now, lb=2.0))
    group._missed(member)
    group.take_state(state_from(peer, me.peer_id, ts=now - 100, lb=9.0))  # crossed on the other link
    assert member.lb == 2.0 and member.missed == 0 and member.last_ts == now
    stamps = [group.state_body(peer.peer_id)["ts"] for _ in range(50)]
    assert stamps == sorted(set(stamps))  # this seed's own stamps never repeat


def test_a_member_that_stops_answering_leaves_and_comes_back() -> None:
    me, peer = Identity.generate(), Identity.generate()
    group = group_of(me, record_of(peer))
    changes: list[bool] = []
    group.on_change = lambda member, joined: changes.append(joined)
    member: GroupMember = group.members[peer.peer_id]
    now = int(time.time() * 1000)
    group.take_state(state_from(peer, me.peer_id, ts=now - 5))
    for _ in range(3):
        group._missed(member)
    assert not member.live and changes == [True, False]
    group.take_state(state_from(peer, me.peer_id, ts=now))
    assert member.live and changes == [True, False, True]


def test_a_full_summary_keeps_a_state_well_under_64_kib() -> None:
    me, peer = Identity.generate(), Identity.generate()
    digests = chunk_hashes(list(range(10 * MAX_SUMMARY_DIGESTS)))
    group = group_of(me, record_of(peer), summary=PrefixSummary(frozenset(digests)))
    body = group.state_body(peer.peer_id)
    frames = encode("group_state", body)
    assert len(frames[0]) < 45 * 1024 < MAX_MESSAGE_BYTES
    assert decode_summary(decode(frames).body["summary"]).longest_match(digests) == MAX_SUMMARY_DIGESTS
    other = group_of(peer, record_of(me))
    assert other.take_state(decode(frames)).summary.longest_match(digests) == MAX_SUMMARY_DIGESTS


# ---------------------------------------------------------------------- real seeds


@pytest.mark.timeout(120)
def test_seeds_of_a_model_join_and_a_killed_one_leaves(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "t")
    procs: list[Proc] = [tracker]
    try:
        a, a_id = start_seed(tmp_path / "a", [url])
        procs.append(a)
        b, b_id = start_seed(tmp_path / "b", [url])
        procs.append(b)
        a.wait_for(rf"group: {b_id[:8]} joined", timeout_s=20)
        b.wait_for(rf"group: {a_id[:8]} joined", timeout_s=20)
        b.kill()
        a.wait_for(rf"group: {b_id[:8]} left", timeout_s=15)  # 3 missed exchanges: ~2-5 s
        b, _ = start_seed(tmp_path / "b", [url])  # same home, same identity, another port
        procs.append(b)
        a.wait_for(rf"group: {b_id[:8]} joined", timeout_s=20)
    finally:
        for proc in reversed(procs):
            proc.kill()


@pytest.mark.timeout(90)
async def test_group_state_from_a_non_member_is_refused_on_the_wire(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "t")
    procs: list[Proc] = [tracker]
    ctx = new_context()
    try:
        seed, seed_id = await asyncio.to_thread(start_seed, tmp_path / "a", [url])
        procs.append(seed)
        record = (await discover(ctx, [url], role="seed")).records[seed_id]
        stranger = Identity.generate()
        async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
            answer = await conn.request("group_state", state_from(stranger, seed_id,
                                        model_id=record.models[0].model_id).body,
                                        frozenset({"group_state", "error"}), 5.0)
        assert answer.kind == "error" and answer["code"] == "not_member"  # never its state (nor its prefixes)
        # a copy of the seed's endpoint under other keys: the CurveZMQ handshake fails, no exchange
        fake = PeerRecord.sign(stranger, endpoint=record.endpoint, roles=("seed",), models=record.models,
                               seq=1, expires=time.time() + 60)
        group = ModelGroup(Identity.generate(), ctx, [url], record.models[0].model_id,
                           lambda: LocalState(PrefixSummary(frozenset()), 0, 0, 0.0))
        group.update(Discovery(records={fake.peer_id: fake}))
        assert not await group.exchange(group.members[fake.peer_id])
        group.close()
        async with Connection(ctx, record.endpoint, server_key=stranger.curve_public) as conn:
            with pytest.raises(TransportError):  # even a ping goes unanswered under the wrong key
                await conn.request("ping", {}, frozenset({"pong"}), 2.0)
    finally:
        ctx.destroy(linger=0)
        for proc in reversed(procs):
            proc.kill()


def load_from(sender: Identity, to: str, *, ts: int, queue: int, lb: float = 0.25,
              signer: Identity | None = None) -> Message:
    body: dict[str, Any] = {"from": sender.peer_id, "to": to, "model_id": MODEL.model_id, "ts": ts,
                            "queue": queue, "in_flight": 1, "lb": lb}
    body["sig"] = b64((signer or sender).sign(signed_bytes(body)))
    return decode(encode("group_load", body))


def test_a_pushed_load_replaces_the_states_load_only_when_newer_and_checked() -> None:
    me, peer, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    group = group_of(me, record_of(peer))
    now = int(time.time() * 1000)
    member = group.take_state(state_from(peer, me.peer_id, ts=now))  # queue 3, in flight 1, lb 1.5
    group.note_forward(peer.peer_id)
    assert group.take_load(load_from(peer, me.peer_id, ts=now + 1, queue=7))
    assert (member.queue, member.lb, member.forwarded) == (7, 0.25, 0)  # its load now counts our forward
    assert not group.take_load(load_from(peer, me.peer_id, ts=now + 1, queue=9))  # a replay: not newer
    assert not group.take_load(load_from(peer, me.peer_id, ts=now + 2, queue=9, signer=stranger))  # forged
    assert not group.take_load(load_from(stranger, me.peer_id, ts=now + 2, queue=9))  # not a member
    assert member.queue == 7
    # a state stamped before the load keeps its summary's news but not its older load
    digests = chunk_hashes(list(range(30)))
    group.take_state(state_from(peer, me.peer_id, ts=now + 1, summary=b"".join(sorted(digests[:1]))))
    assert member.queue == 7 and member.summary.longest_match(digests) == 1


def test_a_flood_of_loads_is_dropped_before_its_signatures_are_checked() -> None:
    me, peer = Identity.generate(), Identity.generate()
    group = group_of(me, record_of(peer))
    now = int(time.time() * 1000)
    group.take_state(state_from(peer, me.peer_id, ts=now))
    taken = sum(group.take_load(load_from(peer, me.peer_id, ts=now + i, queue=i % 50)) for i in range(1, 1001))
    # the bucket holds MAX_LOADS_PER_S and refills while the loop runs: far fewer than 1000 get checked
    assert 150 <= taken < 900 and group.counters["loads_dropped"] == 1000 - taken


@pytest.mark.timeout(60)
async def test_a_seed_pushes_its_load_to_its_members_as_it_changes(tmp_path: Path) -> None:
    """Two in-process groups over real CurveZMQ links: a load change reaches the other side without
    waiting for the next exchange."""
    from gtorrent.transport import Server

    ctx = new_context()
    a_id, b_id = Identity.generate(), Identity.generate()
    servers = [Server(ctx, curve_secret=i.curve_secret, name=n) for i, n in ((a_id, "a"), (b_id, "b"))]
    endpoints = [server.bind("tcp://127.0.0.1:0") for server in servers]
    loads = {"a": LocalState(PrefixSummary(frozenset()), 0, 0, 0.0), "b": LocalState(PrefixSummary(frozenset()), 0, 0, 0.0)}
    groups: dict[str, ModelGroup] = {}
    for name, me, other, endpoint in (("a", a_id, b_id, endpoints[1]), ("b", b_id, a_id, endpoints[0])):
        record = PeerRecord.sign(other, endpoint=endpoint, roles=("relay", "seed"), models=(MODEL,),
                                 seq=int(time.time() * 1000), expires=time.time() + 60)
        groups[name] = ModelGroup(me, ctx, ["tcp://127.0.0.1:9"], MODEL.model_id, lambda n=name: loads[n])
        groups[name].update(Discovery(records={record.peer_id: record}))

    async def serve(server: Server, group: ModelGroup) -> None:
        async def handle(reply: Any, message: Message) -> None:
            if message.kind == "group_state":
                await group.handle_state(reply, message)
            elif message.kind == "group_load":
                group.take_load(message)
        await server.serve(handle, frozenset({"group_state", "group_load"}))

    tasks = [asyncio.create_task(serve(s, groups[n])) for s, n in zip(servers, ("a", "b"), strict=True)]
    try:
        a_side = groups["a"].members[b_id.peer_id]
        assert await groups["a"].exchange(a_side)  # a dials b: both are live on a's side
        assert groups["b"].members[a_id.peer_id].live
        loads["a"] = LocalState(PrefixSummary(frozenset()), 5, 1, 0.75)
        groups["a"].load_changed()
        b_side = groups["b"].members[a_id.peer_id]
        deadline = time.monotonic() + 5
        while (b_side.queue, b_side.in_flight, b_side.lb) != (5, 1, 0.75):
            assert time.monotonic() < deadline, "the pushed load never arrived"
            await asyncio.sleep(0.01)
    finally:
        for task in tasks:
            task.cancel()
        for group in groups.values():
            group.close()
        for server in servers:
            server.close()
        ctx.destroy(linger=0)


def test_no_forwarding_on_a_stale_listing() -> None:
    """Trust comes from the trackers' listing: when none could be taken for a while (trackers silent or
    slow under load), verdicts since are unseen, so the seed forwards nothing until a listing comes."""
    from gtorrent.group import LISTING_STALE_S

    me, peer = Identity.generate(), Identity.generate()
    group = group_of(me, record_of(peer))
    group.take_state(state_from(peer, me.peer_id))
    own = Member(me.peer_id, PrefixSummary(frozenset()), 0.0, 0)
    assert [m.peer_id for m in group.routing_view(own)] == [me.peer_id, peer.peer_id]
    assert group.listed_at is not None
    group.listed_at -= LISTING_STALE_S + 1  # no listing since
    assert [m.peer_id for m in group.routing_view(own)] == [me.peer_id]
    group.update(Discovery(records={peer.peer_id: record_of(peer)}))  # a listing again
    assert [m.peer_id for m in group.routing_view(own)] == [me.peer_id, peer.peer_id]
