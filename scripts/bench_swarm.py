#!/usr/bin/env python3
"""Benchmark of the swarm, side by side in one run (prints ratios; record them in the README).

1. Direct ask vs `gtorrent run`, 64 greedy tokens: the same model generates locally in this process
   (`LanguageModel.generate`, model already loaded) and through the swarm (a real tracker process and a
   real seed process; the ask includes tracker discovery, the CurveZMQ handshake and token streaming).
   On the bundled model and on the ~100M random model (built into .bench/ on first use; see
   bench_runtime.py). Target: ratio <= 1.05 on the larger model.
2. Tracker throughput: 10,000 distinct peers announce (records pre-signed here) to a tracker process
   over CurveZMQ, pipelined on a few connections; every announce is signature-checked, sequence-checked
   and committed to SQLite before it is acknowledged. Printed: the wall-clock rate (the client shares
   the machine's 2 cores) and announces per CPU-second of the tracker process, all its threads
   included. Target: >= 3,000 verified announces/s on one core.

Usage: python scripts/bench_swarm.py [--big DIR] [--skip-big] [--peers 10000] [--repeats 5]
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

from bench_runtime import DEFAULT_BIG, ensure_big_model

from gtorrent.asker import AskRequest
from gtorrent.discovery import TrackerClient
from gtorrent.identity import Identity
from gtorrent.node import NodeSettings, ask
from gtorrent.protocol import ModelInfo, PeerRecord, encode
from gtorrent.runtime import GenerationParams, LanguageModel
from gtorrent.transport import new_context
from tests.procs import start_seed, start_tracker

PROMPT = "The for statement is used to iterate over"


def bench_ask(label: str, model_path: Path | None, tokens: int, repeats: int, base: Path) -> float:
    lm = LanguageModel.load(model_path)
    params = GenerationParams(max_tokens=tokens, stop_at_eos=False)
    tracker, url = start_tracker(base / f"{label}-tracker")
    seed_args = [str(model_path)] if model_path is not None else []
    seed, _ = start_seed(base / f"{label}-seed", [url], *seed_args)
    try:
        settings = NodeSettings(home=base / f"{label}-asker", trackers=[url], trackers_explicit=True)
        request = AskRequest(PROMPT, max_tokens=tokens)
        lm.generate(PROMPT, params)
        ask(settings, request)  # warm-up both paths
        local, remote = [], []
        for _ in range(repeats):
            local.append(lm.generate(PROMPT, params).total_s)
            result = ask(settings, request)
            assert result.tokens == tokens or result.finish_reason == "eos"
            remote.append(result.total_s)
        ratio = statistics.median(remote) / statistics.median(local)
        print(
            f"{label:<14} run {statistics.median(local) * 1000:8.1f} ms   direct ask {statistics.median(remote) * 1000:8.1f} ms"
            f"   ratio {ratio:.3f}   ({tokens} tokens, median of {repeats})",
            flush=True,
        )
        return ratio
    finally:
        seed.kill()
        tracker.kill()


async def _announce_flood(url: str, records: list[PeerRecord], connections: int, window: int) -> float:
    """Pipeline the announces over a few bare CurveZMQ DEALERs: the client stays cheap, so the figure
    is the tracker's (the tracker still decodes, verifies, sequence-checks and commits every one)."""
    import zmq
    from zmq.utils import z85

    from gtorrent.transport import throwaway_curve_keys

    ctx = new_context()
    tracker = await TrackerClient(ctx, url)._tracker_record()
    frames = [encode("announce", {"record": r.to_wire()}) for r in records]
    chunks = [frames[i::connections] for i in range(connections)]
    refused = 0

    async def pump(chunk: list[list[bytes]]) -> None:
        nonlocal refused
        sock = ctx.socket(zmq.DEALER)
        public, secret = throwaway_curve_keys()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            z85.encode(tracker.curve_key), z85.encode(public), z85.encode(secret)
        )
        sock.connect(tracker.endpoint)
        sent = received = 0
        while received < len(chunk):
            while sent < len(chunk) and sent - received < window:
                await sock.send_multipart(chunk[sent])
                sent += 1
            reply = await asyncio.wait_for(sock.recv(), 30)
            refused += b'"t":"error"' in reply
            received += 1
        sock.close(linger=0)

    started = time.perf_counter()
    await asyncio.gather(*(pump(c) for c in chunks))
    elapsed = time.perf_counter() - started
    ctx.destroy(linger=0)
    if refused:
        raise SystemExit(f"{refused} announces were refused")
    return elapsed


def bench_tracker(peers: int, base: Path) -> float:
    print(f"signing {peers} records…", flush=True)
    model = (ModelInfo("ef" * 32, "demo", 512),)
    now = time.time()
    records = [
        PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{10000 + i % 50000}", roles=("seed",),
                        models=model, load={"queue": 0.0}, seq=1, expires=now + 600)
        for i in range(peers)
    ]
    tracker, url = start_tracker(base / "flood-tracker")
    try:
        cpu_before = process_cpu_s(tracker.popen.pid)
        elapsed = asyncio.run(_announce_flood(url, records, connections=4, window=64))
        cpu_s = process_cpu_s(tracker.popen.pid) - cpu_before
    finally:
        tracker.kill()
    rate = peers / elapsed
    print(
        f"tracker        {peers} verified announces in {elapsed:.2f} s = {rate:,.0f} announces/s wall-clock "
        f"(client on the same 2 cores); tracker CPU {cpu_s:.2f} s = {peers / cpu_s:,.0f} announces per "
        f"tracker CPU-second (target >= 3,000)",
        flush=True,
    )
    return peers / cpu_s


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=Path, default=DEFAULT_BIG)
    parser.add_argument("--build-python")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("GTORRENT_TRACKERS", None)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        bench_ask("demo (3.4M)", None, args.tokens, args.repeats, base)
        if not args.skip_big:
            bench_ask("random ~100M", ensure_big_model(args.big, args.build_python), args.tokens, args.repeats, base)
        bench_tracker(args.peers, base)


if __name__ == "__main__":
    main()
