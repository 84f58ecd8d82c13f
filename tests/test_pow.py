"""Proof of work on new identities (issue 11, item 2, optional part): the pure rules of pow.py and the
tracker table, the record field, and a real tracker and announcer over 127.0.0.1 with a real home."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import stat
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gtorrent import discovery, pow
from gtorrent.discovery import Announcer, TrackerClient, TrackerRejected
from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord, ProtocolError
from gtorrent.tracker import Rejected, TrackerDatabase, TrackerTable
from gtorrent.transport import Connection

from .procs import Proc
from .test_tracker import Running, start

pytestmark = pytest.mark.timeout(60)

NOW = 1_000_000.0
BITS = 10  # ~1,000 hashes: fast in tests, far above what chance gives an empty nonce (0 bits)


def relay(identity: Identity, seq: int = 1, expires: float = NOW + 60, stopped: bool = False,
          nonce: bytes = b"") -> PeerRecord:
    record = PeerRecord.sign(identity, endpoint="tcp://10.0.0.1:7000", roles=("relay",), seq=seq,
                             expires=expires, stopped=stopped)
    return replace(record, pow=nonce)


@pytest.fixture
async def trackers() -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    yield started
    for running in started:
        await running.stop()


# --------------------------------------------------------------------------- pow.py


@pytest.mark.parametrize(("digest", "bits"), [
    (b"\xff" + bytes(31), 0), (b"\x80" + bytes(31), 0), (b"\x7f" + bytes(31), 1), (b"\x01" + bytes(31), 7),
    (b"\x00\x01" + bytes(30), 15), (b"\x00\x00\x00\x10" + bytes(28), 27), (bytes(32), 256),
])
def test_leading_zero_bits(digest: bytes, bits: int) -> None:
    assert pow.leading_zero_bits(digest) == bits


def test_work_is_the_leading_zeros_of_the_labelled_hash_of_key_and_nonce() -> None:
    key = Identity.generate().signing_public
    nonce = pow.solve(key, 12)
    assert len(nonce) == pow.NONCE_BYTES
    digest = hashlib.blake2b(b"gtorrent/pow/v1" + key + nonce, digest_size=32).digest()
    assert pow.work(key, nonce) == pow.leading_zero_bits(digest) >= 12
    assert pow.work(key, b"") == 0
    assert pow.solve(key, 0) == b""
    # the work is bound to the key: the same nonce proves (almost surely) little for another key
    others = [pow.work(Identity.generate().signing_public, nonce) for _ in range(8)]
    assert min(others) < 12


def test_solving_more_than_the_cap_is_refused() -> None:
    with pytest.raises(pow.PowTooHard) as info:
        pow.solve(b"k" * 32, pow.MAX_POW_BITS + 1)
    assert "at most 28" in info.value.message and info.value.hint


def test_the_cache_keeps_checked_nonces_in_a_private_file(tmp_path: Path) -> None:
    identity = Identity.generate()
    cache = pow.PowCache(tmp_path / "home")
    assert cache.get(identity.peer_id, identity.signing_public, 1) is None
    nonce = pow.solve(identity.signing_public, BITS)
    cache.put(identity.peer_id, nonce)
    assert stat.S_IMODE((tmp_path / "home" / "pow.json").stat().st_mode) == 0o600
    assert cache.get(identity.peer_id, identity.signing_public, BITS) == nonce
    assert cache.get(identity.peer_id, identity.signing_public, 40) is None  # not enough work
    other = Identity.generate()  # a nonce filed under another key is checked, not believed
    assert cache.get(identity.peer_id, other.signing_public, BITS) is None
    (tmp_path / "home" / "pow.json").write_text("{not json")
    assert cache.get(identity.peer_id, identity.signing_public, BITS) is None


# --------------------------------------------------------------------------- the record field


def test_a_record_without_work_has_no_pow_field_and_one_with_work_round_trips() -> None:
    identity = Identity.generate()
    bare = relay(identity)
    assert "pow" not in bare.to_wire()  # peers that know no `pow` field still read it
    nonce = pow.solve(identity.signing_public, BITS)
    worked = replace(bare, pow=nonce)  # outside the signed bytes: attached without re-signing
    parsed = PeerRecord.from_wire(worked.to_wire())
    assert parsed.pow == nonce and pow.work(parsed.signing_key, parsed.pow) >= BITS
    assert parsed.signature == bare.signature


@pytest.mark.parametrize("value", [17, "x" * 25, "!!!", "A" * 24])
def test_a_malformed_pow_field_is_refused(value: object) -> None:
    doc = relay(Identity.generate()).to_wire()
    doc["pow"] = value
    with pytest.raises(ProtocolError, match="pow|base64"):
        PeerRecord.from_wire(doc)


# --------------------------------------------------------------------------- the table


def test_a_new_identity_needs_the_work_and_a_listed_one_keeps_what_it_had() -> None:
    now = [NOW]
    table = TrackerTable(clock=lambda: now[0], pow_bits=BITS)
    newcomer = Identity.generate()
    with pytest.raises(Rejected) as refused:
        table.accept(relay(newcomer))
    assert refused.value.code == "pow" and f"{BITS} bits" in str(refused.value) and "carries 0" in str(refused.value)
    nonce = pow.solve(newcomer.signing_public, BITS)
    table.accept(relay(newcomer, nonce=nonce))
    assert table.entries[newcomer.peer_id].work >= BITS
    with pytest.raises(Rejected, match="proof of work"):  # it cannot shed its proof on a refresh
        table.accept(relay(newcomer, seq=2))
    table.accept(relay(newcomer, seq=3, nonce=nonce))
    # a peer listed before the bar went up is not dropped by it
    old = Identity.generate()
    table.pow_bits = 0
    table.accept(relay(old))
    table.pow_bits = BITS
    table.accept(relay(old, seq=2))
    # ... until its entry lapses: then it is new again
    now[0] += 100
    table.expire()
    with pytest.raises(Rejected, match="proof of work"):
        table.accept(relay(old, seq=3, expires=now[0] + 60))


def test_a_stopped_peer_keeps_its_work_across_a_restart(tmp_path: Path) -> None:
    now = [NOW]
    table = TrackerTable(clock=lambda: now[0], pow_bits=BITS)
    peer = Identity.generate()
    nonce = pow.solve(peer.signing_public, BITS)
    table.accept(relay(peer, expires=NOW + 600, nonce=nonce))
    table.accept(relay(peer, seq=2, expires=NOW + 600, stopped=True, nonce=nonce))  # a tombstone
    TrackerDatabase(tmp_path / "t.db").flush(table)
    again = TrackerTable(clock=lambda: now[0], pow_bits=BITS)
    TrackerDatabase(tmp_path / "t.db").load_into(again)
    assert again.entries[peer.peer_id].record is None and again.entries[peer.peer_id].work >= BITS
    with pytest.raises(Rejected, match="proof of work"):  # the tombstone remembers what it had paid
        again.accept(relay(peer, seq=3, expires=NOW + 600))
    again.accept(relay(peer, seq=3, expires=NOW + 600, nonce=nonce))


# --------------------------------------------------------------------------- tracker and announcer


def live(identity: Identity, stopped: bool = False) -> PeerRecord:
    now = time.time()
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("relay",), seq=int(now * 1e6),
                           expires=now + 600, stopped=stopped)


async def test_hello_advertises_the_bar_only_when_there_is_one(ctx: Any, trackers: list[Running]) -> None:
    plain = await start(None)
    trackers.append(plain)
    strict = await start(None, pow_bits=BITS)
    trackers.append(strict)
    for running, expected in ((plain, None), (strict, BITS)):
        async with Connection(ctx, running.url, server_key=None) as conn:
            hello = await conn.request("hello", {}, frozenset({"hello_ok"}), 5)
        assert hello.get("pow_bits") == expected
        client = TrackerClient(ctx, running.url)
        await client._tracker_record()  # the main port says the same
        assert client.pow_bits == (expected or 0)
    with pytest.raises(TrackerRejected) as refused:  # a bare new identity is refused, and told why
        await TrackerClient(ctx, strict.url).announce(live(Identity.generate()))
    assert refused.value.code == "pow" and f"{BITS} bits" in refused.value.message


async def test_the_announcer_solves_once_and_keeps_the_nonce_in_the_home(
    ctx: Any, trackers: list[Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    solves: list[int] = []

    plain_solve = discovery.solve_until

    def counted(key: bytes, bits: int, cancel: Any) -> bytes | None:
        solves.append(bits)
        return plain_solve(key, bits, cancel)

    monkeypatch.setattr(discovery, "solve_until", counted)
    plain = await start(None)
    strict = await start(None, pow_bits=BITS)
    trackers += [plain, strict]
    identity = Identity.generate()
    home = tmp_path / "home"
    seen: list[PeerRecord] = []
    plain_announce = TrackerClient.announce

    async def spy(self: TrackerClient, record: PeerRecord) -> Any:
        seen.append(record)
        return await plain_announce(self, record)

    monkeypatch.setattr(TrackerClient, "announce", spy)
    announcer = Announcer(ctx, [plain.url, strict.url], lambda stopped: live(identity, stopped), home=home)
    assert await announcer.announce() == {}
    assert solves == [BITS] and announcer.solved == 1
    assert {peer for peer in (r.peer_id for r in await TrackerClient(ctx, strict.url).query())} == {identity.peer_id}
    cached = pow.PowCache(home).get(identity.peer_id, identity.signing_public, BITS)
    assert cached == announcer.nonce and stat.S_IMODE((home / "pow.json").stat().st_mode) == 0o600
    # the tracker that asks no work got the bare record (it may not know the field)
    assert sorted(bool(r.pow) for r in seen) == [False, True]
    assert await announcer.announce() == {}  # a re-announce: no new solve
    # a restart (a new announcer on the same home) takes the nonce from the home
    again = Announcer(ctx, [strict.url], lambda stopped: live(identity, stopped), home=home)
    assert await again.announce() == {} and again.solved == 0 and solves == [BITS]
    assert await again.stop() == {}


async def test_the_announcer_follows_a_bar_raised_after_its_hello(
    ctx: Any, trackers: list[Running], tmp_path: Path
) -> None:
    tracker = await start(None)
    trackers.append(tracker)
    identity = Identity.generate()
    announcer = Announcer(ctx, [tracker.url], lambda stopped: live(identity, stopped), home=tmp_path / "home")
    await announcer.trackers[0]._tracker_record()  # it has heard "no work asked" ...
    tracker.service.table.pow_bits = BITS  # ... and then the operator raised the bar
    assert await announcer.announce() == {}
    assert announcer.solved == 1 and announcer.trackers[0].pow_bits == BITS


async def test_a_bar_above_the_cap_is_an_error_for_that_tracker_only(ctx: Any, trackers: list[Running]) -> None:
    plain = await start(None)
    greedy = await start(None)
    trackers += [plain, greedy]
    identity = Identity.generate()
    announcer = Announcer(ctx, [plain.url, greedy.url], lambda stopped: live(identity, stopped))
    client = announcer.trackers[1]
    await client._tracker_record()
    client.pow_bits = pow.MAX_POW_BITS + 4  # as a tracker asking too much would say in its hello
    greedy.service.table.pow_bits = 0
    errors = await announcer.announce()
    assert list(errors) == [client.address] and "at most 28" in errors[client.address]


def test_tracker_command_refuses_a_bar_above_the_cap(cli: Any) -> None:
    assert "--pow-bits" in cli("tracker", "--help").out
    refused = cli("tracker", "--pow-bits", "40", "--bind", "tcp://127.0.0.1:0")
    assert refused.code == 2 and "--pow-bits" in refused.err and "28" in refused.err


@pytest.mark.timeout(90)
async def test_a_tracker_process_with_pow_bits_refuses_bare_new_identities(ctx: Any, tmp_path: Path) -> None:
    proc = Proc(["tracker", "--bind", "tcp://127.0.0.1:0", "--pow-bits", str(BITS)], tmp_path / "tracker-home")
    try:
        match = proc.wait_for(r"tracker (tcp://\S+) .*new peers need (\d+) bits")
        url = match.group(1)
        assert int(match.group(2)) == BITS
        client = TrackerClient(ctx, url)
        with pytest.raises(TrackerRejected) as refused:
            await client.announce(live(Identity.generate()))
        assert refused.value.code == "pow" and client.pow_bits == BITS
        identity = Identity.generate()
        announcer = Announcer(ctx, [url], lambda stopped: live(identity, stopped), home=tmp_path / "peer-home")
        assert await announcer.announce() == {}
        assert [r.peer_id for r in await client.query()] == [identity.peer_id]
    finally:
        assert proc.terminate() == 0


def slow_solver(monkeypatch: pytest.MonkeyPatch, chunks: int | None) -> dict[str, Any]:
    """Make every chunk of the announcer's solve take 50 ms (a solve of `chunks` chunks then the real
    answer, or None: one that never ends), and note when the worker thread returns."""
    state: dict[str, Any] = {"chunks": 0, "returned": threading.Event()}
    plain_some, plain_until = discovery.solve_some, discovery.solve_until

    def slow_some(key: bytes, bits: int, start: int, tries: int) -> bytes | None:
        time.sleep(0.05)
        state["chunks"] += 1
        if chunks is None or state["chunks"] < chunks:
            return None
        return plain_some(key, bits, start, 1 << 24)

    def until(key: bytes, bits: int, cancel: threading.Event) -> bytes | None:
        try:
            return plain_until(key, bits, cancel)
        finally:
            state["returned"].set()

    monkeypatch.setattr(discovery, "solve_some", slow_some)
    monkeypatch.setattr(discovery, "solve_until", until)
    return state


async def test_a_slow_proof_of_work_does_not_hold_back_other_trackers(
    ctx: Any, trackers: list[Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the work one tracker asks takes 2 s, the other hears its re-announces every second; the
    demanding tracker is announced to once the work is done, without waiting for the next round."""
    slow_solver(monkeypatch, chunks=40)
    plain, strict = await start(None), await start(None, pow_bits=BITS)
    trackers += [plain, strict]
    heard: list[float] = []
    accept = plain.service.table.accept

    def spy(record: PeerRecord) -> None:
        accept(record)
        heard.append(time.monotonic())

    plain.service.table.accept = spy  # type: ignore[method-assign]
    identity = Identity.generate()
    announcer = Announcer(ctx, [plain.url, strict.url], lambda stopped: live(identity, stopped),
                          max_interval_s=1.0, home=tmp_path / "home")
    started = time.monotonic()
    errors = await announcer.announce()
    assert time.monotonic() - started < 1.5 and heard  # the plain tracker heard it at once
    assert list(errors) == [strict.url] and "background" in errors[strict.url]
    loop = asyncio.create_task(announcer.loop())
    try:
        strict_client = TrackerClient(ctx, strict.url)
        deadline = time.monotonic() + 15
        # announced to right after the solve: the announcer has its reply (the tracker stores the
        # record before it replies, so a query alone can see it while the reply is still in flight)
        while strict.url in announcer.errors:
            assert time.monotonic() < deadline, "the demanding tracker never heard the announce"
            await asyncio.sleep(0.05)
        assert announcer.solved == 1 and await strict_client.query()
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    gaps = [b - a for a, b in itertools.pairwise(heard)]
    assert len(heard) >= 2 and max(gaps) < 1.8, f"the plain tracker heard nothing for {max(gaps):.1f} s"
    assert (await announcer.stop()) == {}


async def test_stop_cancels_a_proof_of_work_under_way(
    ctx: Any, trackers: list[Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = slow_solver(monkeypatch, chunks=None)  # a solve that would never end
    plain, strict = await start(None), await start(None, pow_bits=BITS)
    trackers += [plain, strict]
    identity = Identity.generate()
    announcer = Announcer(ctx, [plain.url, strict.url], lambda stopped: live(identity, stopped),
                          home=tmp_path / "home")
    assert list(await announcer.announce()) == [strict.url]
    assert state["chunks"] > 0 and not state["returned"].is_set()  # solving in the background
    started = time.monotonic()
    errors = await announcer.stop()
    assert time.monotonic() - started < 1.5
    assert list(errors) == [strict.url] and "not listed" in errors[strict.url]  # nothing to withdraw there
    assert not await TrackerClient(ctx, plain.url).query()  # the plain tracker heard the goodbye
    deadline = time.monotonic() + 2
    while not state["returned"].is_set():  # the worker thread gives up within a chunk
        assert time.monotonic() < deadline, "the proof-of-work thread kept running after stop"
        await asyncio.sleep(0.02)
