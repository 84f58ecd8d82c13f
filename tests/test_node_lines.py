"""What a new user trips over, part two (issue 10, item 4): `gtorrent peers` in an 80-column terminal
(when each peer last announced; peers these trackers do not list), long-running nodes that say what they
do (a line per request, per tracker round, per relay batch; `-q`, `--json`), a seed whose port is taken
failing before it loads anything, and the byte progress of hashing a model on first use.

Real processes (tests/procs.py) where a user would run them: the tracker, seed and relay processes, and
`gtorrent peers` in a pseudo-terminal of 80 columns; in-process services for the asker kinds."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import queue
import re
import select
import shutil
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gtorrent.discovery import announce_all
from gtorrent.identity import Identity, short_id
from gtorrent.node import PeerRow, RelayActivity, TrackerRound, _TrackerTally, announced_at
from gtorrent.protocol import MAX_RECORD_TTL_S, ModelInfo, PeerRecord
from gtorrent.transport import new_context

from .procs import GTORRENT, Proc, start_seed, start_tracker

UNREACHABLE = "tcp://127.0.0.1:9"
MODEL_ID = "ab" * 32
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG_NAME = "a-rather-long-model-name-for-a-small-terminal"


# ------------------------------------------------------------------ helpers


def in_terminal(args: list[str], home: Path, columns: int = 80, timeout_s: float = 60.0) -> str:
    """Run `gtorrent ARGS` with its stdout and stderr on a pseudo-terminal `columns` wide, as a user at
    an 80-column terminal runs it; returns what the terminal got, colour codes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("GTORRENT_TRACKERS", "NO_COLOR")}
    env.update({"GTORRENT_HOME": str(home), "COLUMNS": str(columns), "TERM": "xterm-256color"})
    proc = subprocess.Popen([GTORRENT, *args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([master], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, b"".join(chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return ANSI.sub("", b"".join(chunks).decode("utf-8").replace("\r\n", "\n"))


class Stdout:
    """A process's stdout, line by line, awaited with a deadline (Proc reads only stderr)."""

    def __init__(self, proc: Proc) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        stream = proc.popen.stdout
        assert stream is not None

        def pump() -> None:
            for line in stream:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def event(self, name: str, timeout_s: float = 30.0, **expected: Any) -> dict[str, Any]:
        """The next JSON event called `name` whose fields include `expected`."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            assert line.isascii(), line  # ASCII only: nothing a terminal could act on
            value = json.loads(line)
            if value["event"] == name and all(value.get(k) == v for k, v in expected.items()):
                return value  # type: ignore[no-any-return]
        raise AssertionError(f"no {name} event with {expected} in {timeout_s} s; saw {self.seen}")


def record(identity: Identity, *, seq_s: float, endpoint: str = "tcp://127.0.0.1:7799", ttl_s: float = 600.0,
           name: str = "m") -> PeerRecord:
    return PeerRecord.sign(identity, endpoint=endpoint, roles=("seed", "relay"), models=(ModelInfo(MODEL_ID, name, 1024),),
                           seq=int(seq_s * 1000), expires=time.time() + ttl_s, load={"queue": 0.0})


def announce(url: str, *records: PeerRecord) -> None:
    async def run() -> None:
        ctx = new_context()
        try:
            for one in records:
                assert await announce_all(ctx, [url], one) == {}
        finally:
            ctx.destroy(linger=0)

    asyncio.run(run())


# ------------------------------------------------------------------ gtorrent peers in 80 columns


def test_announced_at_reads_the_records_seq_only_when_it_is_a_time() -> None:
    now = time.time()
    me = Identity.generate()
    assert announced_at(record(me, seq_s=now - 300), now) == pytest.approx(now - 300, abs=0.01)
    assert announced_at(record(me, seq_s=now + 5), now) == now  # a clock a little ahead: never in the future
    assert announced_at(record(me, seq_s=now + 3600), now) is None  # far ahead: no time
    one = PeerRecord.sign(me, endpoint="tcp://127.0.0.1:1", roles=("relay",), seq=1, expires=now + 60)
    assert announced_at(one, now) is None  # a counter, not milliseconds: older than any TTL allows
    assert announced_at(record(me, seq_s=now - MAX_RECORD_TTL_S + 10, ttl_s=10), now) is not None


@pytest.mark.timeout(90)
def test_peers_fits_80_columns_and_says_when_each_peer_announced(tmp_path: Path) -> None:
    from gtorrent.store import Store

    tracker, url = start_tracker(tmp_path / "tracker")
    now = time.time()
    fresh, old, gone = Identity.generate(), Identity.generate(), Identity.generate()
    try:
        announce(url, record(fresh, seq_s=now, name=LONG_NAME),
                 record(old, seq_s=now - 300, endpoint="tcp://seed-with-a-long-host-name.example.org:17701"))
        home = tmp_path / "asker"
        store = Store.open(home)  # a peer seen before, which these trackers do not list
        # its last record: announced 2 h ago with a 90 s TTL; this peer saw it listed a little later
        store.saw_peers([record(gone, seq_s=now - 7200, ttl_s=90 - 7200)], now - 7150)
        store.close()

        shown = in_terminal(["peers", "--tracker", url], home)
        lines = [line for line in shown.splitlines() if line.strip()]
        assert max(len(line) for line in lines) <= 80, shown
        assert lines[0].split() == ["PEER", "ROLES", "MODELS", "TRUST", "LAST", "SEEN", "ENDPOINT"], shown
        rows = {peer: [line for line in lines if line.startswith(short_id(peer.peer_id))] for peer in (fresh, old, gone)}
        assert all(len(found) == 1 for found in rows.values()), shown  # one line per peer: nothing wrapped
        assert re.search(r"\b\d+ s ago\b", rows[fresh][0]) and "…" in rows[fresh][0], shown  # its long name cut
        assert "5 min ago" in rows[old][0] and "seed-with" in rows[old][0], shown
        assert "2 h ago" in rows[gone][0] and " *" in rows[gone][0], shown
        assert "* not listed by these trackers" in shown and "offline" not in shown
        assert "3 peers" in shown and "2 listed" in shown

        wide = in_terminal(["peers", "--tracker", url, "--wide"], home, columns=250)
        header = wide.splitlines()[0]
        for column in ("REPUTATION", "STATE", "LAST C", "AGREED", "OK", "FAILED", "TTFT", "TOK/S", "QUEUE", "CACHE HIT"):
            assert column in header, wide
        assert "tcp://seed-with-a-long-host-name.example.org:17701" in wide  # the endpoint whole
        # a terminal wide enough for every column gets them without --wide
        assert in_terminal(["peers", "--tracker", url], home, columns=250).splitlines()[0] == header
    finally:
        tracker.kill()


def _row(**fields: Any) -> PeerRow:
    values: dict[str, Any] = {
        "peer_id": "a" * 26, "roles": ["seed", "relay"], "endpoint": "tcp://[2001:db8::1234:5678]:7701",
        "models": [{"model_id": MODEL_ID, "name": LONG_NAME, "context_length": 1024}],
        "online": True, "reputation": 0.191, "state": "untrusted", "reliability": 0.5, "asks_ok": 3, "asks_failed": 1,
        "median_ttft_s": 0.2, "median_tokens_per_s": 150.0, "queue": 0.0, "last_seen": time.time() - 3,
        "announced": time.time() - 86400 * 12,
    }
    values.update(fields)
    return PeerRow(**values)


def test_the_narrow_table_keeps_every_cell_on_one_line() -> None:
    """The widest values each column can hold, in 80 columns: one line per peer, each value whole but
    the model names and endpoints, which end in "…"."""
    from gtorrent_cli.peers import peers_table

    rows = [_row(), _row(peer_id="b" * 26, online=False, state="unverified", reputation=None, announced=None,
                     roles=["seed", "relay", "verifier"], last_seen=None)]
    buffer = io.StringIO()
    Console(file=buffer, width=80, emoji=False, highlight=False).print(peers_table(rows, wide=False))
    lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 80, buffer.getvalue()
    first = next(line for line in lines if line.startswith("aaaaaaaa"))
    assert "untrusted 0.19" in first and "12 days ago" in first and " seed " in first  # every seed relays
    second = next(line for line in lines if line.startswith("bbbbbbbb *"))
    assert "unverified" in second and "never" in second and "seed,verifier" in second
    assert len(lines) == 5  # header, 2 peers, the totals, the note on `*`


# ------------------------------------------------------------------ a seed binds before it loads


def test_a_busy_port_fails_the_seed_before_anything_loads(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import gtorrent.runtime.files as files
    from gtorrent.runtime import LanguageModel

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the seed hashed or loaded its model before binding")

    monkeypatch.setattr(files, "model_id", never)
    monkeypatch.setattr(LanguageModel, "load", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = cli("seed", "--bind", f"tcp://127.0.0.1:{port}", "--tracker", UNREACHABLE)
        assert time.monotonic() - started < 5
    assert result.code != 0, result
    assert f"error: cannot bind tcp://127.0.0.1:{port} (Address already in use" in result.err, result
    assert "hint: pick another --bind address, or port 0 for any free port" in result.err
    assert "loaded" not in result.err and "seeding" not in result.err
    # every interface without --advertise reaches no peer: refused as early
    anywhere = cli("seed", "--bind", "tcp://0.0.0.0:0", "--tracker", UNREACHABLE)
    assert anywhere.code != 0 and "listens on every interface" in anywhere.err and "--advertise" in anywhere.err


# ------------------------------------------------------------------ long-running nodes say what they do


@pytest.mark.timeout(120)
def test_a_seed_says_one_line_per_request(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tracker, url = start_tracker(tmp_path / "tracker")
    seed = None
    try:
        seed, _ = start_seed(tmp_path / "seed", [url], "--threads", "1")
        # the start-up line says where the model computes, with the threads --threads set
        assert any(" on CPUExecutionProvider with 1 thread" in line for line in seed.seen if "loaded" in line), seed.seen
        asked = cli("ask", "--direct", "--tracker", url, "-n", "4", "The for statement")
        assert asked.code == 0, asked
        seed.wait_for(r"^\d\d:\d\d:\d\d direct ask · served \d+ tokens · cached \d+/\d+ prompt tokens · \d", 30)
        assert not any("\x1b" in line or "hashing" in line for line in seed.seen)  # no bar off a terminal
    finally:
        if seed is not None:
            seed.kill()
        tracker.kill()


async def test_the_seed_tells_direct_from_private_askers(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gtorrent.asker import AskRequest, ask_direct
    from gtorrent.private import ask_private
    from gtorrent.seed import ServedRequest
    from gtorrent.store import Store

    await swarm.start(relays=12)
    served: list[ServedRequest] = []
    swarm.seeds[0].on_served = served.append
    store = Store.open(tmp_path)
    try:
        await ask_private(swarm.ctx, [swarm.url], AskRequest("The for statement", max_tokens=3), store)
        await ask_direct(swarm.ctx, [swarm.url], AskRequest("The for statement", max_tokens=2), store)
        deadline = time.monotonic() + 10
        while len(served) < 2 and time.monotonic() < deadline:  # the seed reports just after its last send
            await asyncio.sleep(0.01)
    finally:
        store.close()
    assert [(s.mode, s.tokens) for s in served] == [("private", 3), ("direct", 2)]


def test_request_lines_and_events() -> None:
    from gtorrent_cli.seed import request_event, request_line

    from gtorrent.seed import ServedRequest

    line = request_line(ServedRequest(7, 64, 80, 0.25, forwarded_by="[red]\x1bpeer-abcdefgh", mode="private"))
    assert line.startswith("private ask · served 7 tokens · cached 64/80 prompt tokens · 250 ms · forwarded by \\[red]")
    assert "\x1b" not in line
    event = request_event(ServedRequest(7, 0, 9, 1.5, forwarded_to="x" * 26))
    assert event == {"asker": "direct", "tokens": 7, "prompt_tokens": 9, "cached": 0, "total_s": 1.5,
                     "forwarded_to": "x" * 26, "forwarded_by": None}


def test_node_log_quiet_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    from gtorrent_cli import output

    hostile = "[/x]\x1b]0;title\x07\u202e\x7f"
    output.NodeLog(quiet=True).activity("served", "served", peer=hostile)
    output.NodeLog(quiet=True, json_events=True).activity("served", "served", peer=hostile)
    assert capsys.readouterr() == ("", "")  # -q: no activity at all
    output.NodeLog(quiet=True).status("seeding", "ready")
    assert capsys.readouterr().err == "seeding\n"  # start-up and stop lines still show
    log = output.NodeLog(json_events=True, clock=lambda: 1700000000.0)
    log.activity(f"said {output.remote(hostile)}", "served", peer=hostile)
    log.status("stopped", "stopped", requests=2)
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert events == [{"event": "served", "ts": 1700000000.0, "peer": hostile},
                      {"event": "stopped", "ts": 1700000000.0, "requests": 2}]
    assert captured.out.isascii() and "\x7f" not in captured.out
    assert captured.err == "stopped\n"  # activity goes to stdout alone with --json
    output.NodeLog().activity(f"said {output.remote(hostile)}", "served")
    text = capsys.readouterr().err
    assert re.fullmatch(r"\d\d:\d\d:\d\d said \[/x\]\]0;title\n", text), text


def test_tracker_rounds_count_announces_and_expiries() -> None:
    tally = _TrackerTally()
    assert tally.take(peers=3, interval_s=30) is None  # a quiet round says nothing
    tally.announced(4, 1)
    tally.announced(2, 0)
    tally.swept(0)
    tally.swept(2)
    assert tally.take(peers=7, interval_s=30) == TrackerRound(6, 1, 2, 7, 30)
    assert tally.take(peers=7, interval_s=30) is None  # zeroed
    from gtorrent_cli.tracker import round_line

    assert round_line(TrackerRound(6, 1, 2, 7, 30)) == "6 announces (1 refused) · 2 expired · 7 peers listed, in 30 s"


def test_tracker_service_reports_announces_and_expiries() -> None:
    from gtorrent.tracker import TrackerService

    clock = [time.time()]
    service = TrackerService(Identity.generate(), None, clock=lambda: clock[0])
    expired: list[int] = []
    service.on_expired = expired.append
    service.table.accept(record(Identity.generate(), seq_s=clock[0], ttl_s=10))
    service.sweep()
    clock[0] += 11
    service.sweep()
    assert expired == [0, 1]
    service.close()


@pytest.mark.timeout(60)
def test_a_tracker_says_each_round_as_json(tmp_path: Path) -> None:
    proc = Proc(["tracker", "--bind", "tcp://127.0.0.1:0", "--json", "--log-interval", "1"], tmp_path / "tracker")
    try:
        url = proc.wait_for(r"tracker (tcp://\S+)").group(1)
        events = Stdout(proc)
        ready = events.event("ready")
        assert ready["url"] == url
        now = time.time()
        announce(url, record(Identity.generate(), seq_s=now), record(Identity.generate(), seq_s=now, ttl_s=1.5))
        first = events.event("round")
        if first["announces"] == 1:  # the two announces fell into two rounds
            first = events.event("round", announces=1)
        assert (first["refused"], first["expired"], first["peers"]) == (0, 0, 2), first
        # the short-lived record lapses and the next sweep (every 5 s) forgets it
        events.event("round", timeout_s=20, announces=0, expired=1, peers=1)
        proc.terminate()
        events.event("stopped")
    finally:
        proc.kill()


@pytest.mark.timeout(60)
async def test_a_relay_says_what_it_carried(tmp_path: Path) -> None:
    from gtorrent.circuit import CircuitClient
    from gtorrent.discovery import discover

    from .test_relay import echo_terminal, start_node

    tracker, url = start_tracker(tmp_path / "tracker")
    relay = Proc(["relay", "--tracker", url, "--log-interval", "1"], tmp_path / "relay")
    ctx = new_context()
    terminal = None
    try:
        relay.wait_for(r"relaying as \w+")
        found = await discover(ctx, [url], role="relay")
        terminal = await start_node(ctx, terminal=echo_terminal, trackers=[url])
        circuit = CircuitClient(ctx, [*found.records.values(), terminal.record])
        await circuit.build()
        await circuit.send(b"ping")
        assert (await circuit.receive(5))[2] == b"ANSWER:gnip"
        await asyncio.to_thread(relay.wait_for, r"\d\d:\d\d:\d\d circuits \+1 -0 \(1 open\) · \d+ cells in 1 s", 20)
        # CircuitClient.close's destroy, with the link kept open until the relay has it (close drops
        # what is still queued)
        await circuit.conn.send("destroy", {"cid": circuit.cid, "reason": "done"})
        await asyncio.to_thread(relay.wait_for, r"circuits \+0 -1 \(0 open\)", 20)
        circuit.conn.close()
    finally:
        if terminal is not None:
            terminal.relay_node.close()
        relay.kill()
        tracker.kill()
        ctx.destroy(linger=0)


def test_relay_activity_between_samples() -> None:
    from gtorrent_cli.relay import activity_line

    before = {"circuits": 10, "open": 2, "cells": 100, "dropped": 0}
    assert RelayActivity.between(before, dict(before), 10) is None  # nothing moved: no line
    moved = RelayActivity.between(before, {"circuits": 13, "open": 4, "cells": 160, "dropped": 2}, 10)
    assert moved == RelayActivity(opened=3, closed=1, open=4, cells=60, dropped=2, interval_s=10)
    assert activity_line(moved) == "circuits +3 -1 (4 open) · 60 cells · 2 dropped in 10 s"


# ------------------------------------------------------------------ hashing a model on first use


def test_model_hashing_reports_its_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gtorrent.runtime.files as files

    copy = tmp_path / "model"
    shutil.copytree(files.bundled_model_path(), copy)
    located = files.locate_model(copy)
    size = sum(path.stat().st_size for path in located.all_files)
    monkeypatch.setattr(files, "_CHUNK_BYTES", 64 << 10)  # many chunks from a small model
    calls: list[tuple[int, int]] = []
    identity = files.model_id(located, tmp_path / "cache", lambda done, total: calls.append((done, total)))
    assert identity == files.model_id(located)  # the same id, with or without progress
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    assert len(calls) > len(located.all_files)  # per chunk, not per file
    assert all(a[0] <= b[0] and a[1] == b[1] == size for a, b in zip(calls, calls[1:], strict=False))
    calls.clear()
    files.model_id(located, tmp_path / "cache", lambda done, total: calls.append((done, total)))
    assert calls == []  # every digest cached: nothing to show


def test_the_progress_bar_draws_only_on_a_terminal() -> None:
    from gtorrent_cli import output

    piped = io.StringIO()
    with output.byte_progress("hashing", Console(file=piped, force_terminal=False)) as progress:
        progress(0, 10 << 20)
        progress(10 << 20, 10 << 20)
    assert piped.getvalue() == ""
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=100)
    with output.byte_progress("hashing [the] model", console) as progress:
        progress(0, 10 << 20)
        progress(5 << 20, 10 << 20)
    drawn = ANSI.sub("", terminal.getvalue())  # the last frame, drawn as the bar stops, then erased
    assert "hashing [the] model" in drawn and "5.2/10.5 MB" in drawn
