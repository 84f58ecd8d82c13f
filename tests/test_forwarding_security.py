"""Security review of forwarding (issue 9): what a lying or hostile group member, or a flood, can make an
entry seed do. In process: a real tracker (tests/test_private.py's Swarm), a real SeedService with the
demo model as the entry, and tests/test_forwarding.py's FakeMember (a real ModelGroup behind a real
CurveZMQ server) as the hostile member that claims the prompts' prefixes to draw every forward."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import gtorrent.seed as seed_module
from gtorrent.discovery import Discovery, discover
from gtorrent.garlic import transcript
from gtorrent.group import MAX_MEMBERS, LocalState, ModelGroup
from gtorrent.identity import Identity, b64
from gtorrent.protocol import Message, ModelInfo, PeerRecord, Verdict
from gtorrent.runtime import GenerationParams, LanguageModel
from gtorrent.runtime.prefix_cache import PrefixCache, PrefixSummary
from gtorrent.seed import MAX_ROUTING_PER_SLOT, SeedService
from gtorrent.transport import Connection, Context, Reply, new_context

from .test_forwarding import ANSWER_KINDS, SHARED, FakeMember, generate_body, prefix_digests

MODEL = ModelInfo("ab" * 32, "demo", 512)


class HostileMember(FakeMember):
    """FakeMember with more ways to fail: "stall" (accepted, then `accepted` again and again, never a
    token) and "junk" (messages under other ids, never one under the forward's)."""

    async def handle(self, reply: Reply, message: Message) -> None:
        if message.kind == "forward" and self.behaviour in ("bad-counts", "overlong", "bad-reason"):
            # a validly signed answer an asker would refuse as the entry's: unsigned counts that do not add
            # up (cached > prompt), more ids than max_tokens (2 here), or an end no whole answer has
            self.forwards.append(message)
            fid = message["id"]
            ids = [5, 6, 7] if self.behaviour == "overlong" else [5, 6]
            reason = "cancelled" if self.behaviour == "bad-reason" else "length"
            await reply.send("accepted", {"id": fid, "queue": 0})
            await reply.send("token", {"id": fid, "n": 0, "text": "hi there", "ids": ids})
            signed = transcript(message.binary[0], self.model.model_id, "hi there", ids, reason)
            await reply.send("done", {"id": fid, "tokens": len(ids), "finish_reason": reason, "ttft_s": 0.01,
                                      "total_s": 0.02, "model_id": self.model.model_id,
                                      "signature": b64(self.identity.sign(signed)), "cached": 9,
                                      "prompt_tokens": 3 if self.behaviour == "bad-counts" else 30})
            return
        if message.kind == "forward" and self.behaviour in ("stall", "junk"):
            self.forwards.append(message)
            fid = message["id"]
            for _ in range(40):  # 8 s at most, then silence
                if self.behaviour == "stall":
                    await reply.send("accepted", {"id": fid, "queue": 0})
                else:
                    await reply.send("error", {"code": "busy", "message": "not yours", "id": "x" + fid[1:]})
                await asyncio.sleep(0.2)
            return
        await super().handle(reply, message)


async def entry_and_member(swarm: Any, prompts: list[str], behaviour: str) -> tuple[SeedService, PeerRecord,
                                                                                     HostileMember]:
    """A forwarding entry seed and a hostile member claiming `prompts`' prefixes, live in its group."""
    await swarm.start(relays=0, seeds=0)
    model = LanguageModel.load(None, prefix_cache=PrefixCache())
    entry = SeedService(Identity.generate(), model, trackers=[swarm.url], forwarding="tree+lb")
    entry.bind("tcp://127.0.0.1:0")
    swarm.tasks.append(asyncio.create_task(entry.serve()))
    await entry.announce()
    swarm.seeds.append(entry)
    record = (await discover(swarm.ctx, [swarm.url], role="seed")).records[entry.identity.peer_id]
    claim = [digest for prompt in prompts for digest in prefix_digests(model, prompt)]
    member = HostileMember(swarm.ctx, swarm.url, record.models[0], claim, behaviour)
    await member.start()
    swarm.closers.append(member)
    assert entry.group is not None
    deadline = time.monotonic() + 20
    while not any(m.peer_id == member.peer_id for m in entry.group.live_members()):
        assert time.monotonic() < deadline, "the member never joined the entry's group"
        await asyncio.sleep(0.05)
    return entry, record, member


async def ask(ctx: Context, record: PeerRecord, body: dict[str, Any], timeout_s: float = 30.0) -> list[Message]:
    got: list[Message] = []
    async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
        await conn.send("generate", body)
        while not got or got[-1].kind not in ("done", "error"):
            got.append(await conn.recv(timeout_s, ANSWER_KINDS))
    return got


def close_members(swarm: Any) -> None:
    for member in swarm.closers:
        if isinstance(member, FakeMember):
            member.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["refuse", "silent"])
async def test_a_member_that_fails_a_forward_draws_no_forward_for_a_while(swarm: Any, behaviour: str) -> None:
    """A member that claims every prefix but fails its forwards costs the entry one failure, not one per
    request: after a failure it is benched (group.FORWARD_BENCH_S), though its states still claim all."""
    first, second = SHARED + "Where should I fly in winter?", "A different prefix entirely: " + SHARED
    try:
        entry, record, member = await entry_and_member(swarm, [first, second], behaviour)
        model_id = record.models[0].model_id
        got = await ask(swarm.ctx, record, generate_body(model_id, first))
        assert got[-1].kind == "done" and "signer" not in got[-1].body and len(member.forwards) == 1
        started = time.monotonic()
        got = await ask(swarm.ctx, record, generate_body(model_id, second))
        assert got[-1].kind == "done" and "signer" not in got[-1].body
        assert len(member.forwards) == 1  # not drawn again by its lying summary ...
        assert time.monotonic() - started < seed_module.FORWARD_ACCEPT_TIMEOUT_S  # ... so no wait for it
        assert entry.counters["forward_fallbacks"] == 1
    finally:
        close_members(swarm)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["stall", "junk"])
async def test_a_target_cannot_hold_a_forward_without_progress(swarm: Any, monkeypatch: pytest.MonkeyPatch,
                                                               behaviour: str) -> None:
    """Repeated `accepted` messages, or messages under other ids, do not extend the entry's deadlines: the
    entry gives up on the target when its deadline passes and serves the request itself."""
    monkeypatch.setattr(seed_module, "FORWARD_ACCEPT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(seed_module, "FORWARD_FIRST_TOKEN_TIMEOUT_S", 1.0)
    prompt = SHARED + "Book me a hotel in Porto."
    try:
        _, record, member = await entry_and_member(swarm, [prompt], behaviour)
        started = time.monotonic()
        got = await ask(swarm.ctx, record, generate_body(record.models[0].model_id, prompt))
        elapsed = time.monotonic() - started
        assert len(member.forwards) == 1
        assert got[-1].kind == "done" and "signer" not in got[-1].body  # the entry served it
        assert elapsed < 4.0, f"the target held the forward {elapsed:.1f} s"  # it keeps trying for 8 s
    finally:
        close_members(swarm)


@pytest.mark.timeout(60)
async def test_a_flood_of_requests_holds_a_bounded_number_of_forwards(swarm: Any) -> None:
    """Requests beyond MAX_ROUTING_PER_SLOT per slot that are being routed or forwarded at once go
    straight to the entry's own queue (busy when full): no unbounded forwards, links or tokenizing."""
    prompt = SHARED + "Convert 100 euros to dollars."
    try:
        entry, record, member = await entry_and_member(swarm, [prompt], "silent")
        cap = MAX_ROUTING_PER_SLOT * 1  # the entry's one slot
        extra = 6
        conns = [Connection(swarm.ctx, record.endpoint, server_key=record.curve_key) for _ in range(cap + extra)]
        try:
            for conn in conns:
                await conn.send("generate", generate_body(record.models[0].model_id, prompt, max_tokens=1))
            # those beyond the cap are answered by the entry's own queue at once; the others wait on the
            # silent member (FORWARD_ACCEPT_TIMEOUT_S)
            answered = 0

            async def first_answer(conn: Connection) -> None:
                nonlocal answered
                await conn.recv(seed_module.FORWARD_ACCEPT_TIMEOUT_S * 0.75, ANSWER_KINDS)
                answered += 1

            await asyncio.gather(*(first_answer(conn) for conn in conns), return_exceptions=True)
            assert len(member.forwards) <= cap and entry.routing <= cap
            assert answered >= extra
        finally:
            for conn in conns:
                conn.close()
    finally:
        close_members(swarm)


@pytest.mark.timeout(30)
async def test_closing_an_entry_with_a_forward_under_way_returns(swarm: Any) -> None:
    """SeedService.close() terminates its ZeroMQ context, which waits for every socket: the link of a
    forward under way must be closed by close() itself, not left to its cancelled task (a hang)."""
    prompt = SHARED + "Check the weather in Oslo."
    try:
        entry, record, member = await entry_and_member(swarm, [prompt], "silent")
        async with Connection(swarm.ctx, record.endpoint, server_key=record.curve_key) as conn:
            await conn.send("generate", generate_body(record.models[0].model_id, prompt))
            deadline = time.monotonic() + 10
            while not member.forwards:
                assert time.monotonic() < deadline, "the entry never forwarded"
                await asyncio.sleep(0.02)
            swarm.seeds.remove(entry)
            entry.close()  # returns (on the code before the fix: blocked in ctx.term() until the timeout)
    finally:
        close_members(swarm)


def test_sybils_with_small_peer_ids_do_not_crowd_a_trusted_member_out_of_the_group() -> None:
    identities = sorted((Identity.generate() for _ in range(MAX_MEMBERS + 1)), key=lambda i: i.peer_id)
    trusted = identities[-1]  # the largest peer id: by id alone it would be the one left out
    now = time.time()
    records = {i.peer_id: PeerRecord.sign(i, endpoint="tcp://127.0.0.1:1", roles=("seed",), models=(MODEL,),
                                          seq=int(now * 1000), expires=now + 60) for i in identities}
    verdict = Verdict.sign(Identity.generate(), seed=trusted.peer_id, model_id=MODEL.model_id, epoch=1,
                           credibility=1.0, challenges=3, evidence="cd" * 32)
    me = Identity.generate()
    state = LocalState(PrefixSummary(frozenset()), 0, 0, 0.0)
    group = ModelGroup(me, new_context(), ["tcp://127.0.0.1:9"], MODEL.model_id, lambda: state)
    try:
        group.update(Discovery(records=records, verdicts=[verdict]))
        assert len(group.members) == MAX_MEMBERS
        assert trusted.peer_id in group.members and group.members[trusted.peer_id].trusted
        assert not any(m.trusted for p, m in group.members.items() if p != trusted.peer_id)  # unverified, judged
    finally:
        group.close()
        group.ctx.destroy(linger=0)


def test_the_summary_told_to_the_group_is_not_recomputed_per_state() -> None:
    """Every group_state a member sends is answered with this seed's state; a flood of them must not cost a
    scan of the whole prefix cache each (seed.SUMMARY_REUSE_S)."""
    cache = PrefixCache()
    model = LanguageModel.load(None, prefix_cache=cache)
    model.generate(SHARED + "Warm up the cache.", GenerationParams(max_tokens=1))
    scans = 0
    summary = cache.summary

    def counting(max_digests: int | None = None) -> PrefixSummary:
        nonlocal scans
        scans += 1
        return summary(max_digests)

    cache.summary = counting  # type: ignore[method-assign]
    seed = SeedService(Identity.generate(), model, trackers=["tcp://127.0.0.1:9"], forwarding="tree+lb")
    try:
        started = time.monotonic()
        states = [seed.group_state() for _ in range(200)]
        elapsed = time.monotonic() - started
        assert states[-1].summary == states[0].summary and len(states[0].summary.digests) > 0
        assert scans <= 1 + elapsed / seed_module.SUMMARY_REUSE_S
    finally:
        seed.close()



def test_a_forwarded_sampled_challenge_counts_for_nobody() -> None:
    """An entry can get several signed samples from a target for one challenge's bytes and relay the least
    likely: a sampled challenge answered by another seed is credited to neither; a greedy one (the same
    answer every time) is the signer's."""
    from gtorrent.challenges import Challenge
    from gtorrent.runtime import SamplingParams
    from gtorrent.verifier import ChallengeResult, tally

    score: Any = object()  # what it scored does not matter here: only whom it counts for
    sampled = ChallengeResult("entry", 1, Challenge("Once upon a time", SamplingParams(0.8, 40, 0.95), 16, 0.0),
                              None, score, signer="target")
    assert sampled.forwarded and not sampled.counted
    assert sampled.credited() is sampled and not sampled.credited().counted
    assert tally([sampled]) is None
    greedy = ChallengeResult("entry", 1, Challenge("Once upon a time", SamplingParams(), 16, 0.0), None, score,
                             signer="target")
    assert greedy.credited().seed == "target" and greedy.credited().counted


@pytest.mark.timeout(30)
async def test_a_member_that_never_answers_is_dialled_ever_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trackers do not check the endpoints records name, so a record may point every seed of a model at
    someone else's port: the exchange with a member that does not answer backs off (group.retry_delay_s)
    instead of dialling it on a fresh link every interval forever."""
    import gtorrent.group as group_module

    monkeypatch.setattr(group_module, "EXCHANGE_TIMEOUT_S", 0.05)
    monkeypatch.setattr(group_module, "EXCHANGE_INTERVAL_S", 0.05)
    dialled = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dialled
        dialled += 1
        await reader.read()  # say nothing, as a port that speaks no ZeroMQ
        writer.close()

    victim = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = victim.sockets[0].getsockname()[1]
    me, liar = Identity.generate(), Identity.generate()
    now = time.time()
    record = PeerRecord.sign(liar, endpoint=f"tcp://127.0.0.1:{port}", roles=("seed",), models=(MODEL,),
                             seq=int(now * 1000), expires=now + 60)
    ctx = new_context()
    state = LocalState(PrefixSummary(frozenset()), 0, 0, 0.0)
    group = ModelGroup(me, ctx, ["tcp://127.0.0.1:9"], MODEL.model_id, lambda: state)
    try:
        group.update(Discovery(records={record.peer_id: record}))
        member = group.members[liar.peer_id]
        member.task = asyncio.create_task(group._exchange_loop(member))
        await asyncio.sleep(2.0)  # a window to count dials in: 20 without the back-off, 7 with it
        assert member.missed >= group_module.MISSED_TO_LEAVE and not member.live
        assert dialled <= 10, f"dialled {dialled} times in 2 s"
    finally:
        group.close()
        victim.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(60)
async def test_a_target_failing_mid_answer_does_not_count_as_the_entrys_proven_failure(swarm: Any) -> None:
    """A target that breaks off after its first token makes the entry report the failure; the asker takes
    it as an answer that stopped (SeedFailed.stopped, which a verifier counts as silence), so a target
    cannot pin proven failures (challenges scored 0) on the entries that forward to it."""
    from gtorrent.asker import AnswerSink, AskRequest, AskTimeouts, SeedFailed, Signers, ask_seed

    prompt = SHARED + "Translate 'thank you' to Portuguese."
    try:
        _, record, member = await entry_and_member(swarm, [prompt], "midway")
        listed = (await discover(swarm.ctx, [swarm.url], role="seed")).records
        model_id = record.models[0].model_id
        with pytest.raises(SeedFailed) as failed:
            await ask_seed(swarm.ctx, record, model_id, AskRequest(prompt, model_id, max_tokens=4), AskTimeouts(),
                           AnswerSink(record, 100_000, None, 4), time.perf_counter(), Signers(listed))
        assert len(member.forwards) == 1
        assert failed.value.stopped and failed.value.answered and failed.value.code == "forward_failed"
    finally:
        close_members(swarm)


@pytest.mark.timeout(60)
async def test_a_target_cannot_spoil_a_signed_answer_with_bad_unsigned_counts(swarm: Any) -> None:
    """`cached` > `prompt_tokens` in a target's `done` would make the asker refuse the answer as the
    entry's malformed one; the entry drops the unsigned counts and relays the signed answer."""
    from gtorrent.asker import AnswerSink, AskRequest, AskTimeouts, Signers, ask_seed

    prompt = SHARED + "What time is it in Tokyo?"
    try:
        _, record, member = await entry_and_member(swarm, [prompt], "bad-counts")
        listed = (await discover(swarm.ctx, [swarm.url], role="seed")).records
        model_id = record.models[0].model_id
        result = await ask_seed(swarm.ctx, record, model_id, AskRequest(prompt, model_id, max_tokens=2),
                                AskTimeouts(), AnswerSink(record, 100_000, None, 2), time.perf_counter(),
                                Signers(listed))
        assert len(member.forwards) == 1
        assert result.signer == member.peer_id and result.text == "hi there"
        assert result.cached is None and result.prompt_tokens is None
    finally:
        close_members(swarm)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["overlong", "bad-reason"])
async def test_a_target_cannot_make_the_entry_relay_an_answer_the_asker_must_refuse(swarm: Any,
                                                                                   behaviour: str) -> None:
    """The entry holds what a target sends to the asker's own bounds (max_tokens ids, a whole answer's
    finish reason): more ids than asked for is the target's failure before the first token is relayed
    (the entry serves the request itself); a signed end no whole answer has is reported as
    `forward_failed` (a stop), never relayed for the asker to count as the entry's malformed answer."""
    from gtorrent.asker import AnswerSink, AskRequest, AskTimeouts, SeedFailed, Signers, ask_seed

    prompt = SHARED + "Is it raining in Dublin?"
    try:
        _, record, member = await entry_and_member(swarm, [prompt], behaviour)
        listed = (await discover(swarm.ctx, [swarm.url], role="seed")).records
        model_id = record.models[0].model_id

        async def asked() -> Any:
            return await ask_seed(swarm.ctx, record, model_id, AskRequest(prompt, model_id, max_tokens=2),
                                  AskTimeouts(), AnswerSink(record, 100_000, None, 2), time.perf_counter(),
                                  Signers(listed))

        if behaviour == "overlong":
            result = await asked()
            assert result.signer == record.peer_id  # served by the entry itself
        else:
            with pytest.raises(SeedFailed) as failed:
                await asked()
            assert failed.value.stopped and failed.value.code == "forward_failed"
        assert len(member.forwards) == 1
    finally:
        close_members(swarm)
