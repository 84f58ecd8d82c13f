"""The client side of trackers: announce a record, query records, merge what several trackers say.

Trackers are untrusted for integrity: every record returned is verified on its own signature, records
from several trackers are merged by peer id (the highest sequence wins), and expired or stopped
records are dropped. A tracker can hide peers; it cannot forge, alter or resurrect them.

Listings: a query carries a fresh random `sample` key that only this client and the trackers know; the
tracker orders the matches by a keyed hash of their peer ids (tracker.sample_order), so no peer can steer
its place, and the client pages through that one order (same key, growing offset) until it has what it
wants. A tracker lying about `next` can waste a bounded number of round trips (`max_pages`), and a slow
one no more than LISTING_DEADLINE_FACTOR request timeouts in all: then the pages so far stand.

Merging listings (`discover(..., want=N)`, `merge_listings`): one key is drawn per ask and every tracker
lists under it, so the asker can put every returned record at its keyed place and knows how far each
tracker's listing reached (its frontier: the place of its last record, or everything when the tracker
said its listing was exhausted). A tracker whose records are not in increasing keyed order is lying and
counts as failed for this ask. Each record is voted on by the trackers whose frontier covers its place:
the age a tracker gave when it returned the record, 0.0 when it covered the place but did not return it.
A record is kept only when more than half of the trackers reached vote on it, with the lower median of
the votes as its age. So every tracker covers the same stretch of one order (none can fill the pool with
its own records by listing more of them), and with three or more trackers one liar can neither age a
Sybil (the honest ones vote 0.0) nor make an honest relay young (the median skips its 0.0); with two,
the smaller age wins (a liar can delay a relay's use, not hasten it); with one, it is believed.

Proof of work (pow.py): a tracker may ask new identities for some (`pow_bits` in its `hello_ok`). The
announcer then solves once for the identity (in a worker thread, in chunks between which it looks at a
cancel flag, so stopping never waits for a solve), keeps the nonce in the home (`pow.json`) so that no
restart redoes it, and attaches it only to the records it sends to trackers that ask for work (a tracker
that asks none may not know the `pow` field). It solves no more than MAX_POW_BITS. Every tracker is
announced to on its own: one that waits for work never delays the others; it is announced to as soon as
the solve is done.

Listing ages (`listed_s`) are what the trackers say (a missing or malformed list counts as 0.0); how the
ages of several trackers are merged is above. Single queries (no `want`: seeds, an endpoint, a few peer
ids) are merged as a union, with the smallest age any tracker that returned a peer gave.

Verdicts (docs/PROTOCOL.md §12): `discover(..., verdicts=True)` asks every tracker for the verdicts it
holds on the peers it lists, and keeps only those that verify on their own signature, are about a
record that tracker returned and whose epoch is neither in the future nor stale (Verdict.time_problem),
one per (verifier, seed, model, epoch) (the first that verifies wins): a tracker can withhold verdicts,
never forge or alter one. Two different verdicts for one such key, from one tracker or two, and the
proofs trackers serve (`equivocations`, each re-checked) make `Discovery.equivocations`; the verdicts of
those verifiers are left out.

Admitted verifiers (`Discovery.admitted`, `admitted_by_majority`): each reached tracker votes with the
verifier list it advertises in `hello_ok`, and a verifier is admitted only when more than half of the
trackers reached name it, the majority rule of the relay listing above. A tracker that advertises no
list admits any verifier: it votes for no verifier by id, and when more than half of the reached
trackers admit any, `admitted` is None (any verifier). So one lying tracker among three or more cannot
make Sybil verifiers of its own count, with two trackers a verifier counts only when both name it (a
liar can keep verdicts from counting, not make a forger's count), and one tracker is believed as it is.
Which verifiers count is the caller's choice (`trusted_verifiers`); this is the default it is offered.

Hostile trackers: every number in a tracker's answer is bounded by its schema (protocol.SCHEMAS), and
anything wrong with one tracker's answer is that tracker's failure (TrackerUnreachable), never an
exception out of `discover` or `Announcer.announce`.

A tracker URL is `tcp://host:port`, optionally `#PEER_ID` to pin the tracker's identity. The client
first asks the plain bootstrap port for the tracker's signed record (`hello`) and then talks CurveZMQ
to the endpoint and key in it (see tracker.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

from .errors import GtorrentError, UsageError
from .paths import home_dir
from .pow import MAX_POW_BITS, NONCE_BYTES, POW_LABEL, PowCache, PowTooHard, work
from .protocol import (
    MAX_ADMITTED_VERIFIERS,
    MAX_RECORD_BYTES,
    PEER_ID_RE,
    Equivocation,
    Message,
    PeerRecord,
    ProtocolError,
    Verdict,
    VerdictKey,
)
from .tracker import (
    MAX_QUERY_LIMIT,
    MAX_QUERY_OFFSET,
    MAX_QUERY_PEERS,
    QUERY_BUDGET_BYTES,
    SAMPLE_KEY_BYTES,
    sample_order,
)
from .transport import Connection, Context, TransportError, check_endpoint

log = logging.getLogger(__name__)

DEFAULT_TRACKER = "tcp://127.0.0.1:7700"
TRACKERS_ENV = "GTORRENT_TRACKERS"
VERIFIERS_ENV = "GTORRENT_VERIFIERS"
TRACKER_TIMEOUT_S = 3.0
LISTING_DEADLINE_FACTOR = 2.0  # a whole listing (every page) gets this many request timeouts, no more
MAX_LISTED_S = 1e10  # the largest listing age a tracker may claim (the `peers` schema's bound)
POW_WAIT_S = 0.5  # how long an announce waits for a proof of work before leaving the solve to the background
POW_CHUNK = 1 << 14  # proof-of-work tries between two looks at the cancel flag (a few ms)
TRACKER_HINT = "start one with `gtorrent tracker`, or pass --tracker URL / set GTORRENT_TRACKERS"


class TrackerUnreachable(GtorrentError):
    default_hint = TRACKER_HINT


class PowPending(GtorrentError):
    """A tracker asks for proof of work that is still being solved (it is announced to once solved)."""

    default_hint = "the announcer solves in the background and announces to this tracker once done"


class TrackerRejected(GtorrentError):
    """A tracker refused an announce (the code says why: replay, expired, invalid, ttl) or a verdict."""

    def __init__(self, url: str, code: str, message: str, what: str = "announce") -> None:
        super().__init__(f"tracker {url} refused the {what}: {message}")
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


def verifiers_from(flags: list[str] | None) -> frozenset[str] | None:
    """Verifier peer ids from --verifier flags, else GTORRENT_VERIFIERS (comma-separated), else None."""
    ids = [v.strip() for v in (flags or []) if v.strip()]
    if not ids:
        ids = [v.strip() for v in os.environ.get(VERIFIERS_ENV, "").split(",") if v.strip()]
    for peer in ids:
        if not PEER_ID_RE.fullmatch(peer):
            raise UsageError(f"{peer!r} is not a verifier's peer id (26 characters a-z, 2-7)",
                             hint="copy the id `gtorrent verify` prints, or `gtorrent peers` lists")
    if len(set(ids)) > MAX_ADMITTED_VERIFIERS:
        raise UsageError(f"at most {MAX_ADMITTED_VERIFIERS} verifiers may be named")
    return frozenset(ids) if ids else None


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
    if (  # comparisons, not math.isfinite: that overflows on an integer too large for a float
        isinstance(ages, list) and len(ages) == len(records)
        and all(type(age) in (int, float) and 0 <= age <= MAX_LISTED_S for age in ages)
    ):
        return [float(age) for age in ages]
    return [0.0] * len(records)


@dataclass
class Listing:
    """What one tracker listed: verified records by peer id (the highest sequence kept), their ages, the
    peer ids in the order the tracker sent them, and whether it said nothing more matches."""

    records: dict[str, PeerRecord] = field(default_factory=dict)
    listed_s: dict[str, float] = field(default_factory=dict)
    pages: int = 0
    order: list[str] = field(default_factory=list)  # verified peer ids as sent (a repeat is kept)
    exhausted: bool = False  # its last page had no `next`: every match of the listing was sent
    verdicts: list[Verdict] = field(default_factory=list)  # verified, on peers of its pages (when asked)
    equivocations: list[Equivocation] = field(default_factory=list)  # checked proofs it served (when asked)

    def add(self, record: PeerRecord, age: float) -> None:
        known = self.records.get(record.peer_id)
        if known is None or record.seq > known.seq:
            self.records[record.peer_id] = record
        self.listed_s[record.peer_id] = min(age, self.listed_s.get(record.peer_id, age))
        self.order.append(record.peer_id)


def read_verdicts(docs: object, seeds: Mapping[str, Collection[str]], now: float | None = None) -> list[Verdict]:
    """The verdicts of a `peers` answer that verify on their own signature, are about one of `seeds` (the
    peers that answer listed, each with the model ids its record announces) on a model that seed's
    record announces, and are neither from the future nor stale at `now` (default: the current time);
    the rest is dropped, never believed (a lying tracker's forgeries, replays of old verdicts, or
    verdicts on models a seed does not serve, which honest trackers refuse: a seed's R is its worst
    model's, reputation.py)."""
    if not isinstance(docs, list):
        return []
    now = time.time() if now is None else now
    kept = []
    for doc in docs:
        # type checks first: a list where a peer id belongs is unhashable, and must not crash the ask
        if not isinstance(doc, dict) or type(seed := doc.get("seed")) is not str or seed not in seeds:
            continue
        if type(model_id := doc.get("model_id")) is not str or model_id not in seeds[seed]:
            continue
        try:
            verdict = Verdict.from_wire(doc)
        except ProtocolError:
            continue
        if verdict.time_problem(now) is None:
            kept.append(verdict)
    return kept


def read_equivocations(docs: object) -> list[Equivocation]:
    """The proofs of a `peers` answer that check (Equivocation.from_wire); the rest is dropped."""
    if not isinstance(docs, list):
        return []
    kept = []
    for doc in docs:
        try:
            kept.append(Equivocation.from_wire(doc))
        except ProtocolError:
            continue
    return kept


def unique_verdicts(verdicts: list[Verdict]) -> list[Verdict]:
    """One verdict per (verifier, seed, model, epoch): the first (as the store keeps it)."""
    return sift_verdicts(verdicts)[0]


def sift_verdicts(
    verdicts: list[Verdict], proofs: list[Equivocation] | None = None,
) -> tuple[list[Verdict], list[Equivocation]]:
    """(one verdict per key, the first; one proof per equivocating verifier): two different verdicts for
    one key are a proof too, and no verdict of a proven equivocator is kept."""
    first: dict[VerdictKey, Verdict] = {}
    found: dict[str, Equivocation] = {proof.verifier: proof for proof in reversed(proofs or [])}
    for verdict in verdicts:
        held = first.setdefault(verdict.key, verdict)
        proof = Equivocation.of(held, verdict)
        if proof is not None:
            found.setdefault(proof.verifier, proof)
    return [v for v in first.values() if v.verifier not in found], list(found.values())


@dataclass
class TrackerClient:
    ctx: Context
    url: str
    timeout_s: float = TRACKER_TIMEOUT_S
    record: PeerRecord | None = None  # the tracker's own, once known
    pow_bits: int = 0  # the proof of work it asks of new identities, as its last `hello_ok` said
    verifiers: frozenset[str] | None = None  # the verifiers it admits, as its last `hello_ok` said (None: any)

    @property
    def address(self) -> str:
        return self.url.split("#", 1)[0]

    @property
    def pinned(self) -> str | None:
        return self.url.split("#", 1)[1] if "#" in self.url else None

    def _unanswered(self, conn: Connection, exc: TransportError, timeout_s: float) -> TrackerUnreachable:
        """The failure of a request that got no valid answer: say so when answers came that broke the
        protocol (a number out of bounds, an unknown field), which the connection drops."""
        if conn.dropped:
            return TrackerUnreachable(
                f"tracker {self.address} sent {conn.dropped} invalid answer(s) (outside the protocol's bounds) "
                f"and no valid one in {timeout_s:g} s",
                hint="the tracker is broken or hostile; remove it from --tracker / GTORRENT_TRACKERS",
            )
        return TrackerUnreachable(f"cannot reach tracker {self.address} ({exc})")

    async def _tracker_record(self, timeout_s: float | None = None) -> PeerRecord:
        if self.record is not None and self.record.expires > time.time():
            return self.record
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        async with Connection(self.ctx, self.address, server_key=None, name=f"tracker {self.address}") as conn:
            try:
                reply = await conn.request("hello", {}, frozenset({"hello_ok"}), timeout_s)
            except TransportError as exc:
                if conn.dropped:
                    raise self._unanswered(conn, exc, timeout_s) from exc
                raise TrackerUnreachable(f"cannot reach tracker {self.address} (no answer in {timeout_s:g} s)") from exc
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
        admitted = reply.get("verifiers")
        self.verifiers = None if admitted is None else frozenset(admitted)
        return record

    async def _request(
        self, kind: str, body: dict[str, object], expected: frozenset[str], timeout_s: float | None = None,
    ) -> Message:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        tracker = await self._tracker_record(timeout_s)
        name = f"tracker {self.address}"
        async with Connection(self.ctx, tracker.endpoint, server_key=tracker.curve_key, name=name) as conn:
            try:
                return await conn.request(kind, body, expected | {"error"}, timeout_s)
            except TransportError as exc:
                self.record = None  # it may have restarted on another port
                raise self._unanswered(conn, exc, timeout_s) from exc

    async def announce(self, record: PeerRecord) -> Message:
        reply = await self._request("announce", {"record": record.to_wire()}, frozenset({"announce_ok"}))
        if reply.kind == "error":
            raise TrackerRejected(self.address, reply["code"], reply["message"])
        return reply

    async def listing(
        self, model: str | None = None, role: str | None = None, endpoint: str | None = None, *,
        peers: list[str] | None = None, want: int | None = None, sample: bytes | None = None,
        verdicts: bool = False,
    ) -> Listing:
        """Page through one listing (keyed by `sample`, a fresh key when None) until `want` distinct
        records, or the matches run out, or the page bound or the listing's deadline (LISTING_DEADLINE_FACTOR
        request timeouts in all) is reached; without `want`, one page (a uniform sample of up to 200).
        Raises TrackerUnreachable if the first page fails or its answer cannot be read; a later page that
        fails ends the listing with what the earlier pages gave."""
        key = sample if sample is not None else secrets.token_bytes(SAMPLE_KEY_BYTES)
        body: dict[str, object] = {"sample": key.hex()}
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
        if verdicts:
            body["verdicts"] = True
        bound = 1
        if want is not None:
            limit = max(1, min(want, MAX_QUERY_LIMIT))
            body["limit"] = limit
            bound = max_pages(want, limit)
        found = Listing()
        offset = 0
        loop = asyncio.get_running_loop()
        # one deadline for the whole listing: a tracker answering each page just in time, with a `next`
        # that never runs out, holds the asker LISTING_DEADLINE_FACTOR timeouts, not max_pages of them
        deadline = loop.time() + LISTING_DEADLINE_FACTOR * self.timeout_s
        while found.pages < bound:
            remaining = min(self.timeout_s, deadline - loop.time())
            if found.pages and remaining <= 0:
                break
            try:
                reply = await self._request(
                    "query", {**body, "offset": offset}, frozenset({"peers"}), max(remaining, 0.001)
                )
                if reply.kind == "error":
                    raise TrackerUnreachable(f"tracker {self.address} refused the query: {reply['message']}")
                page = self._read_page(reply)
            except GtorrentError:
                if not found.pages:
                    raise
                break  # a later page failed: what the earlier pages gave still stands
            found.pages += 1
            before = len(found.records)
            for record, age in page:
                found.add(record, age)
            if verdicts:
                found.verdicts.extend(read_verdicts(
                    reply.get("verdicts"), {record.peer_id: {m.model_id for m in record.models} for record, _ in page}))
                found.equivocations.extend(read_equivocations(reply.get("equivocations")))
            following = reply.get("next")
            if following is None:
                found.exhausted = True
            if want is None or len(found.records) >= want or following is None:
                break
            # a page that moves backwards or brings nothing new ends the listing (a tracker stalling us)
            if not offset < following <= MAX_QUERY_OFFSET or len(found.records) == before:
                break
            offset = following
        return found

    def _read_page(self, reply: Message) -> list[tuple[PeerRecord, float]]:
        """The verified records of one `peers` answer with their ages; forged records are dropped (not
        believed), and anything else wrong with the answer is this tracker's failure."""
        try:
            page = []
            for doc, age in zip(reply["records"], listing_ages(reply), strict=True):
                try:
                    page.append((PeerRecord.from_wire(doc), age))
                except ProtocolError:
                    continue  # a tracker handing out forged records gets them dropped, not believed
            return page
        except (ValueError, TypeError, KeyError, OverflowError, ArithmeticError) as exc:
            raise TrackerUnreachable(
                f"tracker {self.address} sent an answer that cannot be read ({type(exc).__name__})",
                hint="the tracker is broken or hostile; remove it from --tracker / GTORRENT_TRACKERS",
            ) from exc

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
    # per peer id, its listing age in seconds: the lower median of the covering trackers' votes for a
    # listing made for `want` records (merge_listings), else the smallest any tracker that returned it gave
    listed_s: dict[str, float] = field(default_factory=dict)
    reached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # with `verdicts=True`: the verified verdicts on the records kept, one per (verifier, seed, model,
    # epoch), none of a proven equivocator; and one proof per equivocator, served or found here
    verdicts: list[Verdict] = field(default_factory=list)
    equivocations: list[Equivocation] = field(default_factory=list)
    # the verifiers more than half of the reached trackers admit (admitted_by_majority); None: more than
    # half of them admit any verifier
    admitted: frozenset[str] | None = None

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


def merge_listings(listings: Mapping[str, Listing], sample: bytes, now: float) -> Discovery:
    """Merge listings that several trackers made under one key `sample` (module docstring, "Merging").

    A tracker whose records are not in increasing keyed order goes to `failed`; the others are `reached`.
    Each record is voted on by the reached trackers whose frontier covers its place (its own age where
    the tracker returned it, 0.0 where it covered the place without returning it); it is kept when more
    than half of the reached trackers vote, with the lower median of the votes as its age, and its
    highest sequence among the trackers, unless that is stopped or expired. Pure: no clock, no I/O."""
    found = Discovery()
    frontiers: dict[str, bytes | None] = {}  # None: the whole order (the listing was exhausted)
    places: dict[str, bytes] = {}
    for address, listing in listings.items():
        mine = [places.setdefault(peer, sample_order(peer, sample)) for peer in listing.order]
        if any(later < earlier for earlier, later in pairwise(mine)):  # a repeat is equal: allowed
            found.failed[address] = f"tracker {address} listed records out of the listing's order (lying)"
            continue
        found.reached.append(address)
        frontiers[address] = None if listing.exhausted else (mine[-1] if mine else b"")  # b"": covers nothing
    reached = [listings[address] for address in found.reached]
    for peer, place in places.items():
        votes: list[float] = []
        newest: PeerRecord | None = None
        for address, listing in zip(found.reached, reached, strict=True):
            record = listing.records.get(peer)
            if record is not None:
                votes.append(listing.listed_s.get(peer, 0.0))
                if newest is None or record.seq > newest.seq:
                    newest = record
            elif frontiers[address] is None or place <= (frontiers[address] or b""):
                votes.append(0.0)  # it covered the place and did not list the peer: new to it
        if newest is None or 2 * len(votes) <= len(reached) or newest.stopped or newest.expires <= now:
            continue
        found.records[peer] = newest
        found.listed_s[peer] = sorted(votes)[(len(votes) - 1) // 2]  # the lower median
    return found


def admitted_by_majority(lists: Collection[frozenset[str] | None]) -> frozenset[str] | None:
    """The verifiers admitted by more than half of the trackers whose lists these are, one per tracker
    reached (None: that tracker admits any verifier, and names none); None when more than half of them
    admit any verifier. One tracker's list is returned as it is (module docstring, "Admitted
    verifiers"). Pure."""
    if 2 * sum(1 for admitted in lists if admitted is None) > len(lists):
        return None
    votes: dict[str, int] = {}
    for admitted in lists:
        for verifier in admitted or ():
            votes[verifier] = votes.get(verifier, 0) + 1
    return frozenset(verifier for verifier, count in votes.items() if 2 * count > len(lists))


def tracker_failure(address: str, result: BaseException, what: str) -> str:
    """What one tracker's failed request comes to: its own message, or for anything else that went wrong
    with its answer a line naming the tracker (details in the debug log), so that nothing one tracker
    sends escapes as an exception. Cancellation (Ctrl-C) is re-raised."""
    if isinstance(result, GtorrentError):
        return result.message
    if isinstance(result, Exception):
        log.debug("%s %s failed", what, address, exc_info=result)
        return f"tracker {address} failed ({type(result).__name__})"
    raise result


async def discover(
    ctx: Context, urls: list[str], *, model: str | None = None, role: str | None = None,
    endpoint: str | None = None, peers: list[str] | None = None, want: int | None = None,
    timeout_s: float = TRACKER_TIMEOUT_S, verdicts: bool = False,
) -> Discovery:
    """Query every tracker at once and merge; raise TrackerUnreachable only if none answers.

    With `want`, every tracker pages one listing under one key drawn here to `want` records, and the
    listings are merged by `merge_listings` (majority coverage, lower-median ages); without, each gives
    one page and the answers are merged as a union (`Discovery.merge`). A tracker whose answer cannot be
    read is a failed tracker, never an exception."""
    clients = [TrackerClient(ctx, url, timeout_s) for url in urls]
    sample = secrets.token_bytes(SAMPLE_KEY_BYTES)
    results = await asyncio.gather(
        *(c.listing(model, role, endpoint, peers=peers, want=want, sample=sample, verdicts=verdicts) for c in clients),
        return_exceptions=True,
    )
    listings: dict[str, Listing] = {}
    failed: dict[str, str] = {}
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            failed[client.address] = tracker_failure(client.address, result, "listing from tracker")
        else:
            listings[client.address] = result
    now = time.time()
    if want is not None:
        found = merge_listings(listings, sample, now)
    else:
        found = Discovery()
        for address, listing in listings.items():
            found.reached.append(address)
            found.merge(list(listing.records.values()), now, listing.listed_s)
    found.failed.update(failed)
    if verdicts:
        found.verdicts, found.equivocations = sift_verdicts(
            [verdict for address in found.reached for verdict in listings[address].verdicts
             if verdict.seed in found.records],
            [proof for address in found.reached for proof in listings[address].equivocations],
        )
    # every reached tracker votes, an open one (None) for no verifier by id: never a union, in which one
    # lying tracker's Sybil verifiers would count (admitted_by_majority)
    found.admitted = admitted_by_majority([c.verifiers for c in clients if c.address in found.reached])
    if not found.reached:
        detail = "; ".join(found.failed.values())
        # a hint all failures share (a pin mismatch, a broken tracker) names the fix; "start one" may not
        hints = {result.hint for result in results if isinstance(result, GtorrentError)}
        raise TrackerUnreachable(detail if len(urls) == 1 else f"no tracker answered ({detail})",
                                 hint=hints.pop() if len(hints) == 1 else None)
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


async def submit_verdict(
    ctx: Context, urls: list[str], verdict: Verdict, timeout_s: float = TRACKER_TIMEOUT_S,
) -> dict[str, str]:
    """Hand a signed verdict to every tracker at once; return {url: error} for those that did not take it
    (refused: `invalid`, `stale`, `not_admitted`, `equivocated`, `rate`, `capacity`, `storage`; or
    unreachable). A tracker that held this verdict already counts as having taken it."""
    clients = [TrackerClient(ctx, url, timeout_s) for url in urls]

    async def submit(client: TrackerClient) -> None:
        reply = await client._request("verdict", {"verdict": verdict.to_wire()}, frozenset({"verdict_ok"}))
        if reply.kind == "error":
            raise TrackerRejected(client.address, reply["code"], reply["message"], "verdict")

    results = await asyncio.gather(*(submit(c) for c in clients), return_exceptions=True)
    errors: dict[str, str] = {}
    for client, result in zip(clients, results, strict=True):
        if isinstance(result, BaseException):
            errors[client.url] = tracker_failure(client.address, result, "verdict to")
    return errors


def solve_some(signing_key: bytes, bits: int, start: int, tries: int) -> bytes | None:
    """A nonce among `tries` from `start` with at least `bits` (1..64) of work for the key (pow.work),
    or None: one chunk of pow.solve's search."""
    prefix = hashlib.blake2b(POW_LABEL + signing_key, digest_size=32)  # copied per try: hashed once
    threshold = 1 << (64 - bits)  # the first 8 bytes below this: at least `bits` leading zeros
    for counter in range(start, start + tries):
        nonce = (counter % (1 << 64)).to_bytes(NONCE_BYTES, "big")
        hasher = prefix.copy()
        hasher.update(nonce)
        if int.from_bytes(hasher.digest()[:8], "big") < threshold:
            return nonce
    return None


def solve_until(signing_key: bytes, bits: int, cancel: threading.Event) -> bytes | None:
    """pow.solve in chunks of POW_CHUNK tries, looking at `cancel` between chunks: a nonce with at least
    `bits` of work, or None once `cancel` is set (run in a worker thread: it never blocks a stop)."""
    if bits > MAX_POW_BITS:
        raise PowTooHard(f"{bits} bits of proof of work asked; at most {MAX_POW_BITS} are done")
    if bits <= 0:
        return b""
    counter = secrets.randbits(62)  # a random start: two processes solving for one key do not repeat work
    while not cancel.is_set():
        nonce = solve_some(signing_key, bits, counter, POW_CHUNK)
        if nonce is not None:
            return nonce
        counter += POW_CHUNK
    return None


class Announcer:
    """Keeps one peer's record fresh on every tracker: announce, re-announce, say goodbye.

    Each tracker is announced to on its own. A tracker that asks for proof of work the announcer does not
    hold yet gets it solved in the background (one solve at a time, for the highest bar asked); an
    announce waits at most POW_WAIT_S for it, then reports that tracker as pending (PowPending) and goes
    on, and the tracker is announced to as soon as the solve is done. So a solve of minutes never holds
    back the re-announces to the other trackers, and `stop` cancels it (the worker thread looks at a
    cancel flag every POW_CHUNK tries) instead of waiting for it."""

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
        self.pending: set[str] = set()  # trackers waiting for a solve under way (announced once it is done)
        self._solve: asyncio.Task[bytes | None] | None = None
        self._solve_bits = 0
        self._follow_up: asyncio.Task[None] | None = None
        self._stopping = False

    def _held(self, record: PeerRecord, bits: int) -> bytes | None:
        """A nonce with `bits` of work for the record's identity, held in memory or in pow.json."""
        if work(record.signing_key, self.nonce) >= bits:
            return self.nonce
        cache = PowCache(self.home if self.home is not None else home_dir())
        nonce = cache.get(record.peer_id, record.signing_key, bits)
        if nonce is not None:
            self.nonce = nonce
        return nonce

    def _solving(self, record: PeerRecord, bits: int) -> asyncio.Task[bytes | None]:
        """The solve under way for at least `bits`, or a new one (replacing one for fewer bits)."""
        if self._solve is not None and not self._solve.done() and self._solve_bits >= bits:
            return self._solve
        if self._solve is not None:
            self._solve.cancel()  # a higher bar: its nonce would not do for this tracker
        self._solve_bits = bits
        self._solve = asyncio.create_task(self._solve_in_thread(record, bits))
        self._solve.add_done_callback(self._solve_done)
        return self._solve

    async def _solve_in_thread(self, record: PeerRecord, bits: int) -> bytes | None:
        cancel = threading.Event()
        try:
            nonce = await asyncio.to_thread(solve_until, record.signing_key, bits, cancel)
        finally:
            cancel.set()  # cancelled (stop, or a higher bar): the worker stops within one chunk
        if nonce is None:
            return None
        self.solved += 1
        if work(record.signing_key, nonce) > work(record.signing_key, self.nonce):
            self.nonce = nonce
        try:
            PowCache(self.home if self.home is not None else home_dir()).put(record.peer_id, nonce)
        except GtorrentError as exc:  # kept in memory; the next start solves again
            log.warning("cannot keep the proof of work: %s", exc.message)
        return nonce

    def _solve_done(self, task: asyncio.Task[bytes | None]) -> None:
        if task.cancelled() or self._stopping:
            return
        if task.exception() is not None or task.result() is None:
            log.warning("proof of work failed: %s", task.exception())
            return
        if self.pending and (self._follow_up is None or self._follow_up.done()):
            self._follow_up = asyncio.create_task(self._announce_pending())

    async def _proof(self, record: PeerRecord, bits: int) -> bytes:
        """A nonce with at least `bits` of work for the record's identity: held, cached in the home, or
        solved within POW_WAIT_S; else PowPending (the solve goes on in the background). A `stopped`
        record never starts a solve: where no proof is held the peer was never listed."""
        if bits > MAX_POW_BITS:
            raise PowTooHard(f"{bits} bits of proof of work asked; at most {MAX_POW_BITS} are done")
        held = self._held(record, bits)
        if held is not None:
            return held
        if record.stopped or self._stopping:
            raise PowPending(f"no proof of work of {bits} bits yet: this peer is not listed there")
        task = self._solving(record, bits)
        done, _ = await asyncio.wait({task}, timeout=POW_WAIT_S)
        if task in done and not task.cancelled():
            failure = task.exception()
            if isinstance(failure, GtorrentError):
                raise failure
            nonce = task.result() if failure is None else None
            if nonce is not None and work(record.signing_key, nonce) >= bits:
                return nonce
        raise PowPending(f"solving {bits} bits of proof of work in the background; announced to once done")

    async def _announce_to(self, tracker: TrackerClient, record: PeerRecord) -> Message:
        """Announce to one tracker, with the proof of work it asks for; if it refuses for want of work
        (it raised its bar since its last hello), ask it again and retry once."""
        try:
            reply = await self._announce_once(tracker, record)
        except TrackerRejected as exc:
            if exc.code != "pow":
                raise
            tracker.record = None  # its hello is asked again, with the bar as it is now
            reply = await self._announce_once(tracker, record)
        self.pending.discard(tracker.address)
        return reply

    async def _announce_once(self, tracker: TrackerClient, record: PeerRecord) -> Message:
        await tracker._tracker_record()  # learns the work it asks (cached with its record)
        if tracker.pow_bits:
            try:
                nonce = await self._proof(record, tracker.pow_bits)
            except PowPending as exc:
                if not (record.stopped or self._stopping):
                    self.pending.add(tracker.address)
                raise PowPending(f"tracker {tracker.address}: {exc.message}") from None
            record = replace(record, pow=nonce)
        return await tracker.announce(record)

    async def _announce(self, trackers: list[TrackerClient], record: PeerRecord) -> dict[str, str]:
        """Announce to these trackers at once; {tracker: error} for those that failed. Nothing wrong with
        one tracker's answer escapes: it is that tracker's error."""
        results = await asyncio.gather(*(self._announce_to(t, record) for t in trackers), return_exceptions=True)
        errors: dict[str, str] = {}
        for tracker, result in zip(trackers, results, strict=True):
            if isinstance(result, BaseException):
                errors[tracker.address] = tracker_failure(tracker.address, result, "announce to")
            else:
                # bounded by the `announce_ok` schema; clamped to what this peer keeps to anyway
                self.interval_s = max(1.0, min(float(result["interval_s"]), self.max_interval_s))
        return errors

    async def announce(self, *, stopped: bool = False) -> dict[str, str]:
        """Announce to every tracker at once; return {tracker: error} for those that failed (a tracker
        waiting for a proof of work under way is one: PowPending)."""
        errors = await self._announce(self.trackers, self.make_record(stopped))
        self.errors = errors
        if self.on_announce is not None:
            self.on_announce(errors)
        return errors

    async def _announce_pending(self) -> None:
        """Announce to the trackers that waited for the proof of work just solved."""
        waiting = [t for t in self.trackers if t.address in self.pending]
        errors = await self._announce(waiting, self.make_record(False))
        for tracker in waiting:
            if tracker.address in errors:
                self.errors[tracker.address] = errors[tracker.address]
            else:
                self.errors.pop(tracker.address, None)
        if self.on_announce is not None:
            self.on_announce(dict(self.errors))

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.announce()
            except Exception:  # noqa: BLE001 - keep serving; the next round retries
                log.exception("announce failed")

    async def stop(self) -> dict[str, str]:
        """Cancel any proof of work under way and announce `stopped`; return {tracker: error} for those
        that did not hear it."""
        self._stopping = True
        for task in (self._follow_up, self._solve):
            if task is not None and not task.done():
                task.cancel()
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
