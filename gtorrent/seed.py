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
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .discovery import Announcer, PeerDirectory
from .errors import GtorrentError, UsageError
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
from .identity import Identity, b64, unb64
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
from .sida import Clove, SidaError, combine
from .transport import Reply, Server, new_context

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


@dataclass
class SeedLoad:
    waiting: int = 0
    running: int = 0
    latency_s: float = 0.0
    served: int = 0

    def finished(self, latency_s: float) -> None:
        self.served += 1
        self.latency_s = latency_s if self.served == 1 else (1 - LATENCY_EWMA) * self.latency_s + LATENCY_EWMA * latency_s

    def as_record(self) -> dict[str, float]:
        return {"queue": float(self.waiting + self.running), "latency_s": round(self.latency_s, 4)}


class Responder:
    """Where one request's answer goes: straight back over CurveZMQ, or back over circuits.

    `text` is given each piece with its token ids and records both (`sent_text`, `sent_ids`): the
    transcript the seed signs is built from what was handed to the asker, nothing else."""

    max_chunk_chars = MAX_CHUNK_CHARS
    max_chunk_ids = MAX_TOKEN_IDS_PER_MESSAGE
    gone = False  # the asker can no longer be reached: stop generating for it

    def __init__(self, request: bytes) -> None:
        self.request = request  # the request bytes the transcript hashes (garlic.transcript)
        self.sent_text: list[str] = []
        self.sent_ids: list[int] = []

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

    async def accepted(self, queue: int) -> None:
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
    ) -> None:
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
        """Direct requests (CurveZMQ straight from the asker)."""
        if message.kind == "ping":
            await reply.send("pong", {})
            return
        await self.serve_request(message.body, DirectResponder(reply, message))

    async def serve_request(self, request: dict[str, Any], responder: Responder) -> None:
        """Validate, queue, generate and stream one request, whichever way it came in."""
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
        finally:
            if not acquired:  # cancelled while queued
                self.load.waiting -= 1

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
                return self.model.generate(
                    request["prompt"], params, chat=bool(request.get("chat", False)), on_text=on_text,
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
            }
        )

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
            request = json.loads(request_bytes, object_pairs_hook=unique_keys)
            if not isinstance(request, dict):
                raise ValueError("the request is not an object")
            reply_key = unb64(request.pop("reply_key"))
            if len(reply_key) != REPLY_KEY_BYTES:
                raise ValueError("bad reply key")
            decode(encode("generate", {**request, "id": "private"}))  # the same schema as a direct request
            request["id"] = "private"
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
            await self.serve_request(request, responder)
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
        tasks = [
            asyncio.create_task(serve_relay(self.server, self.relay, self.handle, frozenset({"generate", "ping"}))),
            asyncio.create_task(self.announcer.loop()),
            asyncio.create_task(self.relay.expire_loop()),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def stop(self) -> dict[str, str]:
        """Tell the trackers this seed is gone; return {tracker: error} for those that did not hear it."""
        return await self.announcer.stop()

    def close(self) -> None:
        self.relay.close()
        self.server.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.ctx.term()
