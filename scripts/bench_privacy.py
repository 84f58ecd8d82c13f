#!/usr/bin/env python3
"""Benchmark of private asks, side by side in one run (prints ratios; record them in the README).

1. Private (4 paths x 3 hops, S-IDA k=3) vs direct ask, total time of a 64-token greedy answer, on
   the bundled model and on the ~100M random model (built into .bench/ on first use, see
   bench_runtime.py); target ratio <= 1.15 on the larger. Each peer runs in its own process, as
   deployed: a tracker, one seed, 12 relays; this process asks. All of them share the machine's cores.
2. Path setup: time to build the 4 circuits of 3 relays + the seed (telescoped, concurrently).
3. Cells one relay forwards per second on one core: a circuit through one relay to an echo
   terminal, cells pipelined; the relay's CPU time is measured in its own process.
4. S-IDA split + combine of 4 KiB (n=4, k=3).

Usage: python scripts/bench_privacy.py [--big DIR] [--skip-big] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_runtime import DEFAULT_BIG, ensure_big_model  # noqa: E402
from bench_swarm import process_cpu_s  # noqa: E402

from gtorrent.asker import AskRequest  # noqa: E402
from gtorrent.circuit import CircuitClient  # noqa: E402
from gtorrent.discovery import announce_all, discover  # noqa: E402
from gtorrent.node import NodeSettings, PrivacyOptions, ask  # noqa: E402
from gtorrent.sida import combine, split  # noqa: E402
from tests.procs import Proc, start_seed, start_tracker  # noqa: E402
from tests.test_private import Swarm  # noqa: E402

PROMPT = "The for statement"


def bench_asks(label: str, model_path: Path | None, tokens: int, repeats: int, base: Path) -> float:
    """Each peer in its own process, as deployed: tracker, seed, 12 relays; the asker is this process."""
    tracker, url = start_tracker(base / f"{label}-tracker")
    seed_args = [str(model_path)] if model_path is not None else []
    seed, _ = start_seed(base / f"{label}-seed", [url], *seed_args)
    relays = [Proc(["relay", "--tracker", url], base / f"{label}-relay{i}") for i in range(12)]
    try:
        for relay in relays:
            relay.wait_for(r"relaying as")
        settings = NodeSettings(home=base / f"{label}-asker", trackers=[url], trackers_explicit=True)
        request = AskRequest(PROMPT, max_tokens=tokens)
        direct_opts, private_opts = PrivacyOptions(direct=True), PrivacyOptions(strict=True)
        ask(settings, request, privacy=direct_opts)
        ask(settings, request, privacy=private_opts)  # warm-up both paths
        direct, private, setup = [], [], []
        for _ in range(repeats):
            d = ask(settings, request, privacy=direct_opts)
            p = ask(settings, request, privacy=private_opts)
            assert d.text == p.text and d.tokens == p.tokens
            direct.append(d.total_s)
            private.append(p.total_s)
            setup.append(p.path_setup_s or 0.0)
        ratio = statistics.median(private) / statistics.median(direct)
        print(
            f"{label:<14} direct {statistics.median(direct) * 1000:8.1f} ms   private 4x3 {statistics.median(private) * 1000:8.1f} ms"
            f"   ratio {ratio:.3f}   path setup {statistics.median(setup) * 1000:.1f} ms   ({d.tokens} tokens, median of {repeats})",
            flush=True,
        )
        return ratio
    finally:
        for proc in [*relays, seed, tracker]:
            proc.kill()


async def bench_relay_cells(base: Path, cells: int = 20000) -> None:
    tracker, url = start_tracker(base / "cells-tracker")
    relay = Proc(["relay", "--tracker", url], base / "cells-relay")
    relay.wait_for(r"relaying as")
    swarm = Swarm()
    swarm.ctx = swarm.ctx  # reuse its context for the terminal and the client
    try:
        from gtorrent.identity import Identity
        from gtorrent.protocol import PeerRecord
        from gtorrent.relay import RelayService, serve_relay
        from gtorrent.transport import Server

        received = asyncio.Event()
        count = 0

        async def sink(circuit, command, data):  # type: ignore[no-untyped-def]
            nonlocal count
            count += 1
            if count == cells:
                received.set()

        identity = Identity.generate()
        server = Server(swarm.ctx, curve_secret=identity.curve_secret)
        server.bind("tcp://127.0.0.1:0")
        terminal = RelayService(identity, swarm.ctx, terminal=sink)
        task = asyncio.create_task(serve_relay(server, terminal))
        found = await discover(swarm.ctx, [url], role="relay")
        hop = next(iter(found.records.values()))
        me = PeerRecord.sign(identity, endpoint=server.endpoint, roles=("relay",), seq=1, expires=time.time() + 60,
                             onion_key=terminal.onion_public)
        await announce_all(swarm.ctx, [url], me)  # relays extend only to announced peers
        circuit = CircuitClient(swarm.ctx, [hop, me])
        await circuit.build()
        prepared = [circuit.onion.wrap(3, b"x" * 100, os.urandom) for _ in range(cells)]
        cpu_before = process_cpu_s(relay.popen.pid)
        started = time.perf_counter()
        for cell in prepared:
            await circuit.conn.send("cell", {"cid": circuit.cid}, cell)
        await asyncio.wait_for(received.wait(), 120)
        elapsed = time.perf_counter() - started
        cpu = process_cpu_s(relay.popen.pid) - cpu_before
        print(
            f"relay          {cells} cells of 1 KiB forwarded in {elapsed:.2f} s = {cells / elapsed:,.0f} cells/s wall-clock; "
            f"relay CPU {cpu:.2f} s = {cells / cpu:,.0f} cells per relay CPU-second",
            flush=True,
        )
        task.cancel()
        await circuit.close()
        terminal.close()
        server.close()
    finally:
        relay.kill()
        tracker.kill()
        swarm.ctx.destroy(linger=0)


def bench_sida(rounds: int = 500) -> None:
    message = os.urandom(4096)
    split_s, combine_s = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        cloves = split(message, 4, 3)
        t1 = time.perf_counter()
        assert combine(cloves[1:]) == message
        combine_s.append(time.perf_counter() - t1)
        split_s.append(t1 - t0)
    print(
        f"S-IDA 4 KiB    split {statistics.median(split_s) * 1e6:.0f} us + combine {statistics.median(combine_s) * 1e6:.0f} us "
        f"(n=4, k=3, median of {rounds})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=Path, default=DEFAULT_BIG)
    parser.add_argument("--build-python")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("GTORRENT_TRACKERS", None)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        bench_asks("demo (3.4M)", None, args.tokens, args.repeats, base)
        if not args.skip_big:
            bench_asks("random ~100M", ensure_big_model(args.big, args.build_python), args.tokens, args.repeats, base)
        asyncio.run(bench_relay_cells(base))
        bench_sida()


if __name__ == "__main__":
    main()
