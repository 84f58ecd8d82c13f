"""Forwarding inside a model group (gtorrent/seed.py): real seed processes on loopback, and an in-process
group member (`FakeMember`, a real ModelGroup behind a real CurveZMQ server) that lies about its prefix
cache to attract a request and then fails, or sends forwards of its own."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gtorrent.discovery import announce_all, discover
from gtorrent.garlic import direct_request_bytes, transcript
from gtorrent.group import LocalState, ModelGroup
from gtorrent.identity import Identity, b64, unb64, verify_signature
from gtorrent.protocol import Message, ModelInfo, PeerRecord, decode, encode
from gtorrent.runtime import LanguageModel
from gtorrent.runtime.prefix_cache import CHUNK_TOKENS, PrefixSummary, chunk_hashes
from gtorrent.transport import Connection, Context, Reply, Server, new_context

from .procs import Proc, start_seed, start_tracker

SHARED = ("You are a helpful assistant for a travel agency. The tools are: search flights, book hotels, "
          "check the weather, convert currencies and translate. Always answer briefly and politely. ")
ANSWER_KINDS = frozenset({"accepted", "token", "done", "error"})


def generate_body(model_id: str, prompt: str, max_tokens: int = 6) -> dict[str, Any]:
    return {"id": secrets.token_hex(4), "model": model_id, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "top_k": 0, "top_p": 1}


async def ask_at(ctx: Context, record: PeerRecord, body: dict[str, Any]) -> tuple[list[Message], Message]:
    """Ask one seed directly; (every message, the last: done or error)."""
    got: list[Message] = []
    async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
        await conn.send("generate", body)
        while True:
            message = await conn.recv(30.0, ANSWER_KINDS)
            got.append(message)
            if message.kind in ("done", "error"):
                return got, message


def signature_checks(signer: PeerRecord, body: dict[str, Any], got: list[Message]) -> bool:
    done = got[-1]
    text = "".join(m["text"] for m in got if m.kind == "token")
    ids = [i for m in got if m.kind == "token" for i in m["ids"]]
    request = direct_request_bytes(decode(encode("generate", body)).body)
    signed = transcript(request, done["model_id"], text, ids, done["finish_reason"])
    return verify_signature(signer.signing_key, unb64(done["signature"]), signed)


async def seed_record(ctx: Context, url: str, peer_id: str) -> PeerRecord:
    return (await discover(ctx, [url], role="seed")).records[peer_id]


class FakeMember:
    """A listed seed of the model that only speaks the group protocol: it claims to hold `claim` in its
    prefix cache with an LB factor of 0 (so a tree+lb entry picks it), and answers forwards as `behaviour`
    says: "refuse" (error before any token), "silent" (no answer), "accept-then-fail" (accepted, then an
    error before any token), "midway" (one token, then an error)."""

    def __init__(self, ctx: Context, tracker: str, model: ModelInfo, claim: list[bytes], behaviour: str) -> None:
        self.ctx, self.tracker, self.model, self.behaviour = ctx, tracker, model, behaviour
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.server = Server(ctx, curve_secret=self.identity.curve_secret, name="fake member")
        self.server.bind("tcp://127.0.0.1:0")
        state = LocalState(PrefixSummary(frozenset(claim)), 0, 0, 0.0)
        self.group = ModelGroup(self.identity, ctx, [tracker], model.model_id, lambda: state)
        self.forwards: list[Message] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def handle(self, reply: Reply, message: Message) -> None:
        if message.kind == "group_state":
            await self.group.handle_state(reply, message)
            return
        self.forwards.append(message)
        fid = message["id"]
        if self.behaviour == "refuse":
            await reply.send("error", {"code": "busy", "message": "the seed's queue is full", "id": fid})
        elif self.behaviour == "accept-then-fail":
            await reply.send("accepted", {"id": fid, "queue": 3})
            await reply.send("error", {"code": "internal", "message": "generation failed", "id": fid})
        elif self.behaviour == "midway":
            await reply.send("accepted", {"id": fid, "queue": 0})
            await reply.send("token", {"id": fid, "n": 0, "text": "spliced?", "ids": [5]})
            await reply.send("error", {"code": "internal", "message": "gone", "id": fid})

    async def start(self) -> None:
        now = time.time()
        record = PeerRecord.sign(self.identity, endpoint=self.server.endpoint, roles=("seed",), models=(self.model,),
                                 seq=int(now * 1000), expires=now + 90)
        assert await announce_all(self.ctx, [self.tracker], record) == {}
        self.tasks = [asyncio.create_task(self.server.serve(self.handle, frozenset({"group_state", "forward"}))),
                      asyncio.create_task(self.group.run())]

    def forward_to(self, target: PeerRecord, mode: str, data: bytes) -> dict[str, Any]:
        body = {"id": secrets.token_hex(8), "from": self.peer_id, "to": target.peer_id,
                "model_id": self.model.model_id, "ts": int(time.time() * 1000), "mode": mode}
        return self.group.sign_forward(body, hashlib.sha256(data).digest())

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.group.close()
        self.server.close()


@pytest.fixture
async def ctx() -> AsyncIterator[Context]:
    context = new_context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(None)


def prefix_digests(demo: LanguageModel, prompt: str) -> list[bytes]:
    ids = demo.encode(prompt)
    return chunk_hashes(ids)[: (len(ids) - 1) // CHUNK_TOKENS]


async def entry_with_fake(tmp_path: Path, ctx: Context, demo: LanguageModel, prompt: str, behaviour: str,
                          procs: list[Proc]) -> tuple[PeerRecord, FakeMember]:
    tracker, url = start_tracker(tmp_path / "t")
    procs.append(tracker)
    seed, seed_id = await asyncio.to_thread(start_seed, tmp_path / "a", [url])
    procs.append(seed)
    record = await seed_record(ctx, url, seed_id)
    fake = FakeMember(ctx, url, record.models[0], prefix_digests(demo, prompt), behaviour)
    await fake.start()
    await asyncio.to_thread(seed.wait_for, rf"group: {fake.peer_id[:8]} joined", 20)
    return record, fake


def stop(procs: list[Proc]) -> None:
    for proc in reversed(procs):
        proc.kill()


# ---------------------------------------------------------------------- tests


@pytest.mark.timeout(120)
async def test_a_prompt_repeated_at_another_seed_is_forwarded_to_the_seed_holding_its_prefix(
    tmp_path: Path, ctx: Context
) -> None:
    tracker, url = start_tracker(tmp_path / "t")
    procs = [tracker]
    try:
        a, a_id = await asyncio.to_thread(start_seed, tmp_path / "a", [url])
        procs.append(a)
        b, b_id = await asyncio.to_thread(start_seed, tmp_path / "b", [url], "--kv-cache-mb", "0")  # B holds nothing
        procs.append(b)
        await asyncio.to_thread(b.wait_for, rf"group: {a_id[:8]} joined", 20)
        a_record, b_record = await seed_record(ctx, url, a_id), await seed_record(ctx, url, b_id)
        model_id = a_record.models[0].model_id
        body = generate_body(model_id, SHARED + "Question one: how warm is Lisbon in May?")
        got, done = await ask_at(ctx, a_record, body)
        assert done.kind == "done" and "signer" not in done.body and done["cached"] == 0  # A served it: a miss
        await asyncio.to_thread(a.wait_for, r"served \d+ tokens · cached 0/\d+ prompt tokens", 10)
        # B learns A's prefixes within an exchange or two; until then it serves such prompts itself
        deadline = time.monotonic() + 20
        while True:
            body = generate_body(model_id, SHARED + f"Question {secrets.token_hex(2)}: and in June?")
            got, done = await ask_at(ctx, b_record, body)
            assert done.kind == "done"
            if done.get("signer") == a_id or time.monotonic() > deadline:
                break
        assert done.get("signer") == a_id and done["cached"] > 0 and done["prompt_tokens"] > done["cached"]
        assert signature_checks(a_record, body, got)  # A signed the request the asker sent B, verbatim
        assert [m["n"] for m in got if m.kind == "token"] == list(range(len(got) - 2))
        await asyncio.to_thread(b.wait_for, rf"forwarded to {a_id[:8]}: served \d+ tokens · cached [1-9]\d*/", 10)
        await asyncio.to_thread(a.wait_for, rf"cached [1-9]\d*/\d+ prompt tokens .* forwarded by {b_id[:8]}", 10)
        # the same kind of prompt with forwarding declined (an asker that refused the signer, asker.SignerRefused)
        # is B's own answer, under B's key
        body = {**generate_body(model_id, SHARED + "Question three: and in July?"), "forward": False}
        got, done = await ask_at(ctx, b_record, body)
        assert done.kind == "done" and "signer" not in done.body and done["cached"] == 0
        assert signature_checks(b_record, body, got)
    finally:
        stop(procs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("behaviour", ["refuse", "silent", "accept-then-fail"])
async def test_a_target_failing_before_its_first_token_leaves_the_request_to_the_entry(
    tmp_path: Path, ctx: Context, demo: LanguageModel, behaviour: str
) -> None:
    prompt = SHARED + "Where should I fly in winter?"
    procs: list[Proc] = []
    fake: FakeMember | None = None
    try:
        record, fake = await entry_with_fake(tmp_path, ctx, demo, prompt, behaviour, procs)
        body = generate_body(record.models[0].model_id, prompt)
        got, done = await ask_at(ctx, record, body)
        assert len(fake.forwards) == 1  # the lying summary drew the request to the fake member
        assert done.kind == "done" and "signer" not in done.body  # ... and the entry served it itself
        assert signature_checks(record, body, got)
        assert [m.kind for m in got].count("accepted") == 1  # the target's, relayed, and no second one
        assert demo.generate(prompt, _greedy(6)).text == "".join(m["text"] for m in got if m.kind == "token")
    finally:
        if fake is not None:
            fake.close()
        stop(procs)


@pytest.mark.timeout(120)
async def test_a_target_failing_mid_answer_is_reported_not_spliced(tmp_path: Path, ctx: Context,
                                                                   demo: LanguageModel) -> None:
    prompt = SHARED + "Book me a hotel in Porto."
    procs: list[Proc] = []
    fake: FakeMember | None = None
    try:
        record, fake = await entry_with_fake(tmp_path, ctx, demo, prompt, "midway", procs)
        got, last = await ask_at(ctx, record, generate_body(record.models[0].model_id, prompt))
        assert len(fake.forwards) == 1
        assert last.kind == "error" and last["code"] == "forward_failed"  # seed.FORWARD_FAILED: as stopped
        assert "".join(m["text"] for m in got if m.kind == "token") == "spliced?"  # only the target's piece
    finally:
        if fake is not None:
            fake.close()
        stop(procs)


@pytest.mark.timeout(120)
async def test_a_forward_is_never_forwarded_again(tmp_path: Path, ctx: Context, demo: LanguageModel) -> None:
    """The fake member claims the prompt's prefix, so the seed's policy would pick it for a request of its
    own; a `forward` from the fake is served right there, and nothing comes back to the fake: one hop."""
    prompt = SHARED + "Translate 'good morning' to Portuguese."
    procs: list[Proc] = []
    fake: FakeMember | None = None
    try:
        record, fake = await entry_with_fake(tmp_path, ctx, demo, prompt, "refuse", procs)
        model_id = record.models[0].model_id
        direct = direct_request_bytes(decode(encode("generate", generate_body(model_id, prompt))).body)
        private = json.dumps({**generate_body(model_id, prompt), "reply_key": b64(secrets.token_bytes(32))}).encode()
        for mode, data in (("direct", direct), ("private", private)):
            body = fake.forward_to(record, mode, data)
            got: list[Message] = []
            async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
                await conn.send("forward", body, data)
                while not got or got[-1].kind not in ("done", "error"):
                    got.append(await conn.recv(30.0, ANSWER_KINDS))
            done = got[-1]
            assert done.kind == "done" and done["id"] == body["id"] and "signer" not in done.body, got
            text = "".join(m["text"] for m in got if m.kind == "token")
            ids = [i for m in got if m.kind == "token" for i in m["ids"]]
            signed = transcript(data, model_id, text, ids, done["finish_reason"])  # over the bytes forwarded
            assert verify_signature(record.signing_key, unb64(done["signature"]), signed)
        assert fake.forwards == []  # never forwarded back, though the policy would have picked the fake
        # a forward replayed is refused; so is one from a seed that is not a member
        async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
            answer = await conn.request("forward", body, ANSWER_KINDS, 5.0)
        assert answer.kind == "error" and answer["code"] == "invalid"
        stranger = FakeMember(ctx, "tcp://127.0.0.1:9", record.models[0], [], "refuse")
        try:
            async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
                await conn.send("forward", stranger.forward_to(record, "direct", direct), direct)
                answer = await conn.recv(5.0, ANSWER_KINDS)
            assert answer.kind == "error" and answer["code"] == "not_member"
        finally:
            stranger.close()
    finally:
        if fake is not None:
            fake.close()
        stop(procs)


def _greedy(max_tokens: int) -> Any:
    from gtorrent.runtime import GenerationParams

    return GenerationParams(max_tokens=max_tokens)


@pytest.mark.timeout(120)
async def test_a_private_ask_reaching_a_seed_without_the_prefix_is_forwarded_to_its_holder(
    swarm: Any, tmp_path: Path
) -> None:
    """In process (tests/test_private.py's Swarm): the ask's circuits end at the entry, which forwards the
    combined request bytes; the holder signs over them, and the asker accepts the holder as signer."""
    from gtorrent.asker import AskRequest, Signers
    from gtorrent.private import ask_private
    from gtorrent.runtime import GenerationParams
    from gtorrent.runtime.prefix_cache import PrefixCache
    from gtorrent.seed import SeedService
    from gtorrent.store import Store

    await swarm.start(relays=12, seeds=0)
    holder_model, entry_model = LanguageModel.load(None, prefix_cache=PrefixCache()), LanguageModel.load(None)
    holder, entry = (SeedService(Identity.generate(), model, trackers=[swarm.url], forwarding="tree+lb")
                     for model in (holder_model, entry_model))
    for seed in (holder, entry):
        seed.bind("tcp://127.0.0.1:0")
        swarm.tasks.append(asyncio.create_task(seed.serve()))
        await seed.announce()
        swarm.seeds.append(seed)
    holder_model.generate(SHARED + "What is the capital of Peru?", GenerationParams(max_tokens=2))
    prompt = SHARED + "And the capital of Chile?"
    digests = prefix_digests(holder_model, prompt)
    assert holder_model.prefix_cache is not None and holder_model.prefix_cache.longest_match(digests) > 0
    assert entry.group is not None
    deadline = time.monotonic() + 20  # the entry learns the holder's summary within an exchange or two
    while not any(m.peer_id == holder.identity.peer_id and m.summary.longest_match(digests) > 0
                  for m in entry.group.live_members()):
        assert time.monotonic() < deadline, "the entry never learned the holder's prefixes"
        await asyncio.sleep(0.05)
    listed = (await discover(swarm.ctx, [swarm.url], role="seed")).records
    record = listed[entry.identity.peer_id]
    store = Store.open(tmp_path)
    try:
        result = await ask_private(swarm.ctx, [swarm.url], AskRequest(prompt, record.models[0].model_id, max_tokens=8),
                                   store, only_seed=record, signers=Signers(listed))
    finally:
        store.close()
    assert result.mode == "private" and result.seed == entry.identity.peer_id
    assert result.signer == holder.identity.peer_id and result.cached is not None and result.cached > 0
    assert result.text == entry_model.generate(prompt, GenerationParams(max_tokens=8)).text
    assert entry.counters["forwarded"] == 1 and holder.counters["forwards_served"] == 1
    # the holder's record says how much of its recent prompts came from its cache (contract 3)
    assert result.prompt_tokens is not None
    assert holder.record().load["cache_hit"] == round(result.cached / result.prompt_tokens, 3) > 0
    assert entry.record().load["cache_hit"] == 0.0  # it generated nothing


def test_seed_flags_and_the_per_request_line(cli: Any) -> None:  # type: ignore[no-untyped-def]
    from gtorrent_cli.seed import DEFAULT_KV_CACHE_MB, served_line

    from gtorrent.runtime.prefix_cache import DEFAULT_MAX_BYTES
    from gtorrent.seed import ServedRequest

    assert DEFAULT_KV_CACHE_MB << 20 == DEFAULT_MAX_BYTES  # the flag's default is the runtime's

    refused = cli("seed", "--forwarding", "random")
    assert refused.code != 0 and "unknown forwarding policy 'random'" in refused.err
    assert cli("seed", "--kv-cache-mb", "-1").code != 0
    assert served_line(ServedRequest(123, 80, 96, 1.2)) == "served 123 tokens · cached 80/96 prompt tokens · 1.20 s"
    line = served_line(ServedRequest(5, 0, 9, 0.02, forwarded_to="[red]x\x1b]0;t\x07abcdefgh"))
    assert line.startswith("forwarded to \\[red]x") and "\x1b" not in line  # peer text is data, never markup
