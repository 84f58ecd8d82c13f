"""The composition root: builds and wires each kind of node from settings, and runs it until stopped.

Everything above this module (the CLI) calls these functions; everything below never reaches up. Each
`run_*` function owns its event loop's lifetime: it binds, announces, serves until SIGINT/SIGTERM, then
says goodbye to the trackers and closes every socket.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .discovery import DEFAULT_TRACKER, TrackerClient, TrackerUnreachable, discover
from .identity import load_or_create_identity
from .paths import NODE_LOCK, TRACKER_LOCK, HomeLock, home_dir, lock_home, try_lock_home
from .protocol import MAX_RECORD_TTL_S, PeerRecord
from .routing import DEFAULT_MIN_RELAY_AGE_S, RelayRules
from .transport import new_context

if TYPE_CHECKING:  # imported where used: a relay never loads SQLite tooling, a tracker never the asker
    from .asker import AskEvents, AskRequest, AskResult, AskTimeouts
    from .guards import Guard
    from .protocol import Verdict
    from .reputation import EpochConsensus
    from .store import Store
    from .tracker import TrackerService

DEFAULT_SEED_BIND = "tcp://127.0.0.1:0"
PROBE_TIMEOUT_S = 1.0
ANNOUNCE_SKEW_S = 60.0  # a record's seq may claim a time this far ahead of ours (clocks that run ahead)


@dataclass
class NodeSettings:
    home: Path = field(default_factory=home_dir)
    trackers: list[str] = field(default_factory=lambda: [DEFAULT_TRACKER])
    trackers_explicit: bool = False  # given by --tracker or GTORRENT_TRACKERS
    advertise: str | None = None  # host peers reach this node at, when bound to every interface
    # verifiers (peer ids) whose verdicts count (--verifier / GTORRENT_VERIFIERS); None: those the reached
    # trackers admit (their `hello_ok` lists), or any verifier when none of them names a list. A tracker
    # takes it as the verifiers it admits (None: any).
    verifiers: frozenset[str] | None = None


async def _until_signalled(stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not a Unix loop
            pass
    await stop.wait()


async def _every(interval_s: float, report: Callable[[], None]) -> None:
    """Call `report` every `interval_s` seconds until cancelled (a node's activity line)."""
    while True:
        await asyncio.sleep(interval_s)
        report()


# ---------------------------------------------------------------------- tracker

TRACKER_ROUND_S = 30.0  # = tracker.REANNOUNCE_INTERVAL_S: one round of re-announces per report


@dataclass(frozen=True)
class TrackerRound:
    """What a tracker did in one report interval (`gtorrent tracker`'s activity line)."""

    announces: int  # announces accepted (new peers and refreshes)
    refused: int  # announces refused (stale sequence, bad record, capacity, storage)
    expired: int  # records forgotten by the expiry sweeps: their peers stopped re-announcing
    peers: int  # records listed at the end of the interval
    interval_s: float


@dataclass
class _TrackerTally:
    announces: int = 0
    refused: int = 0
    expired: int = 0

    def announced(self, accepted: int, refused: int) -> None:
        self.announces += accepted
        self.refused += refused

    def swept(self, expired: int) -> None:
        self.expired += expired

    def take(self, peers: int, interval_s: float) -> TrackerRound | None:
        """The round so far (None when nothing happened: a quiet tracker prints nothing), then zeroed."""
        if not (self.announces or self.refused or self.expired):
            return None
        done = TrackerRound(self.announces, self.refused, self.expired, peers, interval_s)
        self.announces = self.refused = self.expired = 0
        return done


def run_tracker(
    settings: NodeSettings, bind: str, on_ready: Callable[[TrackerService], None], curve_port: int | None = None,
    *, on_round: Callable[[TrackerRound], None] | None = None, round_s: float = TRACKER_ROUND_S,
) -> dict[str, int]:
    """`curve_port`: the CurveZMQ socket's port (None: the bind port + 1; 0: any free port; tracker.py).
    `on_round`: called every `round_s` seconds in which announces arrived or records expired."""
    from .tracker import TrackerService

    lock = lock_home(settings.home, TRACKER_LOCK, "tracker")  # before tracker.db is opened: one writer
    try:
        identity, _ = load_or_create_identity(settings.home)
        service = TrackerService(identity, settings.home / "tracker.db", verifiers=settings.verifiers)
    except BaseException:
        lock.release()
        raise

    async def main() -> None:
        service.bind(bind, settings.advertise, curve_port)
        serving = asyncio.create_task(service.serve())
        on_ready(service)
        reporting: asyncio.Task[None] | None = None
        if on_round is not None:
            tally, report = _TrackerTally(), on_round
            service.on_announced, service.on_expired = tally.announced, tally.swept

            def tell() -> None:
                if (done_round := tally.take(service.table.active_count(), round_s)) is not None:
                    report(done_round)

            reporting = asyncio.create_task(_every(round_s, tell))
        waiting = asyncio.create_task(_until_signalled())
        done, _ = await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        if reporting is not None:
            reporting.cancel()
        for task in done:
            if task is serving and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    try:
        asyncio.run(main())
    finally:
        service.close()
        lock.release()
    return service.counters


# ---------------------------------------------------------------------- seed


@dataclass
class SeedEvents:
    tracker_started: Callable[[str], None] = lambda url: None
    tracker_skipped: Callable[[str, str], None] = lambda url, holder: None  # (url, who holds the tracker lock)
    ready: Callable[[Any], None] = lambda seed: None
    announced: Callable[[dict[str, str]], None] = lambda errors: None
    stopping: Callable[[], None] = lambda: None
    served: Callable[[Any], None] = lambda served: None  # a seed.ServedRequest per request finished here
    group_changed: Callable[[str, bool], None] = lambda peer_id, joined: None  # a member joined or left


class PortHold:
    """A seed's listening address, bound before its model loads (a large model takes minutes to load and
    hash) so that a port another process holds, or a bind address no peer can reach, fails at once.

    It holds the address with a plain transport.Server in a context of its own (so a refused bind says
    what the seed's would, with its hint) and lets go just before the seed binds
    the same address (`url`: the address as bound, port 0 resolved to the port taken), so the window in
    which another process could take the port is the few microseconds between the two."""

    def __init__(self, url: str, advertise: str | None = None) -> None:
        from .transport import Server

        self._ctx: Any = new_context()
        self._server: Any = Server(self._ctx, curve_secret=None, name="port-hold")
        try:
            endpoint = self._server.bind(url, advertise)  # Server.bind's checks, errors and hints
            # the address to bind again: as given, with port 0 replaced by the port taken
            self.url = f"{url.rsplit(':', 1)[0]}:{endpoint.rsplit(':', 1)[1]}"
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Close the socket; returns once the port is free (its context has let it go)."""
        if self._ctx is not None:
            self._server.close()
            self._ctx.destroy(linger=0)
            self._ctx = None


async def _tracker_alive(ctx: Any, url: str) -> bool:
    try:
        await TrackerClient(ctx, url, PROBE_TIMEOUT_S)._tracker_record()
    except TrackerUnreachable:
        return False
    return True


def run_seed(
    settings: NodeSettings,
    model: Any,
    *,
    bind: str,
    name: str | None,
    max_concurrency: int,
    events: SeedEvents,
    forwarding: str | None = None,
    kv_cache_mb: int | None = None,
    held: PortHold | None = None,
) -> dict[str, int]:
    """Serve `model` (a loaded LanguageModel) until signalled.

    `forwarding`: the model group's routing policy (forwarding.POLICIES; None: the default, tree+lb);
    `kv_cache_mb`: the prefix KV cache's budget in MiB (None: prefix_cache.DEFAULT_MAX_BYTES; 0: none);
    `held`: `bind` held since before the model loaded (PortHold): the seed binds `held.url` instead,
    released just before."""
    if held is not None:
        bind = held.url
    from .forwarding import DEFAULT_POLICY
    from .runtime.prefix_cache import DEFAULT_MAX_BYTES, PrefixCache
    from .seed import SeedService
    from .tracker import TrackerService

    identity, _ = load_or_create_identity(settings.home)
    if model.prefix_cache is None and kv_cache_mb != 0:
        model.prefix_cache = PrefixCache(DEFAULT_MAX_BYTES if kv_cache_mb is None else kv_cache_mb << 20)

    async def main() -> dict[str, int]:
        local_tracker: TrackerService | None = None
        tracker_lock: HomeLock | str | None = None
        tasks: list[asyncio.Task[None]] = []
        trackers = list(settings.trackers)
        seed = SeedService(identity, model, trackers=trackers, name=name, max_concurrency=max_concurrency,
                           forwarding=forwarding or DEFAULT_POLICY, verifiers=settings.verifiers)
        seed.announcer.on_announce = events.announced
        seed.on_served = events.served
        if seed.group is not None:
            seed.group.on_change = lambda member, joined: events.group_changed(member.peer_id, joined)
        try:
            if not settings.trackers_explicit and not await _tracker_alive(seed.ctx, DEFAULT_TRACKER):
                # this home's tracker.db may belong to a tracker running elsewhere on it: never two writers
                tracker_lock = try_lock_home(settings.home, TRACKER_LOCK, "tracker")
                if isinstance(tracker_lock, str):
                    events.tracker_skipped(DEFAULT_TRACKER, tracker_lock)
                else:
                    local_tracker = TrackerService(identity, settings.home / "tracker.db")
                    # loopback only, found by its bootstrap port: any free CurveZMQ port (no firewall to
                    # admit it, and a busy 7701 must not stop a seed that has no --curve-port)
                    local_tracker.bind(DEFAULT_TRACKER, curve_port=0)
                    tasks.append(asyncio.create_task(local_tracker.serve()))
                    events.tracker_started(local_tracker.url)
            if held is not None:
                held.release()
            seed.bind(bind, settings.advertise)
            tasks.append(asyncio.create_task(seed.serve()))
            await seed.announce()
            events.ready(seed)
            waiting = asyncio.create_task(_until_signalled())
            done, _ = await asyncio.wait({*tasks, waiting}, return_when=asyncio.FIRST_COMPLETED)
            events.stopping()
            for task in tasks:
                task.cancel()
            await seed.stop()
            for task in done:
                if task is not waiting and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]  # a service died: say so, do not exit quietly
            return dict(seed.server.counters)
        finally:
            seed.close()
            if local_tracker is not None:
                local_tracker.close()
            if isinstance(tracker_lock, HomeLock):
                tracker_lock.release()

    try:
        with lock_home(settings.home, NODE_LOCK, "seed"):  # one announcing node per identity
            return asyncio.run(main())
    finally:
        if held is not None:
            held.release()  # a failure before the seed bound must not keep the port


# ---------------------------------------------------------------------- relay


RELAY_REPORT_S = 10.0  # how often a busy relay says what it carried


@dataclass(frozen=True)
class RelayActivity:
    """What a relay carried in one report interval (`gtorrent relay`'s activity line)."""

    opened: int  # circuits created through this relay
    closed: int  # circuits torn down (by either end, a failure or idleness)
    open: int  # circuits open at the end of the interval
    cells: int  # cells forwarded either way
    dropped: int  # messages refused (malformed, replayed, rate-limited, unknown circuit)
    interval_s: float

    @staticmethod
    def between(before: dict[str, int], after: dict[str, int], interval_s: float) -> RelayActivity | None:
        """The activity between two samples of `relay_sample` (None when nothing moved)."""
        opened = after["circuits"] - before["circuits"]
        closed = opened - (after["open"] - before["open"])
        cells, dropped = after["cells"] - before["cells"], after["dropped"] - before["dropped"]
        if not (opened or closed or cells or dropped):
            return None
        return RelayActivity(opened, closed, after["open"], cells, dropped, interval_s)


def relay_sample(relay: Any, server: Any) -> dict[str, int]:
    """A relay's running totals (relay.RelayService and its transport.Server): circuits ever created,
    circuits open now, cells forwarded, messages dropped."""
    return {"circuits": relay.counters["circuits"], "open": len(relay.circuits), "cells": relay.counters["cells"],
            "dropped": relay.counters["dropped"] + server.counters["dropped"]}


@dataclass
class RelayEvents:
    ready: Callable[[Any], None] = lambda relay: None
    announced: Callable[[dict[str, str]], None] = lambda errors: None
    stopping: Callable[[], None] = lambda: None
    activity: Callable[[RelayActivity], None] | None = None  # every report interval in which something moved


def run_relay(
    settings: NodeSettings, *, bind: str, events: RelayEvents, idle_timeout_s: float = 120.0,
    report_s: float = RELAY_REPORT_S,
) -> dict[str, int]:
    """Relay circuits until signalled. Never imports the model runtime."""
    from .relaynode import RelayNode

    identity, _ = load_or_create_identity(settings.home)

    async def main() -> dict[str, int]:
        ctx = new_context()
        node = RelayNode(identity, ctx, settings.trackers, idle_timeout_s=idle_timeout_s)
        node.announcer.on_announce = events.announced
        try:
            node.bind(bind, settings.advertise)
            await node.start()
            events.ready((identity, node.server, node.relay))
            if (on_activity := events.activity) is not None:
                last = relay_sample(node.relay, node.server)

                def tell() -> None:
                    nonlocal last
                    now = relay_sample(node.relay, node.server)
                    if (moved := RelayActivity.between(last, now, report_s)) is not None:
                        on_activity(moved)
                    last = now

                node.tasks.append(asyncio.create_task(_every(report_s, tell)))  # cancelled by stop/close
            await _until_signalled()
            events.stopping()
            await node.stop()
            return {**node.relay.counters, **node.server.counters}
        finally:
            node.close()
            ctx.destroy(linger=0)

    with lock_home(settings.home, NODE_LOCK, "relay"):  # one announcing node per identity
        return asyncio.run(main())


# ---------------------------------------------------------------------- ask and peers


@dataclass(frozen=True)
class PrivacyOptions:
    direct: bool = False  # straight to the seed: faster, but the seed sees who asks
    paths: int = 4
    hops: int = 3
    strict: bool = False  # refuse rather than degrade when relays are too few
    allow_one_hop: bool = False  # let degradation go below the 2-hop floor (one relay sees asker and seed)
    min_relay_age_s: float = DEFAULT_MIN_RELAY_AGE_S  # relays listed for less are not used (routing.RelayRules)
    distinct_networks: bool = True  # no two relays of a path in one /16 (/32) network


def ask(
    settings: NodeSettings,
    request: AskRequest,
    events: AskEvents | None = None,
    timeouts: AskTimeouts | None = None,
    privacy: PrivacyOptions | None = None,
) -> AskResult:
    from .asker import ask_direct
    from .private import ask_private
    from .store import Store

    privacy = privacy or PrivacyOptions(direct=True)
    store = Store.open(settings.home, None if settings.verifiers is None else set(settings.verifiers))

    async def main() -> AskResult:
        ctx = new_context()
        try:
            if privacy.direct:
                return await ask_direct(ctx, settings.trackers, request, store, events, timeouts)
            return await ask_private(
                ctx, settings.trackers, request, store, events, timeouts,
                paths=privacy.paths, hops=privacy.hops, strict=privacy.strict, allow_one_hop=privacy.allow_one_hop,
                rules=RelayRules(privacy.min_relay_age_s, privacy.distinct_networks),
            )
        finally:
            ctx.destroy(linger=0)

    try:
        return asyncio.run(main())
    finally:
        store.close()


@dataclass(frozen=True)
class PeerRow:
    peer_id: str
    roles: list[str]
    models: list[dict[str, Any]]
    endpoint: str
    online: bool  # listed by a tracker now
    reputation: float | None  # verification reputation R; None: never verified
    state: str  # trusted | untrusted | unverified (reputation.State)
    reliability: float  # EWMA of this peer's ask outcomes (orders eligible seeds, never lifts an untrusted one)
    asks_ok: int
    asks_failed: int
    median_ttft_s: float | None
    median_tokens_per_s: float | None
    queue: float | None
    last_seen: float | None
    last_epoch: int | None = None  # the latest epoch with verdicts from trusted verifiers
    last_consensus: float | None = None  # its consensus C (median of the verifiers' C)
    verifiers: int = 0  # trusted verifiers with a verdict for that epoch
    verifiers_agreed: int = 0  # of them, on the consensus's side of tau
    verdicts: list[dict[str, Any]] = field(default_factory=list)  # that epoch's signed verdicts, wire form
    # share of prompt tokens the seed served from its prefix cache lately (its record's load "cache_hit",
    # the seed's word); None: not listed now, or no valid value (a number in 0..1)
    cache_hit: float | None = None
    # when the peer signed its latest record known here (`announced_at`); None: its seq is no timestamp
    announced: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__}


def announced_at(record: PeerRecord, now: float) -> float | None:
    """When `record` was announced, read from its `seq` (gtorrent signs milliseconds since the epoch,
    docs/PROTOCOL.md), or None when that reading is implausible: before the record's expiry minus the
    longest TTL a tracker accepts, or ahead of `now` by more than a clock's skew. The peer's own word,
    for display only (a peer can claim an older time, never a newer one than `now`)."""
    issued = record.seq / 1000.0
    if not record.expires - MAX_RECORD_TTL_S - ANNOUNCE_SKEW_S <= issued <= now + ANNOUNCE_SKEW_S:
        return None
    return min(issued, now)


async def peer_rows(ctx: Any, trackers: list[str], store: Store, model: str | None = None) -> tuple[list[PeerRow], dict[str, str]]:
    """Trackers' view merged with the local store, after keeping the verdicts the trackers served
    (asker.ingest_verdicts). Returns (rows, {tracker: error})."""
    from .asker import ingest_verdicts

    found = await discover(ctx, trackers, verdicts=True)
    now = time.time()
    store.saw_peers(found.records.values(), now)
    ingest_verdicts(store, found)
    known = {r.peer_id: r for r in store.known_records()}
    online = found.records
    rows = []
    for peer_id, record in {**known, **online}.items():
        if model is not None and not record.serves(model):
            continue
        standing = store.standing(peer_id)
        last = standing.last_epoch
        verdicts = [] if last is None else [
            v.to_wire() for v in store.verdicts(peer_id, last.epoch) if v.verifier in last.credibilities
        ]
        rows.append(
            PeerRow(
                peer_id=peer_id,
                roles=list(record.roles),
                models=[m.to_wire() for m in record.models],
                endpoint=record.endpoint,
                online=peer_id in online,
                reputation=round(standing.reputation, 4) if standing.verified else None,
                state=standing.state,
                reliability=round(standing.reliability, 4),
                asks_ok=standing.asks_ok,
                asks_failed=standing.asks_failed,
                median_ttft_s=standing.median_ttft_s,
                median_tokens_per_s=standing.median_tokens_per_s,
                queue=record.load.get("queue") if peer_id in online else None,
                last_seen=store.last_seen(peer_id),
                last_epoch=None if last is None else last.epoch,
                last_consensus=None if last is None else last.consensus,
                verifiers=0 if last is None else last.verifiers,
                verifiers_agreed=0 if last is None else last.agreed,
                verdicts=verdicts,
                cache_hit=hit if peer_id in online and 0.0 <= (hit := record.load.get("cache_hit", -1.0)) <= 1.0 else None,
                announced=announced_at(record, now),
            )
        )
    # online first, then trusted, unverified, untrusted, each by reputation
    order = {"trusted": 0, "unverified": 1, "untrusted": 2}
    rows.sort(key=lambda r: (not r.online, order.get(r.state, 3), -(r.reputation or 0.0), r.peer_id))
    return rows, found.failed


def list_peers(settings: NodeSettings, model: str | None = None) -> tuple[list[PeerRow], dict[str, str]]:
    from .store import Store

    store = Store.open(settings.home, None if settings.verifiers is None else set(settings.verifiers))

    async def query() -> tuple[list[PeerRow], dict[str, str]]:
        ctx = new_context()
        try:
            return await peer_rows(ctx, settings.trackers, store, model)
        finally:
            ctx.destroy(linger=0)

    try:
        return asyncio.run(query())
    finally:
        store.close()


@dataclass(frozen=True)
class TrustSet:
    """Whose verdicts count, and why (the same rule for the peers list, a peer's history and asks):
    the verifiers the user named (--verifier / GTORRENT_VERIFIERS), else those more than half of the
    reached trackers admit (discovery.admitted_by_majority, `Discovery.admitted`: never a union, so one
    lying tracker's Sybil verifiers do not count), else any verifier when more than half of the reached
    trackers admit any (a tracker with no --verifier names none of its own); when no tracker answered,
    none. With one tracker, its list (or any verifier) as it is."""

    verifiers: frozenset[str] | None  # None: any verifier
    source: str  # "config" | "trackers" | "any" | "none"
    detail: str = ""  # for "none": why no tracker could say

    @classmethod
    def of(cls, configured: frozenset[str] | None, admitted: frozenset[str] | None, reached: bool,
           detail: str = "") -> TrustSet:
        if configured is not None:
            return cls(frozenset(configured), "config")
        if not reached:
            return cls(frozenset(), "none", detail)
        return cls(None, "any") if admitted is None else cls(frozenset(admitted), "trackers")

    def describe(self) -> str:
        if self.source == "config":
            return f"verdicts of the {len(self.verifiers or ())} verifier(s) named by --verifier / GTORRENT_VERIFIERS count"
        if self.source == "trackers" and not self.verifiers:
            return "no verdict counts: no verifier is admitted by more than half of the trackers that answered"
        if self.source == "trackers":
            return (f"verdicts of the {len(self.verifiers or ())} verifier(s) the trackers admit count "
                    "(each admitted by more than half of the trackers that answered)")
        if self.source == "any":
            return "verdicts of any verifier count (the trackers admit any)"
        return f"no verdict counts: no tracker answered ({self.detail}), so none says which verifiers to trust"

    def as_json(self) -> dict[str, Any]:
        return {"source": self.source, "verifiers": None if self.verifiers is None else sorted(self.verifiers),
                "detail": self.detail or None}


@dataclass(frozen=True)
class PeerHistory:
    """One peer's verdict history from the local store (`gtorrent peers PEER_ID`)."""

    peer_id: str
    state: str  # trusted | untrusted | unverified
    reputation: float | None  # R after the last epoch; None: never verified
    epochs: list[EpochConsensus]  # oldest first: C per verifier, consensus, R after
    verdicts: list[Verdict]  # every verdict held, trusted verifiers' or not, with signatures
    untrusted_verifiers: list[str]  # verifiers whose verdicts are held but do not count
    trust: TrustSet = field(default_factory=lambda: TrustSet(None, "any"))  # whose verdicts counted, and why

    def as_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "state": self.state,
            "reputation": self.reputation,
            "epochs": [
                {"epoch": e.epoch, "model_id": e.model_id, "credibilities": e.credibilities, "consensus": e.consensus,
                 "agreed": e.agreed, "verifiers": e.verifiers, "reputation": e.reputation,
                 "model_reputation": e.model_reputation}
                for e in self.epochs
            ],
            "verdicts": [v.to_wire() for v in self.verdicts],
            "untrusted_verifiers": self.untrusted_verifiers,
            "trust": self.trust.as_json(),
        }


def peer_history(settings: NodeSettings, peer: str, trusted_verifiers: set[str] | None = None) -> PeerHistory:
    """The verdict history of the peer whose id is or starts with `peer` (the table's short id will do),
    from the local store, counting the verdicts of the same verifiers as the peers list (`TrustSet`):
    `trusted_verifiers` (else `settings.verifiers`) when given, and then no tracker is asked; else the
    trackers are asked which verifiers they admit (a peer query, whose verdicts on the peer are kept
    too)."""
    from .asker import ingest_verdicts
    from .discovery import TrackerUnreachable
    from .errors import UsageError
    from .reputation import consensus_history, state_of
    from .store import Store

    configured = frozenset(trusted_verifiers) if trusted_verifiers is not None else settings.verifiers
    store = Store.open(settings.home)
    try:
        ids = {r.peer_id for r in store.known_records()} | set(store.verdict_seeds())
        matches = sorted(i for i in ids if i == peer) or sorted(i for i in ids if i.startswith(peer))
        if not matches:
            raise UsageError(f"no peer {peer!r} is known here",
                             hint="list the peers with `gtorrent peers`, then give one's id (or its first characters)")
        if len(matches) > 1:
            raise UsageError(f"{peer!r} starts {len(matches)} peer ids ({', '.join(m[:12] for m in matches[:4])}…)",
                             hint="give more characters of the peer id")
        (peer_id,) = matches
        if configured is not None:
            trust = TrustSet.of(configured, None, True)
        else:

            async def query() -> TrustSet:
                ctx = new_context()
                try:
                    found = await discover(ctx, settings.trackers, peers=[peer_id], verdicts=True)
                except TrackerUnreachable as exc:
                    return TrustSet.of(None, None, False, exc.message)
                finally:
                    ctx.destroy(linger=0)
                ingest_verdicts(store, found)  # as the list view does: the store then trusts the admitted set
                return TrustSet.of(None, found.admitted, True)  # the majority's, as ingest_verdicts trusts

            trust = asyncio.run(query())
        verdicts = store.verdicts(peer_id)
        judges = store.judges({v.model_id for v in verdicts})
    finally:
        store.close()
    counted = None if trust.verifiers is None else set(trust.verifiers)
    epochs = consensus_history(verdicts, counted, judges)
    reputation = epochs[-1].reputation if epochs else None
    untrusted = sorted({v.verifier for v in verdicts if counted is not None and v.verifier not in counted})
    return PeerHistory(peer_id, state_of(reputation), reputation, epochs, verdicts, untrusted, trust)


def guards(settings: NodeSettings, *, reset: bool = False) -> list[Guard]:
    """The asker's guards (guards.py) for the swarm of these trackers, held in this home, in their order
    of preference; with `reset`, forget them (the next private ask draws a new set) and return them."""
    from .guards import swarm_key
    from .store import Store

    swarm = swarm_key(settings.trackers)
    store = Store.open(settings.home)
    try:
        held = store.guards(swarm)
        if reset:
            store.drop_guards(swarm)
        return held
    finally:
        store.close()


# ---------------------------------------------------------------------- verifier

if TYPE_CHECKING:
    from .verifier import VerifierEvents, VerifierSettings


def run_verifier(
    settings: NodeSettings,
    model: Any,
    verifier_settings: VerifierSettings,
    events: VerifierEvents,
    *,
    bind: str = "tcp://127.0.0.1:0",
    max_epochs: int | None = None,
) -> dict[str, int]:
    """Verify the seeds of `model` (a loaded LanguageModel) until signalled or `max_epochs` have run
    (verifier.Verifier with verifier.VerifierSettings and VerifierEvents); returns {epochs, verdicts}."""
    from .store import Store
    from .verifier import Verifier

    identity, _ = load_or_create_identity(settings.home)

    async def main() -> dict[str, int]:
        ctx = new_context()
        store = Store.open(settings.home)
        verifier = Verifier(identity, model, ctx, settings.trackers, store, settings.home, verifier_settings, events)
        stop = asyncio.Event()
        try:
            verifier.bind(bind, settings.advertise)
            running = asyncio.create_task(verifier.run(stop, max_epochs))
            waiting = asyncio.create_task(_until_signalled(stop))
            await asyncio.wait({running, waiting}, return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            waiting.cancel()
            if running.done() and not running.cancelled() and running.exception() is not None:
                raise running.exception()  # type: ignore[misc]
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await verifier.stop()
            epochs = len({result.verdict.epoch for result in verifier.verdicts})
            return {"epochs": epochs, "verdicts": len(verifier.verdicts)}
        finally:
            verifier.close()
            store.close()
            ctx.destroy(linger=0)

    with lock_home(settings.home, NODE_LOCK, "verifier"):  # one announcing node per identity
        return asyncio.run(main())
