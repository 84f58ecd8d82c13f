"""The client side of trackers: announce a record, query records, merge what several trackers say.

Trackers are untrusted for integrity: every record returned is verified on its own signature, records
from several trackers are merged by peer id (the highest sequence wins), and expired or stopped
records are dropped. A tracker can hide peers; it cannot forge, alter or resurrect them.

Listings: a query carries a fresh random `sample` key that only this client and the tracker know; the
tracker orders the matches by a keyed hash of their peer ids, so no peer can steer its place, and the
client pages through that one order (same key, growing offset) until it has what it wants. A tracker
lying about `next` can waste a bounded number of round trips, no more (`max_pages`).

Proof of work (pow.py): a tracker may ask new identities for some (`pow_bits` in its `hello_ok`). The
announcer then solves once for the identity (in a thread), keeps the nonce in the home (`pow.json`) so
that no restart redoes it, and attaches it only to the records it sends to trackers that ask for work
(a tracker that asks none may not know the `pow` field). It solves no more than MAX_POW_BITS.

Listing ages (`listed_s`) are what the trackers say; the merged age of a peer is the smallest any
tracker that returned it gave (a missing or malformed list counts as 0.0), so a lying tracker can make
a relay look younger, and older only where it alone lists it.

A tracker URL is `tcp://host:port`, optionally `#PEER_ID` to pin the tracker's identity. The client
first asks the plain bootstrap port for the tracker's signed record (`hello`) and then talks CurveZMQ
to the endpoint and key in it (see tracker.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import GtorrentError
from .paths import home_dir
from .pow import PowCache, solve, work
from .protocol import MAX_RECORD_BYTES, Message, PeerRecord, ProtocolError
from .tracker import MAX_QUERY_LIMIT, MAX_QUERY_OFFSET, MAX_QUERY_PEERS, QUERY_BUDGET_BYTES, SAMPLE_KEY_BYTES
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


def max_pages(want: int, limit: int) -> int:
    """How many pages a listing for `want` records may take: as many as the smallest honest pages need
    (`limit` records, or fewer when the byte budget cuts a page of the largest records), plus two."""
    smallest_page = max(1, min(limit, QUERY_BUDGET_BYTES // (MAX_RECORD_BYTES + 1)))
    return math.ceil(want / smallest_page) + 2


def listing_ages(reply: Message) -> list[float]:
    """The `listed_s` of a `peers` answer, one per record; all 0.0 unless the list is well-formed.

    A malformed list is not partly believed: ages only ever let a relay be used sooner, so a doubtful
    answer must not make any relay older than 0."""
    records, ages = reply["records"], reply.get("listed_s")
    if (
        isinstance(ages, list) and len(ages) == len(records)
        and all(type(age) in (int, float) and math.isfinite(age) and age >= 0 for age in ages)
    ):
        return [float(age) for age in ages]
    return [0.0] * len(records)


@dataclass
class Listing:
    """What one tracker listed: verified records by peer id (the highest sequence kept) and their ages."""

    records: dict[str, PeerRecord] = field(default_factory=dict)
    listed_s: dict[str, float] = field(default_factory=dict)
    pages: int = 0

    def add(self, record: PeerRecord, age: float) -> None:
        known = self.records.get(record.peer_id)
        if known is None or record.seq > known.seq:
            self.records[record.peer_id] = record
        self.listed_s[record.peer_id] = min(age, self.listed_s.get(record.peer_id, age))


@dataclass
class TrackerClient:
    ctx: Context
    url: str
    timeout_s: float = TRACKER_TIMEOUT_S
    record: PeerRecord | None = None  # the tracker's own, once known
    pow_bits: int = 0  # the proof of work it asks of new identities, as its last `hello_ok` said

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
        self.pow_bits = int(reply.get("pow_bits", 0))
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

    async def listing(
        self, model: str | None = None, role: str | None = None, endpoint: str | None = None, *,
        peers: list[str] | None = None, want: int | None = None,
    ) -> Listing:
        """Page through one listing (one fresh sample key) until `want` distinct records, or the matches
        run out, or the page bound is reached; without `want`, one page (a uniform sample of up to 200).
        Raises TrackerUnreachable if the first page fails; a later page that fails ends the listing."""
        body: dict[str, object] = {"sample": secrets.token_bytes(SAMPLE_KEY_BYTES).hex()}
        if model is not None:
            body["model"] = model
        if role is not None:
            body["role"] = role
        if endpoint is not None:
            body["endpoint"] = endpoint
        if peers is not None:
            if len(peers) > MAX_QUERY_PEERS:
                raise ValueError(f"at most {MAX_QUERY_PEERS} peer ids per query")
            body["peers"] = list(peers)
        bound = 1
        if want is not None:
            limit = max(1, min(want, MAX_QUERY_LIMIT))
            body["limit"] = limit
            bound = max_pages(want, limit)
        found = Listing()
        offset = 0
        while found.pages < bound:
            try:
                reply = await self._request("query", {**body, "offset": offset}, frozenset({"peers"}))
                if reply.kind == "error":
                    raise TrackerUnreachable(f"tracker {self.address} refused the query: {reply['message']}")
            except GtorrentError:
                if not found.pages:
                    raise
                break  # a later page failed: what the earlier pages gave still stands
            found.pages += 1
            before = len(found.records)
            for doc, age in zip(reply["records"], listing_ages(reply), strict=True):
                try:
                    found.add(PeerRecord.from_wire(doc), age)
                except ProtocolError:
                    continue  # a tracker handing out forged records gets them dropped, not believed
            following = reply.get("next")
            if want is None or len(found.records) >= want or following is None:
                break
            # a page that moves backwards or brings nothing new ends the listing (a tracker stalling us)
            if not offset < following <= MAX_QUERY_OFFSET or len(found.records) == before:
                break
            offset = following
        return found

    async def query(
        self, model: str | None = None, role: str | None = None, endpoint: str | None = None, *,
        peers: list[str] | None = None, want: int | None = None,
    ) -> list[PeerRecord]:
        """The verified records of one listing (see `listing`)."""
        return list((await self.listing(model, role, endpoint, peers=peers, want=want)).records.values())


@dataclass
class Discovery:
    """The answers of several trackers, merged."""

    records: dict[str, PeerRecord] = field(default_factory=dict)
    # per peer id, the smallest listing age any tracker that returned it gave (seconds)
    listed_s: dict[str, float] = field(default_factory=dict)
    reached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def merge(self, records: list[PeerRecord], now: float, listed_s: dict[str, float] | None = None) -> None:
        """Add one tracker's records; a record it sent without an age counts as listed for 0 s."""
        ages = listed_s or {}
        for record in records:
            if record.stopped or record.expires <= now:
                continue
            known = self.records.get(record.peer_id)
            if known is None or record.seq > known.seq:
                self.records[record.peer_id] = record
            age = ages.get(record.peer_id, 0.0)
            self.listed_s[record.peer_id] = min(age, self.listed_s.get(record.peer_id, age))


async def discover(
    ctx: Context, urls: list[str], *, model: str | None = None, role: str | None = None,
    endpoint: str | None = None, peers: list[str] | None = None, want: int | None = None,
    timeout_s: float = TRACKER_TIMEOUT_S,
) -> Discovery:
    """Query every tracker at once (each paged to `want` records, see TrackerClient.listing) and merge;
    raise TrackerUnreachable only if none answers."""
    clients = [TrackerClient(ctx, url, timeout_s) for url in urls]
    results = await asyncio.gather(
        *(c.listing(model, role, endpoint, peers=peers, want=want) for c in clients), return_exceptions=True
    )
    found = Discovery()
    now = time.time()
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, GtorrentError):
                raise result
            found.failed[client.address] = result.message
        else:
            found.reached.append(client.address)
            found.merge(list(result.records.values()), now, result.listed_s)
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
                 max_interval_s: float = 30.0, *, home: Path | None = None) -> None:
        self.trackers = [TrackerClient(ctx, url) for url in urls]
        self.make_record = make_record
        self.interval_s = max_interval_s
        self.max_interval_s = max_interval_s
        self.errors: dict[str, str] = {}
        self.on_announce: Callable[[dict[str, str]], None] | None = None
        self.home = home  # where pow.json lives; None: the home directory (GTORRENT_HOME), when first needed
        self.nonce = b""  # the proof of work attached for trackers that ask for some
        self.solved = 0  # proofs computed here (not taken from pow.json)
        self._solving = asyncio.Lock()

    async def _proof(self, record: PeerRecord, bits: int) -> bytes:
        """A nonce with at least `bits` of work for the record's identity: held, cached in the home, or solved
        (one solve at a time, shared by the trackers waiting for it)."""
        async with self._solving:
            if work(record.signing_key, self.nonce) >= bits:
                return self.nonce
            cache = PowCache(self.home if self.home is not None else home_dir())
            nonce = cache.get(record.peer_id, record.signing_key, bits)
            if nonce is None:
                nonce = await asyncio.to_thread(solve, record.signing_key, bits)  # ~2^bits hashes, off the loop
                self.solved += 1
                try:
                    cache.put(record.peer_id, nonce)
                except GtorrentError as exc:  # kept in memory; the next start solves again
                    log.warning("cannot keep the proof of work: %s", exc.message)
            self.nonce = nonce
            return nonce

    async def _announce_to(self, tracker: TrackerClient, record: PeerRecord) -> Message:
        """Announce to one tracker, with the proof of work it asks for; if it refuses for want of work
        (it raised its bar since its last hello), ask it again and retry once."""
        try:
            return await self._announce_once(tracker, record)
        except TrackerRejected as exc:
            if exc.code != "pow":
                raise
        tracker.record = None  # its hello is asked again, with the bar as it is now
        return await self._announce_once(tracker, record)

    async def _announce_once(self, tracker: TrackerClient, record: PeerRecord) -> Message:
        await tracker._tracker_record()  # learns the work it asks (cached with its record)
        if tracker.pow_bits:
            record = replace(record, pow=await self._proof(record, tracker.pow_bits))
        return await tracker.announce(record)

    async def announce(self, *, stopped: bool = False) -> dict[str, str]:
        """Announce to every tracker at once; return {tracker: error} for those that failed."""
        record = self.make_record(stopped)
        results = await asyncio.gather(*(self._announce_to(t, record) for t in self.trackers), return_exceptions=True)
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
