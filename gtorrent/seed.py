"""The seed: serves one loaded model to the swarm and keeps its record fresh on the trackers.

Requests (`generate`) are answered with `accepted`, a stream of `token` messages and a final `done`
(or `error`). Every piece of text goes out with the token ids it came from, and every answer, direct or
private, ends with the seed's signature over the transcript v2 (garlic.transcript) of exactly what was
sent: the request bytes, the model id, the text, the ids, their count and the finish reason.

Generation runs in worker threads (ONNX Runtime releases the GIL), at most `max_concurrency` at once;
further requests wait in FIFO order, so the event loop stays free to keep serving other messages while
a model generates. The load reported in announces is the number of
requests waiting or running and an EWMA of recent request latency.

Sequence numbers are milliseconds since the epoch, so they keep increasing across restarts without any
state on disk, and a tracker never mistakes a restarted seed for a replay.

Model groups and forwarding (issue 9; docs/PROTOCOL.md "Model groups and forwarding"): with a
`forwarding` policy the seed joins the group of its model (group.py) and routes each request that
arrives here, direct or as the terminal of a private circuit, by forwarding.choose. To forward, it sends
the chosen member a `forward` holding the ORIGINAL request bytes; the member parses them itself, serves
the request as a direct one (it never forwards a `forward` again: at most one hop, no loops) and signs the
transcript over those bytes; the entry streams the answer to its asker and passes the member's signature
through with `signer` = the member's peer id, after checking it. A member that fails before its first
token (refusal, busy, timeout, link down, bad message) leaves the request to the entry, which serves it
itself; one that fails later makes the entry report an error (two seeds' text is never spliced). Every
`done` carries `cached` and `prompt_tokens`; the LB factor takes each served request's latency from
its arrival here to its end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .asker import FINISH_REASONS, answer_budget
from .discovery import Announcer, PeerDirectory
from .errors import GtorrentError, UsageError
from .forwarding import POLICIES, LbFactor, Member, choose
from .garlic import (
    REPLY_KEY_BYTES,
    CloveAssembler,
    GarlicError,
    chunk_fits,
    direct_request_bytes,
    reply_payloads,
    split_to_fit,
    transcript,
)
from .group import EMPTY, MAX_SUMMARY_DIGESTS, LocalState, ModelGroup
from .identity import Identity, b64, unb64, verify_signature
from .onion import BODY_BYTES, DATA, PAYLOAD_HEADER, OnionError, ReplayCache
from .protocol import (
    MAX_TOKEN_IDS_PER_MESSAGE,
    Message,
    ModelInfo,
    PeerRecord,
    ProtocolError,
    decode,
    encode,
    unique_keys,
)
from .relay import Circuit, RelayService, serve_relay
from .runtime import GenerationParams, GenerationResult, LanguageModel, SamplingParams
from .runtime.prefix_cache import CHUNK_TOKENS, PrefixSummary, chunk_hashes
from .sida import Clove, SidaError, combine
from .transport import Connection, PeerTimeout, Reply, Server, TransportError, new_context

log = logging.getLogger(__name__)

RECORD_TTL_S = 90.0
MAX_QUEUE_PER_SLOT = 8  # requests waiting per concurrent slot before the seed answers "busy"
MAX_CHUNK_CHARS = 4000  # a token message's text stays under the protocol's 4096
MAX_PRIVATE_CHUNK_CHARS = 600  # an upper bound; garlic.split_to_fit cuts by bytes so fragments fit a cell
PRIVATE_ASK_TTL_S = 60.0  # an ask whose cloves never reach k is forgotten after this
MAX_PENDING_ASKS = 256  # asks still collecting cloves; beyond this the oldest is dropped
MAX_PENDING_ASK_BYTES = 16 << 20  # clove bytes those asks hold; beyond this the oldest is dropped
MAX_PARTIAL_CLOVE_BYTES = 16 << 20  # clove pieces held by circuits whose clove is not whole yet
MAX_FINISHED_ASKS = 100_000  # ask ids remembered against late cloves (the oldest go first when full)
PRIVATE_BATCH_S = 0.1  # answer text is batched this long on private paths (after the first piece)
REPLY_CAPACITY = BODY_BYTES - PAYLOAD_HEADER.size  # payload bytes of one backward cell
LATENCY_EWMA = 0.125  # weight of the newest request latency (TCP SRTT style, as the paper)
CACHE_HIT_WINDOW = 64  # requests over which the record's "cache_hit" share is taken
FORWARD_ACCEPT_TIMEOUT_S = 2.0  # a forward's target acknowledges within this (the asker waits 5 s in all)
FORWARD_FIRST_TOKEN_TIMEOUT_S = 20.0  # ... and sends its first token within this (its queue included)
FORWARD_BETWEEN_TOKENS_S = 30.0  # as the asker's own wait between tokens
MAX_FORWARD_REQUEST_BYTES = 256 * 1024  # the original request bytes of a forward (one frame)
FORWARD_KINDS = frozenset({"accepted", "token", "done", "error"})
# the error an entry sends when its target failed after the first token: the asker takes it as an answer
# that stopped (SeedFailed.stopped), which a verifier counts as silence, not as the entry's proven
# failure (a target must not be able to frame the entries that forward to it)
FORWARD_FAILED = "forward_failed"
# requests routed or forwarded from here at once, per slot (`route`): enough for a busy group (a member's
# own queue holds MAX_QUEUE_PER_SLOT per slot), a bound for a flood
MAX_ROUTING_PER_SLOT = 4 * MAX_QUEUE_PER_SLOT
SUMMARY_REUSE_S = 0.1  # the prefix summary told to the group is recomputed at most this often


@dataclass
class SeedLoad:
    waiting: int = 0
    running: int = 0
    latency_s: float = 0.0
    served: int = 0
    # (prompt tokens from the prefix cache, prompt tokens) of the recent requests served here
    recent_prompts: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=CACHE_HIT_WINDOW))

    def finished(self, latency_s: float) -> None:
        self.served += 1
        self.latency_s = latency_s if self.served == 1 else (1 - LATENCY_EWMA) * self.latency_s + LATENCY_EWMA * latency_s

    def prompt(self, cached: int, prompt_tokens: int) -> None:
        self.recent_prompts.append((cached, prompt_tokens))

    @property
    def cache_hit(self) -> float:
        """Share of the recent requests' prompt tokens that came from the prefix cache (0..1)."""
        total = sum(prompt for _, prompt in self.recent_prompts)
        return round(sum(cached for cached, _ in self.recent_prompts) / total, 3) if total else 0.0

    def as_record(self) -> dict[str, float]:
        return {"queue": float(self.waiting + self.running), "latency_s": round(self.latency_s, 4),
                "cache_hit": self.cache_hit}


@dataclass(frozen=True)
class ServedRequest:
    """One request finished at this seed, for the seed's per-request line (`SeedService.on_served`)."""

    tokens: int
    cached: int  # prompt tokens taken from the prefix cache (at the seed that generated)
    prompt_tokens: int
    total_s: float  # from its arrival here to its end
    forwarded_to: str | None = None  # the group member that generated it (this seed was the entry)
    forwarded_by: str | None = None  # the entry that forwarded it here
    mode: str = "direct"  # how its asker sent it: "direct" (the seed sees who asks) or "private" (circuits)


class Responder:
    """Where one request's answer goes: straight back over CurveZMQ, or back over circuits.

    `text` is given each piece with its token ids and records both (`sent_text`, `sent_ids`): the
    transcript the seed signs is built from what was handed to the asker, nothing else."""

    max_chunk_chars = MAX_CHUNK_CHARS
    max_chunk_ids = MAX_TOKEN_IDS_PER_MESSAGE
    gone = False  # the asker can no longer be reached: stop generating for it

    forwarded_by: str | None = None  # a `forward`'s responder: the entry that sent it (ForwardResponder)
    mode = "direct"  # how the asker sent the request: "direct" or "private" (ServedRequest.mode)
    arrived = 0.0  # perf_counter when the request reached this seed (its LB factor's latency starts)

    def __init__(self, request: bytes) -> None:
        self.request = request  # the request bytes the transcript hashes (garlic.transcript)
        self.sent_text: list[str] = []
        self.sent_ids: list[int] = []
        self.arrived = time.perf_counter()

    def signed(self, identity: Identity, model_id: str, finish_reason: str) -> str:
        """b64 of this seed's signature over the transcript of the answer sent so far."""
        signed = transcript(self.request, model_id, "".join(self.sent_text), self.sent_ids, finish_reason)
        return b64(identity.sign(signed))

    async def accepted(self, queue: int) -> None: ...
    async def text(self, piece: str, ids: list[int]) -> None:
        self.sent_text.append(piece)
        self.sent_ids.extend(ids)

    async def done(self, info: dict[str, Any]) -> None: ...
    async def error(self, code: str, message: str) -> None: ...


class DirectResponder(Responder):
    def __init__(self, reply: Reply, message: Message) -> None:
        super().__init__(direct_request_bytes(message.body))
        self.reply, self.request_id, self.count = reply, message["id"], 0
        self.was_accepted = False

    async def accepted(self, queue: int) -> None:
        if self.was_accepted:  # a forward's target accepted, then failed before its first token
            return
        self.was_accepted = True
        await self.reply.send("accepted", {"id": self.request_id, "queue": queue})

    async def text(self, piece: str, ids: list[int]) -> None:
        await super().text(piece, ids)
        body = {"id": self.request_id, "n": self.count, "text": piece, "ids": ids}
        if not await self.reply.send("token", body):
            self.gone = True
        self.count += 1

    async def done(self, info: dict[str, Any]) -> None:
        await self.reply.send("done", {"id": self.request_id, **info})

    async def error(self, code: str, message: str) -> None:
        await self.reply.send("error", {"code": code, "message": message, "id": self.request_id})


class ForwardResponder(DirectResponder):
    """The target's side of a `forward`: answers the entry like a direct asker, under the forward's id,
    and signs the transcript over the ORIGINAL request bytes the entry sent."""

    def __init__(self, reply: Reply, forward_id: str, request: bytes, entry: str, mode: str = "direct") -> None:
        Responder.__init__(self, request)
        self.reply, self.request_id, self.count = reply, forward_id, 0
        self.was_accepted = False
        self.forwarded_by = entry
        self.mode = mode  # the original asker's, as the entry's signed `forward` says


def prompt_ids(model: LanguageModel, request: dict[str, Any]) -> list[int]:
    """The prompt's token ids of a generate request: its `messages` rendered by the model's chat
    template, else its `prompt` (one user turn when `chat`). A verifier's replay renders the same."""
    messages = request.get("messages")
    if messages is not None:
        return model.encode_messages(messages)
    return model.encode(str(request["prompt"]), chat=bool(request.get("chat", False)))


def parse_private_request(request_bytes: bytes) -> tuple[dict[str, Any], bytes]:
    """(the generate request, the reply key) of a private ask's combined request bytes; raises ValueError,
    KeyError, TypeError, AttributeError or ProtocolError for anything not a valid request."""
    request = json.loads(request_bytes, object_pairs_hook=unique_keys)
    if not isinstance(request, dict):
        raise ValueError("the request is not an object")
    reply_key = unb64(request.pop("reply_key"))
    if len(reply_key) != REPLY_KEY_BYTES:
        raise ValueError("bad reply key")
    decode(encode("generate", {**request, "id": "private"}))  # the same schema as a direct request
    request["id"] = "private"
    return request, reply_key


@dataclass
class PrivateAsk:
    """The cloves and circuits of one private ask, grouped by its ask id."""

    cloves: dict[int, Clove] = field(default_factory=dict)
    circuits: dict[int, Circuit] = field(default_factory=dict)  # path index (clove index - 1) -> circuit
    started: bool = False
    created: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    held_bytes: int = 0  # clove bytes held while the ask waits for k of them


class PrivateResponder(Responder):
    """Seals each chunk with the asker's reply key and spreads it over the ask's paths (any k suffice)."""

    max_chunk_chars = MAX_PRIVATE_CHUNK_CHARS
    mode = "private"

    def __init__(self, seed: SeedService, ask: PrivateAsk, reply_key: bytes, request: bytes, n: int, k: int) -> None:
        super().__init__(request)
        self.seed, self.ask, self.reply_key, self.n, self.k = seed, ask, reply_key, n, k
        self.index = 0
        self.pending: list[str] = []
        self.pending_ids: list[int] = []
        self.last_flush = 0.0

    async def _chunk(self, chunk: dict[str, Any]) -> None:
        payloads = reply_payloads(self.reply_key, self.index, chunk, self.n, self.k)
        self.index += 1
        live = 0
        for path, payload in enumerate(payloads):
            circuit = self.ask.circuits.get(path)
            if circuit is None or circuit.closed:
                continue  # that path is gone; any k of the others deliver the chunk
            try:
                await circuit.send_back(DATA, payload)
                live += 1
            except Exception:  # noqa: BLE001 - a broken path must not stop the others
                log.debug("reply fragment lost on path %d", path)
        if live < self.k:
            self.gone = True  # the asker cannot rebuild chunks any more

    async def accepted(self, queue: int) -> None:
        pass  # the first chunk says it all; an extra round on every path buys nothing

    async def text(self, piece: str, ids: list[int]) -> None:
        # The first piece goes at once (time to first token); later ones are batched for up to
        # PRIVATE_BATCH_S: each chunk costs n cells through n x L relays, so fewer, fuller chunks.
        await super().text(piece, ids)
        self.pending.append(piece)
        self.pending_ids.extend(ids)
        now = time.monotonic()
        full = max(sum(map(len, self.pending)), len(self.pending_ids)) >= self.max_chunk_chars
        if self.index == 0 or now - self.last_flush >= PRIVATE_BATCH_S or full:
            await self._flush(now)

    async def _flush(self, now: float) -> None:
        text, self.pending = "".join(self.pending), []
        ids, self.pending_ids = self.pending_ids, []
        self.last_flush = now
        # by bytes: each fragment one cell
        for piece, piece_ids in split_to_fit(text, ids, self.k, REPLY_CAPACITY):
            await self._chunk({"text": piece, "ids": piece_ids})

    async def done(self, info: dict[str, Any]) -> None:
        if self.pending or self.pending_ids:
            await self._flush(time.monotonic())
        signature = info.pop("signature")  # the chunk keeps it beside the statistics, as in v1
        await self._chunk({"done": info, "signature": signature})

    async def error(self, code: str, message: str) -> None:
        while len(message) > 8 and not chunk_fits({"error": code, "message": message}, self.k, REPLY_CAPACITY):
            message = message[: len(message) // 2]
        await self._chunk({"error": code, "message": message})


class SeedService:
    def __init__(
        self,
        identity: Identity,
        model: LanguageModel,
        *,
        trackers: list[str],
        name: str | None = None,
        max_concurrency: int = 1,
        extra_roles: tuple[str, ...] = (),
        forwarding: str | None = None,
        verifiers: frozenset[str] | None = None,
    ) -> None:
        """`forwarding`: a policy of forwarding.POLICIES to join the model's group and route requests by
        ("off": join, tell the group this seed's state, never forward); None: no group at all.
        `verifiers`: whose verdicts decide which members are untrusted (None: those the trackers admit)."""
        if forwarding is not None and forwarding not in POLICIES:
            raise UsageError(f"unknown forwarding policy {forwarding!r}", hint=f"use one of {', '.join(POLICIES)}")
        self.identity = identity
        self.model = model
        self.name = name or model.name
        self.ctx = new_context()
        self.server = Server(self.ctx, curve_secret=identity.curve_secret, name="seed")
        self.announcer = Announcer(self.ctx, trackers, lambda stopped: self.record(stopped=stopped), RECORD_TTL_S / 3)
        # every seed relays other seeds' traffic, and is the terminal of circuits that ask it privately
        # it extends only to peers its trackers announce, and re-announces when its onion key rotates
        self.relay = RelayService(identity, self.ctx, terminal=self.terminal, directory=PeerDirectory(self.ctx, trackers))
        self.relay.on_rotate = self.announcer.announce
        self.relay.on_close = self._circuit_closed
        self.relay.own_endpoint = lambda: self.server.endpoint
        self.relay.own_record = lambda: self.record()
        # circuits whose clove is still arriving, oldest first, with the bytes their pieces hold: bounded
        # in all (MAX_PARTIAL_CLOVE_BYTES), the oldest cut first, so circuits that never finish a clove
        # push out each other, not the honest ones whose cloves complete within a moment
        self.assembling: OrderedDict[Circuit, int] = OrderedDict()
        self.assembling_bytes = 0
        self.private_asks: dict[bytes, PrivateAsk] = {}
        # ask ids seen recently: a late clove of an answered ask must not start it again; a flood of ask
        # ids only evicts the oldest (late cloves come seconds after the first), never refuses new asks
        self.finished_asks = ReplayCache(ttl_s=PRIVATE_ASK_TTL_S * 5, max_entries=MAX_FINISHED_ASKS)
        self.max_concurrency = max_concurrency
        self.max_queue = MAX_QUEUE_PER_SLOT * max_concurrency
        self.cancelled = 0  # requests stopped because their asker went away
        self.dropped_asks = 0  # incomplete private asks dropped to stay within MAX_PENDING_ASKS / _BYTES
        self.roles = ("seed", "relay", *extra_roles)
        self.load = SeedLoad()
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
        self.slots = asyncio.Semaphore(max_concurrency)
        self.forwarding = forwarding or "off"
        self.lb = LbFactor()  # the paper's LB factor over the requests served here, queueing included
        self.turn = 0  # requests routed so far (round robin's counter)
        self.routing = 0  # requests being routed or forwarded from here now (`route`)
        self._summary: tuple[float, PrefixSummary] | None = None  # (monotonic time, summary): `group_state`
        # the links of the forwards under way: `close` closes them at once (a cancelled forward's task
        # would close its link only at its next turn, and ctx.term() waits for every socket: a hang)
        self.forward_links: set[Connection] = set()
        self.max_routing = MAX_ROUTING_PER_SLOT * max_concurrency
        self.counters: Counter[str] = Counter()  # forwarded, forward_fallbacks, forwards_served, refused
        self.on_served: Callable[[ServedRequest], None] = lambda served: None
        self.forward_ids = ReplayCache(ttl_s=600.0, max_entries=MAX_FINISHED_ASKS)
        self.group: ModelGroup | None = None
        if forwarding is not None:
            self.group = ModelGroup(identity, self.ctx, trackers, model.model_id, self.group_state,
                                    local_load=self.group_load, verifiers=verifiers)

    def bind(self, url: str, advertise: str | None = None) -> str:
        return self.server.bind(url, advertise)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.model.model_id, self.name, self.model.context_length)

    def record(self, *, stopped: bool = False) -> PeerRecord:
        now = time.time()
        return PeerRecord.sign(
            self.identity,
            endpoint=self.server.endpoint,
            roles=self.roles,
            models=(self.info,),
            load=self.load.as_record(),
            seq=int(now * 1000),
            expires=now + RECORD_TTL_S,
            stopped=stopped,
            onion_key=self.relay.onion_public,
        )

    async def announce(self, *, stopped: bool = False) -> dict[str, str]:
        return await self.announcer.announce(stopped=stopped)

    # ------------------------------------------------------------------ requests

    def serves(self, model: str) -> bool:
        return model in (self.model.model_id, self.name) or (len(model) >= 8 and self.model.model_id.startswith(model))

    async def handle(self, reply: Reply, message: Message) -> None:
        """Direct requests (CurveZMQ straight from the asker), and the group's messages."""
        if message.kind == "ping":
            await reply.send("pong", {})
            return
        if message.kind == "group_state":
            if self.group is None:
                await reply.send("error", {"code": "not_member", "message": "this seed is in no group"})
                return
            await self.group.handle_state(reply, message)
            return
        if message.kind == "group_load":  # one way: never answered
            if self.group is not None:
                self.group.take_load(message)
            return
        if message.kind == "forward":
            await self.handle_forward(reply, message)
            return
        await self.route(message.body, DirectResponder(reply, message), "direct")

    # ------------------------------------------------------------------ model group and forwarding

    def group_state(self) -> LocalState:
        """This seed's state for its group. The summary is computed at most once per SUMMARY_REUSE_S: it
        scans the cache's entries under the lock the generating threads share, on the event loop, and
        every `group_state` a member sends is answered with one (a member flooding states must not turn
        each into that scan)."""
        cache = self.model.prefix_cache
        now = time.monotonic()
        if cache is None:
            summary = EMPTY
        elif self._summary is not None and now - self._summary[0] < SUMMARY_REUSE_S:
            summary = self._summary[1]
        else:
            summary = cache.summary(max_digests=MAX_SUMMARY_DIGESTS)
            self._summary = (now, summary)
        return LocalState(summary, self.load.waiting, self.load.running, self.lb.value)

    def group_load(self) -> LocalState:
        """This seed's load for a push between exchanges (group.load_changed): no summary."""
        return LocalState(EMPTY, self.load.waiting, self.load.running, self.lb.value)

    async def _choose(self, request: dict[str, Any]) -> str | None:
        """The group member that should serve `request` by the policy; None: this seed."""
        group = self.group
        if group is None or self.forwarding == "off" or not group.live_members():
            return None
        if not self.serves(str(request.get("model", ""))):
            return None
        try:
            ids = await asyncio.to_thread(prompt_ids, self.model, request)
        except (GtorrentError, KeyError):
            return None  # serve_request says what is wrong with it
        digests = chunk_hashes(ids)[: max(len(ids) - 1, 0) // CHUNK_TOKENS]  # as the runtime looks them up
        cache = self.model.prefix_cache
        depth = cache.longest_match(digests) if cache is not None else 0
        own = Member(self.identity.peer_id, PrefixSummary(frozenset(digests[:depth])), self.lb.value,
                     self.load.waiting + self.load.running)
        turn, self.turn = self.turn, self.turn + 1
        target = choose(self.forwarding, digests, group.routing_view(own), own.peer_id, turn=turn)
        return None if target == own.peer_id else target

    async def route(self, request: dict[str, Any], responder: Responder, mode: str) -> None:
        """A request that arrived here (`mode` "direct" or "private"): forward it or serve it here.

        At most `max_routing` requests are being routed (tokenized for the policy) or forwarded from here
        at once; beyond that a request goes straight to `serve_request`, whose queue bound answers "busy"
        when full. So a flood costs this seed no more than it did before forwarding existed: no unbounded
        tokenizing, tasks or links to members. A request with `"forward": false` is always served here
        (the asker refused the signer of this seed's forwarded answer, asker.SignerRefused)."""
        if self.routing < self.max_routing and request.get("forward") is not False:
            self.routing += 1
            try:
                target = await self._choose(request)
                if target is not None:
                    if await self._forward(target, responder, mode, int(request["max_tokens"])):
                        return
                    self.counters["forward_fallbacks"] += 1  # the target failed before its first token
            finally:
                self.routing -= 1
        await self.serve_request(request, responder)

    async def _forward(self, target: str, responder: Responder, mode: str, max_tokens: int) -> bool:
        """Have group member `target` serve the request and stream its answer to `responder`. False when
        it failed before its first token (the entry then serves the request itself); True when the
        request is settled (answered, or reported failed to the asker). What the target sends is held to
        the bounds an asker holds the entry to (asker.AnswerSink, check_answer: `max_tokens` ids, the
        answer budget, a whole answer's finish reason): relayed, a breach would be the entry's failure."""
        group = self.group
        member = group.members.get(target) if group is not None else None
        data = responder.request
        if group is None or member is None or len(data) > MAX_FORWARD_REQUEST_BYTES:
            return False
        forward_id = secrets.token_hex(16)
        body = group.sign_forward(
            {"id": forward_id, "from": self.identity.peer_id, "to": target, "model_id": self.model.model_id,
             "ts": int(time.time() * 1000), "mode": mode},
            hashlib.sha256(data).digest(),
        )
        started = False  # the first token came: from now on a failure is reported, never served here
        group.note_forward(target)
        conn = Connection(self.ctx, member.record.endpoint, server_key=member.record.curve_key,
                          name=f"group member {target[:8]}")
        self.forward_links.add(conn)
        loop = asyncio.get_running_loop()
        accepted = False
        used = 0  # answer characters relayed, +1 per piece (asker.AnswerSink)
        failed: bool | None = None  # True: the target's failure; False: it served; None: neither (the asker left)
        try:
            await conn.send("forward", body, data)
            # Absolute deadlines: only progress (the first `accepted`, then each token) moves them, so a
            # target cannot hold the request (and the asker) forever with repeated `accepted` messages or
            # messages under other ids
            deadline = loop.time() + FORWARD_ACCEPT_TIMEOUT_S
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise PeerTimeout(f"group member {target[:8]} made no progress in time")
                message = await conn.recv(remaining, FORWARD_KINDS)
                if message.get("id") != forward_id:
                    continue
                if message.kind == "accepted":
                    if not accepted and not started:
                        accepted = True
                        await responder.accepted(message["queue"])
                        deadline = loop.time() + FORWARD_FIRST_TOKEN_TIMEOUT_S
                elif message.kind == "token":
                    used += len(message["text"]) + 1
                    if used > answer_budget(max_tokens) or len(responder.sent_ids) + len(message["ids"]) > max_tokens:
                        raise ValueError("the target sent more answer than the request allows")
                    started = True
                    if responder.gone:
                        return True  # closing the link stops the target too
                    await responder.text(message["text"], message["ids"])
                    deadline = loop.time() + FORWARD_BETWEEN_TOKENS_S
                elif message.kind == "done":
                    settled, valid = await self._forwarded_done(member.record.signing_key, target, message, responder,
                                                                started, max_tokens)
                    failed = not valid
                    return settled
                else:  # error
                    failed = True
                    log.debug("forward to %s refused: %s", target[:8], message.get("message"))
                    if not started:
                        return False
                    await responder.error(FORWARD_FAILED, "the group member serving this request failed")
                    return True
        except (TransportError, ProtocolError, ValueError) as exc:
            failed = True
            log.debug("forward to %s failed: %s", target[:8], exc)
            if not started:
                return False
            reason = "timed out" if isinstance(exc, PeerTimeout) else "failed"
            await responder.error(FORWARD_FAILED, f"the group member serving this request {reason}")
            return True
        finally:
            self.forward_links.discard(conn)
            conn.close()
            if failed:  # refused, silent, stalled, a bad signature or broken mid-answer: benched a while
                group.note_forward_failed(target)
            elif failed is not None:
                group.note_forward_served(target)

    async def _forwarded_done(
        self, signing_key: bytes, target: str, message: Message, responder: Responder, started: bool,
        max_tokens: int,
    ) -> tuple[bool, bool]:
        """Pass a target's `done` on once its signature checks over what was streamed; a bad one is the
        target's failure (before any token: served here; after: reported). (settled, signature valid)."""
        model_id = self.model.model_id
        reason = str(message["finish_reason"])
        text, ids = "".join(responder.sent_text), responder.sent_ids
        try:
            valid = (
                message["model_id"] == model_id and message["tokens"] == len(ids)
                and reason in FINISH_REASONS and (reason != "length" or len(ids) == max_tokens)
                and verify_signature(signing_key, unb64(message["signature"]),
                                     transcript(responder.request, model_id, text, ids, reason))
            )
        except ValueError:
            valid = False
        if not valid:
            log.warning("group member %s sent an answer its signature does not cover", target[:8])
            if not started:
                return False, False
            await responder.error(FORWARD_FAILED, "the group member serving this request sent a bad signature")
            return True, False
        info: dict[str, Any] = {key: message[key] for key in ("tokens", "finish_reason", "ttft_s", "total_s", "model_id", "signature",
                                              "cached", "prompt_tokens") if key in message.body}
        if info.get("cached", 0) > info.get("prompt_tokens", 1 << 24):
            # unsigned figures an asker refuses as malformed: relayed, they would make the answer (which
            # the target's signature covers) the entry's failure. Not ours to vouch for: dropped
            info.pop("cached"), info.pop("prompt_tokens")
        info["signer"] = target
        await responder.done(info)
        self.counters["forwarded"] += 1
        self.on_served(ServedRequest(len(ids), int(message.get("cached", 0)), int(message.get("prompt_tokens", 0)),
                                     time.perf_counter() - responder.arrived, forwarded_to=target,
                                     mode=responder.mode))
        return True, True

    async def handle_forward(self, reply: Reply, message: Message) -> None:
        """A group member's `forward`: serve the original request here, never forward it again."""
        forward_id = message["id"]
        try:
            if self.group is None:
                raise ProtocolError("not_member: this seed is in no group")
            if len(message.binary) != 1 or len(message.binary[0]) > MAX_FORWARD_REQUEST_BYTES:
                raise ProtocolError("invalid: a forward carries the request bytes in one frame")
            data = message.binary[0]
            member = self.group.check(message, hashlib.sha256(data).digest())
            if not self.forward_ids.check_and_add(f"{member.peer_id}/{forward_id}".encode()):
                raise ProtocolError("invalid: a forward seen before")
            if message["mode"] == "direct":
                request = json.loads(data, object_pairs_hook=unique_keys)
                if not isinstance(request, dict) or direct_request_bytes(request) != data:
                    raise ValueError("not a canonical generate body")
                decode(encode("generate", request))
            elif message["mode"] == "private":
                request, _ = parse_private_request(data)  # the reply key is the entry's business, not ours
            else:
                raise ValueError(f"unknown mode {message['mode']!r}")
        except ProtocolError as exc:
            self.counters["refused"] += 1
            code = str(exc).split(":", 1)[0]
            await reply.send("error", {"code": code if code in ("not_member", "invalid") else "invalid",
                                       "message": str(exc)[:200], "id": forward_id})
            return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.counters["refused"] += 1
            await reply.send("error", {"code": "bad_request", "message": f"bad forwarded request ({exc})"[:200],
                                       "id": forward_id})
            return
        self.counters["forwards_served"] += 1
        await self.serve_request(request, ForwardResponder(reply, forward_id, data, member.peer_id, message["mode"]))

    # ------------------------------------------------------------------ serving

    async def serve_request(self, request: dict[str, Any], responder: Responder) -> None:
        """Validate, queue, generate and stream one request, whichever way it came in (never forwarded
        from here: `route` decides that first)."""
        if not responder.arrived:  # a responder made without Responder.__init__ (tests' recorders)
            responder.arrived = time.perf_counter()
        if not self.serves(str(request.get("model", ""))):
            await responder.error("unknown_model", f"this seed does not serve {request.get('model')}")
            return
        try:
            params = GenerationParams(
                max_tokens=request["max_tokens"],
                sampling=SamplingParams(request["temperature"], request["top_k"], request["top_p"]),
                seed=request.get("seed"),
            )
        except GtorrentError as exc:
            await responder.error("bad_request", exc.message[:1000])
            return
        if self.load.waiting >= self.max_queue:
            await responder.error("busy", "the seed's queue is full")
            return
        self.load.waiting += 1
        self._load_changed()
        await responder.accepted(self.load.waiting + self.load.running - 1)
        acquired = False
        try:
            async with self.slots:
                acquired = True
                self.load.waiting -= 1
                self.load.running += 1
                try:
                    await self._generate(request, params, responder)
                finally:
                    self.load.running -= 1
                    self._load_changed()
        finally:
            if not acquired:  # cancelled while queued
                self.load.waiting -= 1
                self._load_changed()

    def _load_changed(self) -> None:
        """The queue changed: the group hears of it within group.LOAD_PUSH_MIN_S (group.load_changed)."""
        if self.group is not None:
            self.group.load_changed()

    async def _generate(self, request: dict[str, Any], params: GenerationParams, responder: Responder) -> None:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, list[int]] | None] = asyncio.Queue()
        held_ids: list[int] = []  # ids generated since the last piece (worker thread only)

        def on_token(token: int) -> None:
            held_ids.append(token)

        def on_text(piece: str) -> None:
            # the ids since the last piece are this piece's (runtime: on_token comes before its text)
            ids = held_ids.copy()
            held_ids.clear()
            loop.call_soon_threadsafe(pieces.put_nowait, (piece, ids))

        stop = threading.Event()

        def work() -> GenerationResult:
            try:
                # a conversation (`messages`) goes in as its rendered ids; a prompt as today
                prompt = prompt_ids(self.model, request) if "messages" in request else request["prompt"]
                return self.model.generate(
                    prompt, params, chat=bool(request.get("chat", False)), on_text=on_text,
                    should_stop=stop.is_set, on_token=on_token,
                )
            finally:
                if held_ids:  # tokens that released no text (e.g. skipped special tokens) still count
                    loop.call_soon_threadsafe(pieces.put_nowait, ("", held_ids.copy()))
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        started = time.perf_counter()
        future = loop.run_in_executor(self.executor, work)
        finished = False
        while not finished:
            # Coalesce what the generator produced while the last send was in flight: fewer, larger
            # messages when the link or the event loop is slower than the model.
            got = [await pieces.get()]
            while not pieces.empty():
                got.append(pieces.get_nowait())
            finished = got[-1] is None
            joined = "".join(item[0] for item in got if item is not None)
            ids = [token for item in got if item is not None for token in item[1]]
            chars, per = responder.max_chunk_chars, responder.max_chunk_ids
            for part in range(max(-(-len(joined) // chars), -(-len(ids) // per))):
                if responder.gone:
                    stop.set()  # nobody is listening: free the worker for the next request
                    break
                await responder.text(joined[part * chars :][:chars], ids[part * per :][:per])
        try:
            result = await future
        except UsageError as exc:  # the request itself is wrong (e.g. longer than the context)
            await responder.error("bad_request", exc.message[:1000])
            return
        except Exception as exc:  # noqa: BLE001 - tell the asker instead of leaving it waiting
            log.exception("generation failed")
            await responder.error("internal", f"generation failed ({type(exc).__name__})")
            return
        self.load.finished(time.perf_counter() - started)
        self.load.prompt(result.cached_tokens, result.prompt_tokens)
        if result.finish_reason == "cancelled":
            self.cancelled += 1
            return
        model_id = self.model.model_id
        await responder.done(
            {
                "tokens": result.tokens,  # = len(responder.sent_ids), which the signature covers
                "finish_reason": result.finish_reason,
                "ttft_s": round(result.ttft_s, 6),
                "total_s": round(result.total_s, 6),
                "model_id": model_id,
                "signature": responder.signed(self.identity, model_id, result.finish_reason),
                "cached": result.cached_tokens,
                "prompt_tokens": result.prompt_tokens,
            }
        )
        total_s = time.perf_counter() - responder.arrived
        self.lb.add(total_s)  # end to end at this seed: queueing, prefill and decoding
        self.on_served(ServedRequest(result.tokens, result.cached_tokens, result.prompt_tokens, total_s,
                                     forwarded_by=responder.forwarded_by, mode=responder.mode))

    # ------------------------------------------------------------------ private asks (circuit terminal)

    async def terminal(self, circuit: Circuit, command: int, data: bytes) -> None:
        """DATA cells at the end of a circuit: clove pieces of a private ask."""
        if command != DATA:
            return
        assembler = circuit.terminal_state
        if assembler is None:
            assembler = circuit.terminal_state = CloveAssembler()
        try:
            whole = assembler.feed(data)
        except GarlicError as exc:
            raise OnionError(f"bad clove: {exc}") from exc
        if whole is None:
            await self._hold_partial(circuit, assembler.size)
            return
        self._release_partial(circuit)
        try:
            clove = Clove.from_bytes(whole)
        except SidaError as exc:
            raise OnionError(f"bad clove: {exc}") from exc
        assert assembler.ask_id is not None
        self._expire_asks()
        ask = self.private_asks.get(assembler.ask_id)
        if ask is None:
            if not self.finished_asks.check_and_add(assembler.ask_id):
                return  # a late clove of an ask already answered (or dropped): never start it twice
            self._make_room(len(clove.fragment))
            ask = self.private_asks[assembler.ask_id] = PrivateAsk()
        elif not ask.started and clove.index not in ask.cloves:
            self._make_room(len(clove.fragment), keep=assembler.ask_id)
            if assembler.ask_id not in self.private_asks:
                return
        ask.circuits[clove.index - 1] = circuit
        if clove.index not in ask.cloves:
            ask.held_bytes += len(clove.fragment)
        ask.cloves[clove.index] = clove
        if ask.started or len(ask.cloves) < clove.k:
            return
        ask.started = True
        try:
            request_bytes = combine(list(ask.cloves.values()))
            request, reply_key = parse_private_request(request_bytes)
        except (SidaError, ValueError, KeyError, TypeError, AttributeError, ProtocolError) as exc:
            log.debug("dropped a private ask: %s", exc)
            self.private_asks.pop(assembler.ask_id, None)
            return
        responder = PrivateResponder(self, ask, reply_key, request_bytes, clove.n, clove.k)
        task = asyncio.create_task(self._serve_private(assembler.ask_id, request, responder))
        ask.task = task

    async def _hold_partial(self, circuit: Circuit, size: int) -> None:
        """Account a circuit's partial clove; cut the oldest partial cloves while over the budget."""
        self.assembling_bytes += size - self.assembling.get(circuit, 0)
        self.assembling[circuit] = size
        while self.assembling_bytes > MAX_PARTIAL_CLOVE_BYTES:
            oldest = next(iter(self.assembling))
            if oldest is circuit:
                break  # only this one is left over the budget: MAX_CLOVE_BYTES bounds it
            self._release_partial(oldest)
            self.dropped_asks += 1
            await self.relay.destroy(oldest, "clove never completed")

    def _release_partial(self, circuit: Circuit) -> None:
        self.assembling_bytes -= self.assembling.pop(circuit, 0)

    def _circuit_closed(self, circuit: Circuit) -> None:
        self._release_partial(circuit)

    async def _serve_private(self, ask_id: bytes, request: dict[str, Any], responder: PrivateResponder) -> None:
        try:
            await self.route(request, responder, "private")
        finally:
            self.private_asks.pop(ask_id, None)

    def _expire_asks(self) -> None:
        cutoff = time.monotonic() - PRIVATE_ASK_TTL_S
        for ask_id, ask in list(self.private_asks.items()):
            if not ask.started and ask.created < cutoff:
                del self.private_asks[ask_id]

    def _make_room(self, adding: int, keep: bytes | None = None) -> None:
        """Drop the oldest asks still collecting cloves until one more clove of `adding` bytes fits the
        caps (count and bytes). An honest ask gathers its k cloves within a second or so; a flood of
        partial asks only pushes out its own oldest. Started asks are bounded by the queue instead."""
        pending = [(ask_id, ask) for ask_id, ask in self.private_asks.items() if not ask.started]
        count = len(pending) + (keep is None)
        held = sum(ask.held_bytes for _, ask in pending) + adding
        for ask_id, ask in pending:  # oldest first (dicts keep insertion order)
            if count <= MAX_PENDING_ASKS and held <= MAX_PENDING_ASK_BYTES:
                break
            if ask_id == keep and count <= MAX_PENDING_ASKS:
                continue
            del self.private_asks[ask_id]
            self.dropped_asks += 1
            count -= 1
            held -= ask.held_bytes

    async def serve(self) -> None:
        kinds = frozenset({"generate", "ping", "group_state", "group_load", "forward"})
        tasks = [
            asyncio.create_task(serve_relay(self.server, self.relay, self.handle, kinds)),
            asyncio.create_task(self.announcer.loop()),
            asyncio.create_task(self.relay.expire_loop()),
        ]
        if self.group is not None:
            tasks.append(asyncio.create_task(self.group.run()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def stop(self) -> dict[str, str]:
        """Tell the trackers this seed is gone; return {tracker: error} for those that did not hear it."""
        return await self.announcer.stop()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        for conn in list(self.forward_links):
            conn.close()
        self.forward_links.clear()
        self.relay.close()
        self.server.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.ctx.term()
