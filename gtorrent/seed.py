"""The seed: serves one loaded model to the swarm and keeps its record fresh on the trackers.

Requests (`generate`) are answered with `accepted`, a stream of `token` messages and a final `done`
(or `error`). Generation runs in worker threads (ONNX Runtime releases the GIL), at most
`max_concurrency` at once; further requests wait in FIFO order, so the event loop stays free to keep
serving other messages while a model generates. The load reported in announces is the number of
requests waiting or running and an EWMA of recent request latency.

Sequence numbers are milliseconds since the epoch, so they keep increasing across restarts without any
state on disk, and a tracker never mistakes a restarted seed for a replay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .discovery import Announcer
from .errors import GtorrentError, UsageError
from .identity import Identity
from .protocol import Message, ModelInfo, PeerRecord
from .relay import RelayService, serve_relay
from .runtime import GenerationParams, LanguageModel, SamplingParams
from .transport import Reply, Server, new_context

log = logging.getLogger(__name__)

RECORD_TTL_S = 90.0
MAX_QUEUE_PER_SLOT = 8  # requests waiting per concurrent slot before the seed answers "busy"
MAX_CHUNK_CHARS = 4000  # a token message's text stays under the protocol's 4096
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
        self.relay = RelayService(identity, self.ctx)  # every seed relays other seeds' traffic
        self.max_concurrency = max_concurrency
        self.max_queue = MAX_QUEUE_PER_SLOT * max_concurrency
        self.roles = ("seed", "relay", *extra_roles)
        self.load = SeedLoad()
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generate")
        self.slots = asyncio.Semaphore(max_concurrency)

    def bind(self, url: str) -> str:
        return self.server.bind(url)

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
        )

    async def announce(self, *, stopped: bool = False) -> dict[str, str]:
        return await self.announcer.announce(stopped=stopped)

    # ------------------------------------------------------------------ requests

    def serves(self, model: str) -> bool:
        return model in (self.model.model_id, self.name) or (len(model) >= 8 and self.model.model_id.startswith(model))

    async def handle(self, reply: Reply, message: Message) -> None:
        if message.kind == "ping":
            await reply.send("pong", {})
            return
        request_id = message["id"]
        if not self.serves(message["model"]):
            await reply.send("error", {"code": "unknown_model", "message": f"this seed does not serve {message['model']}", "id": request_id})
            return
        try:
            params = GenerationParams(
                max_tokens=message["max_tokens"],
                sampling=SamplingParams(message["temperature"], message["top_k"], message["top_p"]),
                seed=message.get("seed"),
            )
        except GtorrentError as exc:
            await reply.send("error", {"code": "bad_request", "message": exc.message, "id": request_id})
            return
        if self.load.waiting >= self.max_queue:
            await reply.send("error", {"code": "busy", "message": "the seed's queue is full", "id": request_id})
            return
        self.load.waiting += 1
        await reply.send("accepted", {"id": request_id, "queue": self.load.waiting + self.load.running - 1})
        acquired = False
        try:
            async with self.slots:
                acquired = True
                self.load.waiting -= 1
                self.load.running += 1
                try:
                    await self._generate(reply, request_id, message, params)
                finally:
                    self.load.running -= 1
        finally:
            if not acquired:  # cancelled while queued
                self.load.waiting -= 1

    async def _generate(self, reply: Reply, request_id: str, message: Message, params: GenerationParams) -> None:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        def work() -> object:
            try:
                return self.model.generate(message["prompt"], params, chat=bool(message.get("chat", False)), on_text=on_text)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        started = time.perf_counter()
        future = loop.run_in_executor(self.executor, work)
        count = 0
        finished = False
        while not finished:
            # Coalesce what the generator produced while the last send was in flight: fewer, larger
            # messages when the link or the event loop is slower than the model.
            text = [await pieces.get()]
            while not pieces.empty():
                text.append(pieces.get_nowait())
            finished = text[-1] is None
            joined = "".join(t for t in text if t is not None)
            for start in range(0, len(joined), MAX_CHUNK_CHARS):
                await reply.send("token", {"id": request_id, "n": count, "text": joined[start : start + MAX_CHUNK_CHARS]})
                count += 1
        try:
            result = await future
        except UsageError as exc:  # the request itself is wrong (e.g. longer than the context)
            await reply.send("error", {"code": "bad_request", "message": exc.message[:1000], "id": request_id})
            return
        except Exception as exc:  # noqa: BLE001 - tell the asker instead of leaving it waiting
            log.exception("generation failed")
            await reply.send("error", {"code": "internal", "message": f"generation failed ({type(exc).__name__})", "id": request_id})
            return
        self.load.finished(time.perf_counter() - started)
        await reply.send(
            "done",
            {
                "id": request_id,
                "tokens": result.tokens,  # type: ignore[attr-defined]
                "finish_reason": result.finish_reason,  # type: ignore[attr-defined]
                "ttft_s": round(result.ttft_s, 6),  # type: ignore[attr-defined]
                "total_s": round(result.total_s, 6),  # type: ignore[attr-defined]
                "model_id": self.model.model_id,
            },
        )

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
