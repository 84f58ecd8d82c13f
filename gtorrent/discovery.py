"""The client side of trackers: announce a record, query records, merge what several trackers say.

Trackers are untrusted for integrity: every record returned is verified on its own signature, records
from several trackers are merged by peer id (the highest sequence wins), and expired or stopped
records are dropped. A tracker can hide peers; it cannot forge, alter or resurrect them.

A tracker URL is `tcp://host:port`, optionally `#PEER_ID` to pin the tracker's identity. The client
first asks the plain bootstrap port for the tracker's signed record (`hello`) and then talks CurveZMQ
to the endpoint and key in it (see tracker.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import GtorrentError
from .protocol import Message, PeerRecord, ProtocolError
from .transport import Connection, Context, TransportError, check_endpoint

log = logging.getLogger(__name__)

DEFAULT_TRACKER = "tcp://127.0.0.1:7700"
TRACKERS_ENV = "GTORRENT_TRACKERS"
TRACKER_TIMEOUT_S = 3.0
TRACKER_HINT = "start one with `gtorrent tracker`, or pass --tracker URL / set GTORRENT_TRACKERS"


class TrackerUnreachable(GtorrentError):
    default_hint = TRACKER_HINT


class TrackerRejected(GtorrentError):
    """A tracker refused an announce (the code says why: replay, expired, invalid, ttl)."""

    def __init__(self, url: str, code: str, message: str) -> None:
        super().__init__(f"tracker {url} refused the announce: {message}")
        self.code = code


def trackers_from(flags: list[str] | None) -> tuple[list[str], bool]:
    """Tracker URLs from --tracker flags, else GTORRENT_TRACKERS, else the default. Returns (urls, explicit)."""
    urls = [u for u in (flags or []) if u]
    if not urls:
        urls = [u.strip() for u in os.environ.get(TRACKERS_ENV, "").split(",") if u.strip()]
    explicit = bool(urls)
    urls = urls or [DEFAULT_TRACKER]
    for url in urls:
        check_endpoint(url.split("#", 1)[0], "tracker address")
    return list(dict.fromkeys(urls)), explicit


@dataclass
class TrackerClient:
    ctx: Context
    url: str
    timeout_s: float = TRACKER_TIMEOUT_S
    record: PeerRecord | None = None  # the tracker's own, once known

    @property
    def address(self) -> str:
        return self.url.split("#", 1)[0]

    @property
    def pinned(self) -> str | None:
        return self.url.split("#", 1)[1] if "#" in self.url else None

    async def _tracker_record(self) -> PeerRecord:
        if self.record is not None and self.record.expires > time.time():
            return self.record
        async with Connection(self.ctx, self.address, server_key=None, name=f"tracker {self.address}") as conn:
            try:
                reply = await conn.request("hello", {}, frozenset({"hello_ok"}), self.timeout_s)
            except TransportError as exc:
                raise TrackerUnreachable(f"cannot reach tracker {self.address} (no answer in {self.timeout_s:g} s)") from exc
        try:
            record = PeerRecord.from_wire(reply["record"])
        except ProtocolError as exc:
            raise TrackerUnreachable(f"tracker {self.address} sent an invalid record ({exc})") from exc
        if "tracker" not in record.roles:
            raise TrackerUnreachable(f"{self.address} is not a tracker")
        if self.pinned is not None and record.peer_id != self.pinned:
            raise TrackerUnreachable(
                f"tracker {self.address} is {record.peer_id}, not the pinned {self.pinned}",
                hint="check the #PEER_ID part of the tracker URL",
            )
        self.record = record
        return record

    async def _request(self, kind: str, body: dict[str, object], expected: frozenset[str]) -> Message:
        tracker = await self._tracker_record()
        name = f"tracker {self.address}"
        async with Connection(self.ctx, tracker.endpoint, server_key=tracker.curve_key, name=name) as conn:
            try:
                return await conn.request(kind, body, expected | {"error"}, self.timeout_s)
            except TransportError as exc:
                self.record = None  # it may have restarted on another port
                raise TrackerUnreachable(f"cannot reach tracker {self.address} ({exc})") from exc

    async def announce(self, record: PeerRecord) -> Message:
        reply = await self._request("announce", {"record": record.to_wire()}, frozenset({"announce_ok"}))
        if reply.kind == "error":
            raise TrackerRejected(self.address, reply["code"], reply["message"])
        return reply

    async def query(self, model: str | None = None, role: str | None = None, endpoint: str | None = None) -> list[PeerRecord]:
        body: dict[str, object] = {}
        if model is not None:
            body["model"] = model
        if role is not None:
            body["role"] = role
        if endpoint is not None:
            body["endpoint"] = endpoint
        reply = await self._request("query", body, frozenset({"peers"}))
        if reply.kind == "error":
            raise TrackerUnreachable(f"tracker {self.address} refused the query: {reply['message']}")
        records = []
        for doc in reply["records"]:
            try:
                records.append(PeerRecord.from_wire(doc))
            except ProtocolError:
                continue  # a tracker handing out forged records gets them dropped, not believed
        return records


@dataclass
class Discovery:
    """The answers of several trackers, merged."""

    records: dict[str, PeerRecord] = field(default_factory=dict)
    reached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def merge(self, records: list[PeerRecord], now: float) -> None:
        for record in records:
            if record.stopped or record.expires <= now:
                continue
            known = self.records.get(record.peer_id)
            if known is None or record.seq > known.seq:
                self.records[record.peer_id] = record


async def discover(
    ctx: Context, urls: list[str], *, model: str | None = None, role: str | None = None,
    endpoint: str | None = None, timeout_s: float = TRACKER_TIMEOUT_S,
) -> Discovery:
    """Query every tracker at once; raise TrackerUnreachable only if none answers."""
    clients = [TrackerClient(ctx, url, timeout_s) for url in urls]
    results = await asyncio.gather(*(c.query(model, role, endpoint) for c in clients), return_exceptions=True)
    found = Discovery()
    now = time.time()
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, GtorrentError):
                raise result
            found.failed[client.address] = result.message
        else:
            found.reached.append(client.address)
            found.merge(result, now)
    if not found.reached:
        detail = "; ".join(found.failed.values())
        raise TrackerUnreachable(detail if len(urls) == 1 else f"no tracker answered ({detail})")
    return found


async def announce_all(ctx: Context, urls: list[str], record: PeerRecord, timeout_s: float = TRACKER_TIMEOUT_S) -> dict[str, str]:
    """Announce to every tracker; return {url: error} for the ones that failed."""
    clients = [TrackerClient(ctx, url, timeout_s) for url in urls]
    results = await asyncio.gather(*(c.announce(record) for c in clients), return_exceptions=True)
    errors = {}
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, GtorrentError):
                raise result
            errors[client.address] = result.message
    return errors


class Announcer:
    """Keeps one peer's record fresh on every tracker: announce, re-announce, say goodbye."""

    def __init__(self, ctx: Context, urls: list[str], make_record: Callable[[bool], PeerRecord],
                 max_interval_s: float = 30.0) -> None:
        self.trackers = [TrackerClient(ctx, url) for url in urls]
        self.make_record = make_record
        self.interval_s = max_interval_s
        self.max_interval_s = max_interval_s
        self.errors: dict[str, str] = {}
        self.on_announce: Callable[[dict[str, str]], None] | None = None

    async def announce(self, *, stopped: bool = False) -> dict[str, str]:
        """Announce to every tracker at once; return {tracker: error} for those that failed."""
        record = self.make_record(stopped)
        results = await asyncio.gather(*(t.announce(record) for t in self.trackers), return_exceptions=True)
        errors: dict[str, str] = {}
        for tracker, result in zip(self.trackers, results, strict=True):
            if isinstance(result, GtorrentError):
                errors[tracker.address] = result.message
            elif isinstance(result, BaseException):
                raise result
            else:
                self.interval_s = max(1.0, min(float(result["interval_s"]), self.max_interval_s))
        self.errors = errors
        if self.on_announce is not None:
            self.on_announce(errors)
        return errors

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.announce()
            except Exception:  # noqa: BLE001 - keep serving; the next round retries
                log.exception("announce failed")

    async def stop(self) -> dict[str, str]:
        """Announce `stopped`; return {tracker: error} for those that did not hear it."""
        try:
            return await asyncio.wait_for(self.announce(stopped=True), timeout=5.0)
        except (TimeoutError, GtorrentError) as exc:
            return {"*": str(exc)}


DIRECTORY_REFRESH_S = 30.0  # a relay's periodic refresh; records live 90 s
DIRECTORY_MISS_INTERVAL_S = 3.0  # unknown EXTEND targets are looked up at most
DIRECTORY_MISS_QUERIES = 16  # ... this many times per interval (one tracker query each, by endpoint)


class PeerDirectory:
    """Verified records of the peers a relay may extend circuits to, fetched from its trackers.

    A relay only opens a link to an endpoint and CurveZMQ key that some live, correctly signed record
    announces, so an EXTEND cannot make it connect anywhere an attacker likes. The directory refreshes
    every `refresh_s`, and on a miss at most every `miss_interval_s` (a flood of EXTENDs to unknown
    endpoints costs one tracker query per interval, not one each). Records can also be added directly
    (tests, and peers that know each other without a tracker). Invariants: only records that passed
    `PeerRecord.from_wire` (or were built locally) are held; expired ones are never returned.
    """

    def __init__(
        self,
        ctx: Context | None = None,
        urls: list[str] | None = None,
        *,
        refresh_s: float = DIRECTORY_REFRESH_S,
        miss_interval_s: float = DIRECTORY_MISS_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = ctx
        self.urls = list(urls or [])
        self.refresh_s = refresh_s
        self.miss_interval_s = miss_interval_s
        self.clock = clock
        self.monotonic = monotonic
        self.records: dict[str, PeerRecord] = {}
        self._index: dict[tuple[str, bytes], PeerRecord] = {}
        self._refreshed_at = -float("inf")
        self._miss_times: deque[float] = deque()  # when the recent miss queries went out
        self._misses: dict[str, asyncio.Task[None]] = {}  # endpoint -> its miss query under way
        self._inflight: asyncio.Task[None] | None = None
        self.refreshes = 0

    def add(self, *records: PeerRecord) -> None:
        """Hold these records (the newest per peer id wins)."""
        for record in records:
            known = self.records.get(record.peer_id)
            if known is None or record.seq > known.seq:
                self.records[record.peer_id] = record
        self._reindex()

    def _reindex(self) -> None:
        now = self.clock()
        self.records = {peer: r for peer, r in self.records.items() if r.expires > now}
        index: dict[tuple[str, bytes], PeerRecord] = {}
        for record in self.records.values():
            key = (record.endpoint, record.curve_key)
            if key not in index or record.expires > index[key].expires:
                index[key] = record
        self._index = index

    def find(self, endpoint: str, curve_key: bytes) -> PeerRecord | None:
        """A live, non-stopped record announcing this endpoint with this CurveZMQ key, if held."""
        record = self._index.get((endpoint, curve_key))
        if record is None or record.stopped or record.expires <= self.clock():
            return None
        return record

    async def lookup(self, endpoint: str, curve_key: bytes) -> PeerRecord | None:
        """`find`, asking the trackers on a miss (rate-limited).

        A miss first refreshes the whole directory, at most once per miss interval and shared by every
        miss meanwhile (in a swarm that just started, every relay misses the others at once). If the
        target is still unknown, a query that names its endpoint finds it however large the swarm (a
        general query returns at most a few hundred records); at most DIRECTORY_MISS_QUERIES of those
        go out per miss interval, and concurrent misses of one endpoint share one, so a flood of
        EXTENDs to unknown endpoints costs a few tracker queries, not one each."""
        found = self.find(endpoint, curve_key)
        if found is not None or not self.urls or self.ctx is None:
            return found
        if self.monotonic() - self._refreshed_at >= self.miss_interval_s or (
            self._inflight is not None and not self._inflight.done()
        ):
            await self.refresh()
            found = self.find(endpoint, curve_key)
            if found is not None:
                return found
        task = self._misses.get(endpoint)
        if task is None or task.done():
            now = self.monotonic()
            while self._miss_times and now - self._miss_times[0] >= self.miss_interval_s:
                self._miss_times.popleft()
            if len(self._miss_times) >= DIRECTORY_MISS_QUERIES:
                return None
            self._miss_times.append(now)
            task = self._misses[endpoint] = asyncio.create_task(self._fetch(endpoint))
            task.add_done_callback(lambda _: self._misses.pop(endpoint, None))
        await asyncio.shield(task)
        return self.find(endpoint, curve_key)

    async def refresh(self) -> None:
        """Fetch the trackers' records now (joins a refresh already under way)."""
        if not self.urls or self.ctx is None:
            return
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._refresh())
        await asyncio.shield(self._inflight)

    async def refresh_if_due(self) -> None:
        if self.monotonic() - self._refreshed_at >= self.refresh_s:
            await self.refresh()

    async def _refresh(self) -> None:
        self._refreshed_at = self.monotonic()
        await self._fetch(None)

    async def _fetch(self, endpoint: str | None) -> None:
        """Query the trackers (for one endpoint, or for every relay) and hold what verifies."""
        assert self.ctx is not None
        self.refreshes += 1
        try:
            found = await discover(self.ctx, self.urls, role="relay", endpoint=endpoint)
        except Exception as exc:  # noqa: BLE001 - keep what is held; the next refresh retries
            log.debug("peer directory refresh failed: %s", exc)
            self._reindex()
            return
        self.add(*found.records.values())
