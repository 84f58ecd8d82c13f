"""`gtorrent demo`: a whole swarm on loopback, one private ask through it, then everything stops.

In one process: a tracker, three seeds of the bundled model (one loaded model shared by their worker
threads; each seed has its own identity, socket and queue) and ten relays, so that with the two
seeds that are not asked, twelve relays carry 4 disjoint paths of 3 hops. Every part is the real
service on real CurveZMQ sockets on 127.0.0.1; only the process is shared, to start in a second.
The demo's state lives in a temporary home that is removed afterwards.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .asker import AskEvents, AskRequest, AskResult
from .identity import Identity
from .relaynode import RelayNode
from .store import Store
from .tracker import TrackerService
from .transport import new_context

DEMO_SEEDS = 3
DEMO_RELAYS = 10
LOCAL = "tcp://127.0.0.1:0"


@dataclass
class DemoEvents:
    progress: Callable[[str], None] = lambda message: None
    ask: AskEvents | None = None


@dataclass
class DemoResult:
    answer: AskResult
    peers: list[Any]
    startup_s: float


async def _relay(ctx: Any, url: str) -> RelayNode:
    node = RelayNode(Identity.generate(), ctx, [url])
    node.bind(LOCAL)
    await node.start()
    return node


def run_demo(prompt: str, max_tokens: int, events: DemoEvents) -> DemoResult:
    from .node import peer_rows
    from .private import ask_private
    from .runtime import LanguageModel
    from .seed import SeedService

    async def main(home: Path) -> DemoResult:
        started = time.perf_counter()
        ctx = new_context()
        tasks: list[asyncio.Task[None]] = []
        closers: list[Callable[[], None]] = []
        try:
            tracker = TrackerService(Identity.generate(), None)
            url = tracker.bind(LOCAL)
            tasks.append(asyncio.create_task(tracker.serve()))
            closers.append(tracker.close)
            events.progress(f"tracker on {url}")
            model = await asyncio.to_thread(LanguageModel.load, None)
            events.progress(f"loaded the bundled model {model.name} ({model.model_id[:12]}) in {model.load_s:.2f} s")
            for number in range(DEMO_SEEDS):
                seed = SeedService(Identity.generate(), model, trackers=[url])
                seed.bind(LOCAL)
                tasks.append(asyncio.create_task(seed.serve()))
                await seed.announce()
                closers.append(seed.close)
                events.progress(f"seed {number + 1}/{DEMO_SEEDS} on {seed.server.endpoint}")
            for _ in range(DEMO_RELAYS):
                relay = await _relay(ctx, url)
                tasks.extend(relay.tasks)
                closers.append(relay.close)
            events.progress(f"{DEMO_RELAYS} relays up (+{DEMO_SEEDS - 1} seeds relaying): {DEMO_RELAYS + DEMO_SEEDS - 1} relays for 4 paths x 3 hops")
            startup_s = time.perf_counter() - started
            store = Store.open(home)
            try:
                answer = await ask_private(ctx, [url], AskRequest(prompt, max_tokens=max_tokens), store, events.ask, strict=True)
                rows, _ = await peer_rows(ctx, [url], store)
            finally:
                store.close()
            return DemoResult(answer, rows, startup_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for close in reversed(closers):
                try:
                    close()
                except Exception:  # noqa: BLE001 - shutting down: close what can be closed
                    pass
            ctx.destroy(linger=0)

    with tempfile.TemporaryDirectory(prefix="gtorrent-demo-") as home:
        return asyncio.run(main(Path(home)))
