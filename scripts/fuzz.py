#!/usr/bin/env python3
"""Fuzz a running swarm: structured and random frames to every socket type, bounded in count and time.

Starts a tracker, a seed of the bundled demo model and a relay as real `gtorrent` processes on
127.0.0.1 (real processes, as deployed: a crash is a process that exits, and RSS is the process's own,
not shared with the fuzzer). Then, per socket type (tracker bootstrap, tracker CurveZMQ, seed, relay),
it sends up to --frames frames within --seconds: valid-looking messages built from `protocol.SCHEMAS`
with one field mutated (dropped, unknown, wrong type, out of range, overlong), truncated JSON, wrong
versions and types, duplicate keys, deep nesting and huge numbers, random bytes, too many frames,
cells with random circuit ids, frames over the size limit, multipart messages that never end (raw
ZMTP, so the frames really go out) and non-ZMTP garbage. Every --check frames it checks that the
process is alive and answers an honest request (a `ping`, a `hello`, or a one-hop circuit for the
relay) within --answer-s.

Prints per socket type: frames sent, crashes (process died or stopped answering), hangs (an honest
request not answered in time), unbounded (a multipart message that never ends, not cut off after
32 MiB), RSS before/after. Exits 1 on any crash, hang or unbounded buffer, or RSS growth over --rss-mb.

Usage: python scripts/fuzz.py [--frames 100000] [--seconds 600] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402
from zmq.utils import z85  # noqa: E402

from gtorrent.circuit import CircuitClient  # noqa: E402
from gtorrent.discovery import TrackerClient  # noqa: E402
from gtorrent.onion import CELL_BYTES  # noqa: E402
from gtorrent.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, SCHEMAS, Field, PeerRecord  # noqa: E402
from gtorrent.transport import new_context, throwaway_curve_keys  # noqa: E402
from tests.procs import Proc, start_seed, start_tracker  # noqa: E402
from tests.rawzmtp import RawPeer  # noqa: E402


@dataclass
class Target:
    name: str
    proc: Proc
    endpoint: str
    curve_key: bytes | None
    honest: Callable[[], bool]  # True when an honest request is answered in time
    sent: int = 0
    crashes: int = 0
    hangs: int = 0
    unbounded: int = 0  # multipart messages that never end, never cut off
    rss_before: int = 0
    rss_after: int = 0
    peak: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.endpoint[len("tcp://") :].rsplit(":", 1)
        return host, int(port)


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # the process is gone (reported as a crash)
        return 0
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_idle(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until the process has worked through what was sent (its CPU time stops growing)."""
    deadline = time.monotonic() + timeout_s
    last, still = cpu_ticks(pid), 0
    while still < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_ticks(pid)
        still = still + 1 if now == last else 0
        last = now


def last_words(proc: Proc) -> str:
    """What a dead process printed last (its stderr)."""
    while True:
        try:
            line = proc.lines.get(timeout=1)
        except Exception:  # noqa: BLE001 - queue.Empty
            break
        if line is None:
            break
        proc.seen.append(line)
    return "".join(proc.seen[-30:])


# --------------------------------------------------------------------------- values and mutations


def value_for(spec: Field, rng: random.Random) -> Any:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    kind = rng.choice(kinds)
    if kind is bool:
        return rng.random() < 0.5
    if kind is int:
        low = int(spec.minimum) if spec.minimum is not None else -(1 << 20)
        high = int(spec.maximum) if spec.maximum is not None else 1 << 20
        return rng.choice([low, high, rng.randint(low, min(high, low + 1000)), rng.randint(low, high)])
    if kind is float:
        low = spec.minimum if spec.minimum is not None else -1e6
        high = spec.maximum if spec.maximum is not None else 1e6
        return rng.uniform(low, high)
    if kind is str:
        length = rng.choice([0, 1, 8, 43, spec.max_len or 16])
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_=") for _ in range(length))
    if kind is list:
        return [] if rng.random() < 0.5 else [rng.randint(0, 9)]
    if kind is dict:
        return {} if rng.random() < 0.5 else {"x": 1}
    return None


def valid_body(kind: str, rng: random.Random) -> dict[str, Any]:
    return {name: value_for(spec, rng) for name, spec in SCHEMAS[kind].items() if spec.required or rng.random() < 0.5}


WRONG_VALUES: list[Any] = [None, True, -1, 1 << 70, 1.5, "x", "x" * 5000, [], [1, [2]], {}, {"a": {"b": 1}}, -1e308]


def mutate(body: dict[str, Any], kind: str, rng: random.Random) -> dict[str, Any]:
    body = dict(body)
    choice = rng.randrange(5)
    names = list(SCHEMAS[kind])
    if choice == 0 and body:
        body.pop(rng.choice(list(body)))  # a required field missing
    elif choice == 1:
        body[rng.choice(["zz", "v2", "", "t\u0000", "cid "])] = 1  # unknown field
    elif choice == 2 and names:
        body[rng.choice(names)] = rng.choice(WRONG_VALUES)  # wrong type or out of range
    elif choice == 3 and names:
        spec = SCHEMAS[kind][rng.choice(names)]
        name = rng.choice(names)
        body[name] = (spec.maximum or 0) + 1 if spec.maximum is not None else "y" * ((spec.max_len or 64) + 1)
    return body


def header(kind: str, body: dict[str, Any], version: Any = PROTOCOL_VERSION) -> bytes:
    return json.dumps({"v": version, "t": kind, **body}, separators=(",", ":"), allow_nan=True).encode()


def structured(kinds: list[str], rng: random.Random) -> tuple[str, list[bytes]]:
    """One mutated message: (what it is, frames)."""
    kind = rng.choice(kinds)
    body = valid_body(kind, rng)
    roll = rng.randrange(12)
    binary = [os.urandom(CELL_BYTES)] if kind == "cell" else []
    if roll == 0:
        return "valid", [header(kind, body), *binary]
    if roll <= 3:
        return "mutated field", [header(kind, mutate(body, kind, rng)), *binary]
    if roll == 4:
        data = header(kind, body)
        return "truncated", [data[: rng.randrange(len(data))]]
    if roll == 5:
        return "wrong version/type", [header(rng.choice([kind, "nope", ""]), body, rng.choice([0, 2, "1", None, True, 1.0]))]
    if roll == 6:
        text = header(kind, body).decode()
        return "duplicate key", [(text[:-1] + ',"t":"' + kind + '"}').encode()]
    if roll == 7:
        depth = rng.choice([100, 5000, 100_000])
        return "deep nesting", [b'{"v":1,"t":"ping","x":' + b"[" * depth + b"]" * depth + b"}"]
    if roll == 8:
        number = rng.choice([b"1e999", b"-1e999", b"NaN", b"Infinity", b"9" * 5000, b"0." + b"0" * 5000 + b"1"])
        return "huge number", [b'{"v":1,"t":"' + kind.encode() + b'","cid":' + number + b"}"]
    if roll == 9:
        return "random bytes", [os.urandom(rng.randrange(0, 2000)) for _ in range(rng.randint(1, 3))]
    if roll == 10:
        return "too many frames", [header(kind, body)] + [os.urandom(rng.randrange(0, 64)) for _ in range(rng.randint(8, 40))]
    cid = rng.choice([0, 1, -1, (1 << 63) - 1, 1 << 63, rng.randrange(1, 1 << 63)])
    cell = os.urandom(rng.choice([CELL_BYTES, CELL_BYTES, 0, CELL_BYTES - 1, CELL_BYTES + 1]))
    return "cell with random cid", [header("cell", {"cid": cid}), cell]


# --------------------------------------------------------------------------- connections


def dealer(ctx: zmq.Context[Any], target: Target) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    if target.curve_key is not None:
        public, secret = throwaway_curve_keys()
        sock.curve_serverkey = z85.encode(target.curve_key)
        sock.curve_publickey = z85.encode(public)
        sock.curve_secretkey = z85.encode(secret)
    sock.connect(target.endpoint)
    return sock


def drain(sock: zmq.Socket[Any]) -> None:
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def huge_frame(ctx: zmq.Context[Any], target: Target) -> int:
    """A frame over the size limit, on a connection of its own (libzmq cuts it)."""
    sock = dealer(ctx, target)
    try:
        sock.send(os.urandom(MAX_MESSAGE_BYTES + 1 + random.randrange(1 << 16)))
        time.sleep(0.05)
    except zmq.ZMQError:
        pass
    finally:
        sock.close(linger=0)
    return 1


def never_ending(target: Target, limit_bytes: int = 32 << 20) -> int:
    """Frames with MORE set until the peer cuts the connection; not cut after `limit_bytes`, the
    server would have buffered anything (counted as `unbounded`)."""
    host, port = target.host_port
    frames = 0
    try:
        peer = RawPeer(host, port, target.curve_key)
    except (OSError, AssertionError):
        return 0
    chunk = os.urandom(8 << 10 if target.curve_key is None else 64 << 10)
    try:
        while frames * len(chunk) < limit_bytes:
            peer.send_frame(chunk, more=True)
            frames += 1
        target.unbounded += 1
    except OSError:
        pass
    finally:
        peer.close()
    return frames


def garbage(target: Target) -> int:
    """Bytes that are not ZMTP at all."""
    try:
        with socket.create_connection(target.host_port, timeout=2) as sock:
            sock.sendall(os.urandom(random.randrange(1, 4096)))
    except OSError:
        pass
    return 1


# --------------------------------------------------------------------------- honest checks


def run_async(coro: Any, timeout_s: float) -> bool:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout_s)

    try:
        asyncio.run(bounded())
        return True
    except Exception:  # noqa: BLE001 - any failure to answer counts as a hang
        return False


def ping_check(endpoint: str, curve_key: bytes | None, kind: str, reply: str, timeout_s: float) -> Callable[[], bool]:
    def check() -> bool:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve_key is not None:
            public, secret = throwaway_curve_keys()
            sock.curve_serverkey = z85.encode(curve_key)
            sock.curve_publickey = z85.encode(public)
            sock.curve_secretkey = z85.encode(secret)
        sock.connect(endpoint)
        try:
            sock.send(header(kind, {}))
            if not sock.poll(int(timeout_s * 1000)):
                return False
            return json.loads(sock.recv_multipart()[0])["t"] == reply
        finally:
            sock.close(linger=0)
            ctx.term()

    return check


def circuit_check(record: PeerRecord, timeout_s: float) -> Callable[[], bool]:
    async def build() -> None:
        ctx = new_context()
        try:
            circuit = CircuitClient(ctx, [record])
            await circuit.build(timeout_s=timeout_s)
            await circuit.close()
        finally:
            ctx.destroy(linger=0)

    return lambda: run_async(build(), timeout_s + 1)


# --------------------------------------------------------------------------- the run


def fuzz(target: Target, kinds: list[str], frames: int, seconds: float, check_every: int, rng: random.Random) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = dealer(ctx, target)
    target.rss_before = rss_kib(target.proc.popen.pid)
    deadline = time.monotonic() + seconds
    next_check = check_every
    try:
        target.sent += never_ending(target)  # at least one per socket type, however short the run
        while target.sent < frames and time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.002:
                what, count = "huge frame", huge_frame(ctx, target)
            elif roll < 0.004:
                what, count = "never-ending multipart", never_ending(target)
            elif roll < 0.006:
                what, count = "not ZMTP", garbage(target)
            else:
                what, message = structured(kinds, rng)
                try:
                    sock.send_multipart(message)
                except zmq.Again:  # the peer stopped reading: a hang, found by the next check
                    sock.close(linger=0)
                    sock = dealer(ctx, target)
                count = len(message)
                if target.sent % 64 == 0:
                    drain(sock)
            target.sent += count
            target.kinds[what] = target.kinds.get(what, 0) + count
            target.peak = max(target.peak, rss_kib(target.proc.popen.pid, "VmRSS")) if count > 1000 else target.peak
            if target.sent >= next_check:
                next_check += check_every
                if not check(target):
                    break
        wait_idle(target.proc.popen.pid)
        check(target)
    finally:
        sock.close(linger=0)
        ctx.term()
    target.rss_after = rss_kib(target.proc.popen.pid)
    target.peak = max(target.peak, target.rss_after)


def check(target: Target) -> bool:
    if target.proc.popen.poll() is not None:
        target.crashes += 1
        print(f"{target.name}: the process exited ({target.proc.popen.returncode}):\n{last_words(target.proc)}", flush=True)
        return False
    if not target.honest():
        if target.proc.popen.poll() is not None:
            target.crashes += 1
            print(f"{target.name}: the process exited ({target.proc.popen.returncode}):\n{last_words(target.proc)}",
                  flush=True)
        else:
            target.hangs += 1
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="frames per socket type")
    parser.add_argument("--seconds", type=float, default=600.0, help="time limit per socket type")
    parser.add_argument("--check", type=int, default=2_000, help="frames between liveness checks")
    parser.add_argument("--answer-s", type=float, default=10.0, help="how long an honest request may take")
    parser.add_argument("--rss-mb", type=float, default=20.0, help="allowed RSS growth per process, MiB")
    parser.add_argument("--seed", type=int, default=None, help="random seed (printed when not given)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"fuzz: seed {seed}, {args.frames} frames per socket type, at most {args.seconds:g} s each", flush=True)
    base = Path(tempfile.mkdtemp(prefix="gtorrent-fuzz-"))
    tracker, url = start_tracker(base / "tracker")
    seed_proc, _ = start_seed(base / "seed", [url])
    relay = Proc(["relay", "--tracker", url], base / "relay")
    procs = [tracker, seed_proc, relay]
    try:
        relay.wait_for(r"relaying as")

        async def records() -> tuple[PeerRecord, list[PeerRecord], list[PeerRecord]]:
            ctx = new_context()
            try:
                client = TrackerClient(ctx, url)
                own = await client._tracker_record()
                return own, await client.query(role="seed"), await client.query(role="relay")
            finally:
                ctx.destroy(linger=0)

        own, seeds, relays = asyncio.run(records())
        seed_record = seeds[0]
        relay_record = next(r for r in relays if "seed" not in r.roles)
        answer_s = args.answer_s
        bootstrap = url.split("#", 1)[0]
        circuit_kinds = ["create", "cell", "destroy", "created"]
        plan = [
            (Target("tracker bootstrap", tracker, bootstrap, None, ping_check(bootstrap, None, "hello", "hello_ok", answer_s)),
             ["hello", "ping", "query"]),
            (Target("tracker CurveZMQ", tracker, own.endpoint, own.curve_key,
                    ping_check(own.endpoint, own.curve_key, "ping", "pong", answer_s)),
             ["hello", "announce", "query", "ping", "peers"]),
            (Target("seed", seed_proc, seed_record.endpoint, seed_record.curve_key,
                    ping_check(seed_record.endpoint, seed_record.curve_key, "ping", "pong", answer_s)),
             ["generate", "ping", *circuit_kinds]),
            (Target("relay", relay, relay_record.endpoint, relay_record.curve_key, circuit_check(relay_record, answer_s)),
             [*circuit_kinds, "ping"]),
        ]
        failed = False
        for target, kinds in plan:
            started = time.monotonic()
            fuzz(target, kinds, args.frames, args.seconds, args.check, rng)
            grown_mb = (target.rss_after - target.rss_before) / 1024
            bad = target.crashes or target.hangs or target.unbounded or grown_mb > args.rss_mb
            failed |= bool(bad)
            print(
                f"{target.name:18} frames {target.sent:>7}  crashes {target.crashes}  hangs {target.hangs}  "
                f"unbounded {target.unbounded}  "
                f"RSS {target.rss_before / 1024:.1f} -> {target.rss_after / 1024:.1f} MiB "
                f"(peak {target.peak / 1024:.1f})  {time.monotonic() - started:.1f} s{'  FAILED' if bad else ''}",
                flush=True,
            )
        return 1 if failed else 0
    finally:
        for proc in procs:
            try:
                proc.terminate()
            except Exception:  # noqa: BLE001 - a crashed process is already reported
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
