"""The tracker: keeps the signed records peers announce and answers queries by model and role.

Rules (`TrackerTable`, pure over an injected clock):
- a record is accepted only with a valid signature (checked in `PeerRecord.from_wire`), an expiry in
  the future and no further than MAX_RECORD_TTL_S ahead, and a sequence number above any seen before
  for that peer — so a replayed or rolled-back announce is refused, also after the peer stopped
  (its tombstone keeps the sequence until the record would have expired);
- `stopped` removes the peer; expired records are forgotten;
- each live entry remembers `listed_since` (tracker clock): when its current continuous listing began.
  A refresh of a live record keeps it, unless it announces another endpoint or CurveZMQ key (the onion
  key may rotate); a peer that was new, expired, had stopped, or moved starts again at now;
- answers are unsteerable: `query` is a fresh uniform sample, and `page` orders the matching records by
  blake2b(peer id, key=sample), where `sample` is a key the client chooses per listing and no peer
  knows; so neither a ground peer id nor a claimed load buys a place, and pages of one listing (one
  key) never repeat a record and together hold every match exactly once (while the table is unchanged);
- the table holds at most `max_entries` peers (records and tombstones): a new peer beyond that is
  refused with `capacity`, while known peers can always refresh or withdraw;
- with `pow_bits` > 0, a new peer (no unexpired entry) must carry that much proof of work (pow.py), else
  `pow`; a known peer must keep the work its entry holds, up to `pow_bits` (raising the bar, or turning
  it on, does not drop the peers already listed); each entry remembers the work it was accepted with;
- the table is persisted in SQLite (group commit: all announces that arrive together are written in one
  transaction before any of them is acknowledged), so a restart loses nothing acknowledged;
- memory and disk agree on announces: a burst is applied in `TrackerTable.staged()`, and if its commit
  fails (a full disk) every change of the burst is undone (entries, tombstones, the live count, dirty
  marks) and each announce is refused with `storage`, so nothing unacknowledged is ever served;
- a failed flush keeps the dirty marks for the next try, and never stops the tracker: it logs, refuses
  announces with `storage` and keeps answering queries from memory;
- verdicts (`VerdictTable`, docs/PROTOCOL.md §12): accepted only verified, from an admitted verifier
  (`--verifier`; none named: any) that never equivocated, about an epoch neither in the future nor
  stale, on a model that a peer listed here announces; one per (verifier, seed, model, epoch), the first
  stays, and a different second one is kept with it as a proof of equivocation (the verifier is refused
  from then on, its verdicts dropped); bounded per (verifier, seed, model), per seed, per verifier and in
  all, rate-limited per verifier and in all; saved before `verdict_ok`; served with a query that asks
  for them (`verdicts: true`) together with the proofs, within their own byte budget.

Ports: the tracker's protocol runs over CurveZMQ like every link, but a client given only
`tcp://host:port` cannot know the tracker's key yet. So the URL's port is a plain bootstrap socket that
answers `hello` with the tracker's own signed record, whose endpoint is the CurveZMQ port; a URL of the
form `tcp://host:port#PEER_ID` pins the tracker's identity. The CurveZMQ port is the bootstrap port + 1
unless chosen (`--curve-port`; 0: any free port), so a firewall can admit both before the tracker starts.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import heapq
import json
import logging
import random
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .errors import UsageError
from .identity import Identity
from .paths import create_private, ensure_private_dir
from .pow import MAX_POW_BITS, work
from .protocol import (
    MAX_ADMITTED_VERIFIERS,
    MAX_EQUIVOCATIONS_PER_ANSWER,
    MAX_MODELS_PER_RECORD,
    MAX_RECORD_TTL_S,
    MAX_VERDICTS_PER_ANSWER,
    VERDICT_MAX_AGE_S,
    Equivocation,
    Message,
    PeerRecord,
    ProtocolError,
    Verdict,
    VerdictKey,
)
from .transport import Reply, Server, check_endpoint, new_context

log = logging.getLogger(__name__)

REANNOUNCE_INTERVAL_S = 30.0  # what the tracker asks peers to keep to
DEFAULT_QUERY_LIMIT = 200
MAX_QUERY_LIMIT = 1000  # records per page (the `query` schema's bound)
MAX_QUERY_PEERS = 16  # peer ids in one query's `peers` filter
MAX_QUERY_OFFSET = 1 << 20  # a page's start (the `query` schema's bound; the table holds far fewer)
SAMPLE_KEY_BYTES = 16  # the client's per-listing ordering key
TRACKER_RECORD_TTL_S = 600.0
CLOCK_SKEW_S = 60.0  # a record may claim this much more than the TTL, for clocks that run ahead
MAX_ENTRIES = 50_000  # peers held (records + tombstones); each record is at most 4 KiB on the wire
EXPIRE_INTERVAL_S = 5.0  # how often expired entries are swept (and unsaved changes retried)
STORAGE_LOG_INTERVAL_S = 60.0  # at most one log line per this many seconds while the disk stays full


QUERY_BUDGET_BYTES = 192 * 1024  # an answer stays well under the message limit
# verdicts (docs/PROTOCOL.md §12): a query that asks for them gets its records within QUERY_BUDGET_BYTES -
# VERDICT_BUDGET_BYTES and the verdicts within VERDICT_BUDGET_BYTES, so the answer stays as large as before
VERDICT_BUDGET_BYTES = 48 * 1024  # ~100 verdicts, equivocation proofs included
PROOF_BUDGET_BYTES = 16 * 1024  # of which proofs take at most this (~14 proofs); verdicts get the rest
VERDICT_EPOCHS_HELD = 8  # per (verifier, seed, model): the newest epochs held (clients keep the history they saw)
MAX_VERIFIERS_PER_SEED = 16  # verifiers with verdicts held on one seed; a further one waits for a slot
MAX_VERDICTS = 100_000  # verdicts held in all (~0.6 KiB on disk, ~1.3 KiB of memory each)
MAX_VERDICTS_PER_VERIFIER = 20_000  # held of one verifier (2,500 seeds x 8 epochs): 5 identities fill no table
VERDICT_KEEP_S = VERDICT_MAX_AGE_S  # a verdict is forgotten this long after it arrived or its epoch ended
# new verdicts taken, as (per second, burst) token buckets: per verifier, a verifier of 1,000 seeds with
# 60-s epochs sends ~17/s; in all, what bounds the tracker's disk writes (one small transaction each)
VERIFIER_VERDICT_RATE = (20.0, 2000.0)
TOTAL_VERDICT_RATE = (200.0, 10_000.0)
MAX_EQUIVOCATION_PROOFS = 1024  # verifiers proven to equivocate, remembered (~1.1 KiB each); the oldest go
PROOF_KEEP_S = 30 * 86_400.0  # a proof is kept this long (its verifier is refused meanwhile)


def within_budget(records: list[dict[str, Any]], budget: int = QUERY_BUDGET_BYTES) -> list[dict[str, Any]]:
    """The leading records whose encoding fits the budget (the records are in an order no peer can steer:
    any prefix of a sample is a sample too)."""
    kept, used = [], 0
    for record in records:
        size = len(json.dumps(record, separators=(",", ":"))) + 1
        if used + size > budget:
            break
        kept.append(record)
        used += size
    return kept


class Rejected(ProtocolError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def query_sample(message: Message) -> bytes | None:
    """The listing key of a query (`sample`: 32 hex digits), or None when the query has none."""
    text = message.get("sample")
    if text is None:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != SAMPLE_KEY_BYTES:
        raise Rejected("invalid", f"sample must be {2 * SAMPLE_KEY_BYTES} hex digits")
    return key


def query_peers(message: Message) -> list[str] | None:
    """The peer ids a query is limited to (`peers`), or None when it names none."""
    peers = message.get("peers")
    if peers is None:
        return None
    if any(type(peer) is not str or not 0 < len(peer) <= 64 for peer in peers):
        raise Rejected("invalid", "peers must be peer ids")
    return list(peers)


def disk_full(exc: BaseException) -> bool:
    """True when a storage error means the disk (or the database's size limit) is full."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def storage_problem(exc: BaseException) -> str:
    """What went wrong with the tracker's database, in words fit for a log line and a peer."""
    if disk_full(exc):
        return "the tracker's disk is full"
    return f"the tracker's database failed ({type(exc).__name__}: {str(exc)[:200]})"


def sample_order(peer_id: str, sample: bytes) -> bytes:
    """A record's place in a listing keyed by `sample`: unpredictable without the key, so no peer id can
    be ground to come first, and fixed for one key, so the pages of one listing are disjoint."""
    return hashlib.blake2b(peer_id.encode(), key=sample, digest_size=16).digest()


@dataclass(frozen=True)
class Page:
    """One page of a listing: the records from `offset` on in the listing's order (within the byte budget),
    how long each has been continuously listed (tracker clock, seconds), how many records match in all,
    and the offset of the next page (None: the listing is exhausted)."""

    records: list[PeerRecord]
    listed_s: list[float]
    total: int
    next: int | None


@dataclass
class _Entry:
    record: PeerRecord | None  # None: a tombstone of a peer that stopped
    seq: int
    expires: float
    listed_since: float = 0.0  # tracker clock: when the current continuous listing began (records only)
    work: int = 0  # proof-of-work bits of the record it was accepted with (pow.py)


@dataclass
class _Undo:
    saved: dict[str, _Entry | None]  # each changed peer's entry as it was before its first change
    dirty: set[str]  # the dirty marks as they were


class TrackerTable:
    """Records by peer id, with the acceptance rules above. Persistence is the caller's (see `flush`)."""

    def __init__(
        self, clock: Callable[[], float] = time.time, max_entries: int = MAX_ENTRIES, rng: random.Random | None = None,
        pow_bits: int = 0,
    ) -> None:
        if not 0 <= pow_bits <= MAX_POW_BITS:
            raise ValueError(f"pow_bits must be 0 to {MAX_POW_BITS}")
        self.clock = clock
        self.pow_bits = pow_bits  # proof of work asked of a new identity (0: none)
        # answers are uniform samples: an order by anything a peer chooses (its peer id is a hash of a
        # key it can grind, its load is what it says) would let it crowd everyone else out
        self.rng = rng if rng is not None else secrets.SystemRandom()
        self.max_entries = max_entries
        self.entries: dict[str, _Entry] = {}
        self.live = 0  # entries holding a record (not tombstones); expired ones count until expire()
        self.dirty: set[str] = set()  # peers whose entry changed since the last successful flush
        self._undo: _Undo | None = None

    @contextmanager
    def staged(self) -> Iterator[None]:
        """Undo every change made inside the block (entries, live count, dirty marks) if it raises.

        The tracker accepts a burst of announces and commits it inside one block, so an announce whose
        commit failed is neither served nor remembered as dirty (it was never acknowledged).
        """
        if self._undo is not None:
            raise RuntimeError("TrackerTable.staged() does not nest")
        self._undo = _Undo({}, set(self.dirty))
        try:
            yield
        except BaseException:
            undo, self._undo = self._undo, None
            for peer, entry in undo.saved.items():
                self._set(peer, entry)
            self.dirty = undo.dirty
            raise
        finally:
            self._undo = None

    def accept(self, record: PeerRecord) -> None:
        now = self.clock()
        if record.expires <= now:
            raise Rejected("expired", f"record of {record.peer_id} expired")
        if record.expires > now + MAX_RECORD_TTL_S + CLOCK_SKEW_S:
            raise Rejected("ttl", f"record of {record.peer_id} claims to live too long")
        known = self.entries.get(record.peer_id)
        if known is not None and known.expires > now and record.seq <= known.seq:
            raise Rejected("replay", f"sequence {record.seq} of {record.peer_id} is not above {known.seq}")
        if known is None and len(self.entries) >= self.max_entries:  # known peers may always refresh
            raise Rejected("capacity", f"the tracker holds its maximum of {self.max_entries} peers")
        proven = work(record.signing_key, record.pow)
        current = known is not None and known.expires > now
        # a new identity pays in full; a listed one keeps what it paid (up to today's bar), so raising the
        # bar does not drop it, and it cannot shed its proof either
        required = min(self.pow_bits, known.work) if current and known is not None else self.pow_bits
        if proven < required:
            raise Rejected(
                "pow", f"this tracker asks {required} bits of proof of work of a new identity; the record of "
                f"{record.peer_id} carries {proven}",
            )
        # keep the latest expiry seen, so an older record cannot be replayed once a shorter-lived newer
        # one has expired
        expires = max(record.expires, known.expires) if known is not None else record.expires
        # a listing is continuous only while a live record is refreshed: a new peer, one whose record
        # expired and one that had stopped (a tombstone) all start again now
        listed = known is not None and known.record is not None and known.expires > now
        # ... and so does one that moved (another endpoint) or changed its link key: the age vouches for
        # a relay at an address, not for an identity whatever it points at. The onion key is not
        # compared: it rotates every hour by design.
        if listed and known is not None and known.record is not None and not record.stopped:
            listed = (known.record.endpoint, known.record.curve_key) == (record.endpoint, record.curve_key)
        since = known.listed_since if listed and known is not None else now
        self._set(record.peer_id, _Entry(None if record.stopped else record, record.seq, expires, since, proven))

    def _set(self, peer_id: str, entry: _Entry | None) -> None:
        """Replace or remove an entry, keeping the live-record count in step."""
        if self._undo is not None and peer_id not in self._undo.saved:
            self._undo.saved[peer_id] = self.entries.get(peer_id)
        old = self.entries.pop(peer_id, None)
        if old is not None and old.record is not None:
            self.live -= 1
        if entry is not None:
            self.entries[peer_id] = entry
            if entry.record is not None:
                self.live += 1
        self.dirty.add(peer_id)

    def _matching(
        self, now: float, model: str | None, role: str | None, endpoint: str | None, peers: list[str] | None,
    ) -> list[tuple[PeerRecord, _Entry]]:
        """The live records that pass every filter, with their entries."""
        if peers is not None:  # a handful of exact ids: look them up instead of scanning the table
            candidates = [e for e in (self.entries.get(p) for p in dict.fromkeys(peers)) if e is not None]
        else:
            candidates = list(self.entries.values())
        found = []
        for entry in candidates:
            record = entry.record
            if record is None or entry.expires <= now:
                continue
            if endpoint is not None and record.endpoint != endpoint:
                continue
            if role is not None and role not in record.roles:
                continue
            if model is not None and not record.serves(model):
                continue
            found.append((record, entry))
        return found

    def query(
        self, model: str | None = None, role: str | None = None, limit: int = DEFAULT_QUERY_LIMIT,
        endpoint: str | None = None,
    ) -> list[PeerRecord]:
        found = [record for record, _ in self._matching(self.clock(), model, role, endpoint, None)]
        return self.rng.sample(found, min(limit, len(found)))  # fresh per query, in random order

    def page(
        self, model: str | None = None, role: str | None = None, *, limit: int = DEFAULT_QUERY_LIMIT,
        endpoint: str | None = None, peers: list[str] | None = None, sample: bytes | None = None, offset: int = 0,
        budget: int = QUERY_BUDGET_BYTES,
    ) -> Page:
        """The records at `offset`, `offset + 1`, ... of the listing ordered by blake2b(peer id, key=sample).

        At most `limit` (≤ MAX_QUERY_LIMIT) records, and only as many as fit QUERY_BUDGET_BYTES; `next` is
        the offset of the first matching record left out, None when none is. Without `sample` the key is
        fresh and secret, so the page is a uniform random sample in random order (drawn directly).
        """
        now = self.clock()
        found = self._matching(now, model, role, endpoint, peers)
        limit = max(1, min(limit, MAX_QUERY_LIMIT))
        offset = max(0, offset)
        if sample is None:
            # a fresh secret key nobody learns: any stretch of its order is a uniform sample, which the
            # CSPRNG draws directly (a fifth of the hashing's cost; old clients' queries all come here)
            chosen = self.rng.sample(found, max(0, min(limit, len(found) - offset)))
        else:
            keyed = hashlib.blake2b(key=sample, digest_size=16)  # copied per record: cheaper than a new keyed hash

            def place(item: tuple[PeerRecord, _Entry]) -> bytes:  # == sample_order(peer_id, sample)
                hasher = keyed.copy()
                hasher.update(item[0].peer_id.encode())
                return hasher.digest()

            # the smallest offset + limit places: O(n log(offset + limit)), not a sort of the whole table
            chosen = heapq.nsmallest(offset + limit, found, key=place)[offset:]
        kept = within_budget([record.to_wire() for record, _ in chosen], budget)
        chosen = chosen[: len(kept)]
        end = offset + len(chosen)
        return Page(
            records=[record for record, _ in chosen],
            listed_s=[max(0.0, now - entry.listed_since) for _, entry in chosen],
            total=len(found),
            next=end if end < len(found) else None,
        )

    def listed_since(self, peer_id: str) -> float | None:
        """When the peer's current continuous listing began (tracker clock), or None if it is not listed."""
        entry = self.entries.get(peer_id)
        if entry is None or entry.record is None or entry.expires <= self.clock():
            return None
        return entry.listed_since

    def active_count(self) -> int:
        return self.live

    def expire(self) -> int:
        now = self.clock()
        gone = [peer for peer, entry in self.entries.items() if entry.expires <= now]
        for peer in gone:
            self._set(peer, None)
        return len(gone)


@dataclass(frozen=True)
class _HeldVerdict:
    verdict: Verdict
    size: int  # bytes of its wire form in an answer
    received_at: float  # tracker clock
    expires_at: float  # tracker clock: keep_s after it arrived or after its epoch ended, whichever is first


@dataclass(frozen=True)
class _HeldProof:
    proof: Equivocation
    wire: list[dict[str, Any]]
    size: int
    recorded_at: float  # tracker clock


class _Bucket:
    """A token bucket: `burst` tokens, refilled at `rate_per_s`; each accepted verdict takes one."""

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s, self.burst, self.tokens, self.at = rate_per_s, burst, burst, now

    def level(self, now: float) -> float:
        return min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate_per_s)

    def take(self, now: float) -> bool:
        self.tokens, self.at = self.level(now), max(now, self.at)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


Models = dict[str, dict[int, _HeldVerdict]]  # model id -> epoch -> verdict


class VerdictTable:
    """Signed verdicts by seed, with the admission and bounds of docs/PROTOCOL.md §12 (pure over a clock).

    Invariants: only verdicts that passed `Verdict.from_wire`, came from an admitted verifier (`admitted`
    None: any verifier) that is not a proven equivocator, and whose epoch is neither in the future nor
    older than `keep_s` (Verdict.time_problem) are held; one per (verifier, seed, model, epoch), the first
    (a different second one is an equivocation: its proof is kept, the verifier's verdicts are dropped and
    none is taken again); per (verifier, seed, model) the newest `epochs_held` epochs, per (verifier, seed)
    at most MAX_MODELS_PER_RECORD models; per seed at most `max_verifiers` verifiers; per verifier at most
    `max_per_verifier` and in all at most `max_verdicts`; new verdicts are taken at most at `verifier_rate`
    per verifier and `total_rate` in all (token buckets); each is forgotten `keep_s` after it arrived or
    after its epoch ended, whichever comes first. Proofs: one per verifier, at most `max_proofs` (the
    oldest goes), each kept PROOF_KEEP_S. `dirty` names the verdict keys and `dirty_proofs` the
    verifiers whose rows changed since the last flush."""

    def __init__(
        self, clock: Callable[[], float] = time.time, admitted: frozenset[str] | None = None, *,
        max_verdicts: int = MAX_VERDICTS, max_verifiers: int = MAX_VERIFIERS_PER_SEED,
        epochs_held: int = VERDICT_EPOCHS_HELD, keep_s: float = VERDICT_KEEP_S,
        max_per_verifier: int = MAX_VERDICTS_PER_VERIFIER, max_proofs: int = MAX_EQUIVOCATION_PROOFS,
        verifier_rate: tuple[float, float] = VERIFIER_VERDICT_RATE, total_rate: tuple[float, float] = TOTAL_VERDICT_RATE,
    ) -> None:
        self.clock = clock
        self.admitted = admitted
        self.max_verdicts, self.max_verifiers, self.epochs_held, self.keep_s = max_verdicts, max_verifiers, epochs_held, keep_s
        self.max_per_verifier, self.max_proofs = max_per_verifier, max_proofs
        self.verifier_rate, self.total_rate = verifier_rate, total_rate
        self.by_seed: dict[str, dict[str, Models]] = {}  # seed -> verifier -> model -> epoch -> verdict
        self.count = 0
        self.per_verifier: dict[str, int] = {}
        self.seeds_of: dict[str, set[str]] = {}  # verifier -> the seeds it has verdicts held on
        self.proofs: dict[str, _HeldProof] = {}  # verifier -> the proof that it equivocated (insertion: oldest first)
        self.buckets: dict[str, _Bucket] = {}
        self.total_bucket = _Bucket(*total_rate, clock())
        self.dirty: set[VerdictKey] = set()
        self.dirty_proofs: set[str] = set()

    def check(self, doc: Any) -> Verdict:
        """The verdict in `doc`, verified (one signature), from an admitted verifier that never
        equivocated, about an epoch in the time bounds; else Rejected."""
        try:
            verdict = Verdict.from_wire(doc)
        except ProtocolError as exc:
            raise Rejected("invalid", str(exc)[:500]) from exc
        if self.admitted is not None and verdict.verifier not in self.admitted:
            raise Rejected("not_admitted", f"verifier {verdict.verifier} is not admitted by this tracker")
        if verdict.verifier in self.proofs:
            raise Rejected("equivocated", f"verifier {verdict.verifier} signed two different verdicts for one "
                           "seed, model and epoch; this tracker takes none of its verdicts")
        problem = verdict.time_problem(self.clock(), max_age_s=self.keep_s)
        if problem is not None:
            raise Rejected(*problem)
        return verdict

    def accept(self, verdict: Verdict, received_at: float | None = None, *, rated: bool = True) -> bool:
        """Hold a checked verdict; False when it is held already. Raises Rejected: "equivocated" when a
        different one for its key is held (the proof is recorded first), "rate" when its verifier or all
        verifiers together sent too many lately (not with `rated` False: a restart reloading), "capacity"
        when a bound leaves it no room."""
        now = self.clock() if received_at is None else received_at
        verifiers = self.by_seed.get(verdict.seed, {})
        models = verifiers.get(verdict.verifier, {})
        epochs = models.get(verdict.model_id, {})
        held = epochs.get(verdict.epoch)
        if held is not None:
            proof = Equivocation.of(held.verdict, verdict)
            if proof is None:
                return False
            self.record_proof(proof, now)
            raise Rejected("equivocated", f"verifier {verdict.verifier} signed another verdict for seed "
                           f"{verdict.seed}, model {verdict.model_id[:12]}, epoch {verdict.epoch}: proof kept")
        if not models and len(verifiers) >= self.max_verifiers:
            raise Rejected("capacity", f"this tracker holds verdicts of {self.max_verifiers} verifiers on seed "
                           f"{verdict.seed} already")
        if not epochs and len(models) >= MAX_MODELS_PER_RECORD:
            raise Rejected("capacity", f"this tracker holds verdicts of verifier {verdict.verifier} on "
                           f"{MAX_MODELS_PER_RECORD} models of seed {verdict.seed} already")
        replaces = None
        if len(epochs) >= self.epochs_held:
            replaces = min(epochs)
            if verdict.epoch < replaces:  # older than every epoch held: it would be dropped at once
                raise Rejected("capacity", f"epoch {verdict.epoch} is older than the {self.epochs_held} held")
        elif self.count >= self.max_verdicts:
            raise Rejected("capacity", f"this tracker holds its maximum of {self.max_verdicts} verdicts")
        elif self.per_verifier.get(verdict.verifier, 0) >= self.max_per_verifier:
            raise Rejected("capacity", f"this tracker holds {self.max_per_verifier} verdicts of verifier "
                           f"{verdict.verifier} already")
        if rated:
            self._take_rate(verdict.verifier, now)
        if replaces is not None:
            self._drop(verdict.seed, verdict.verifier, verdict.model_id, replaces)
        size = len(json.dumps(verdict.to_wire(), separators=(",", ":"))) + 1
        expires_at = min(now, verdict.epoch_end_ms / 1000.0) + self.keep_s
        self.by_seed.setdefault(verdict.seed, {}).setdefault(verdict.verifier, {}).setdefault(
            verdict.model_id, {})[verdict.epoch] = _HeldVerdict(verdict, size, now, expires_at)
        self.count += 1
        self.per_verifier[verdict.verifier] = self.per_verifier.get(verdict.verifier, 0) + 1
        self.seeds_of.setdefault(verdict.verifier, set()).add(verdict.seed)
        self.dirty.add(verdict.key)
        return True

    def _take_rate(self, verifier: str, now: float) -> None:
        # a new verifier's bucket is kept only once a verdict of its is taken: fresh identities refused
        # while the shared bucket is empty leave nothing behind
        bucket = self.buckets.get(verifier) or _Bucket(*self.verifier_rate, now)
        # the verifier's own bucket first: one noisy verifier must not drain the shared one
        if bucket.level(now) < 1.0:
            raise Rejected("rate", f"verifier {verifier} sent more than {self.verifier_rate[0]:g} verdicts/s "
                           "lately; try again later")
        if not self.total_bucket.take(now):
            raise Rejected("rate", "this tracker takes no more verdicts for now (too many lately); try again later")
        bucket.take(now)
        self.buckets[verifier] = bucket

    def record_proof(self, proof: Equivocation, now: float | None = None) -> None:
        """Keep the proof that `proof.verifier` equivocated (the first kept stays), drop its verdicts."""
        now = self.clock() if now is None else now
        verifier = proof.verifier
        if verifier not in self.proofs:
            wire = proof.to_wire()
            size = len(json.dumps(wire, separators=(",", ":"))) + 1
            self.proofs[verifier] = _HeldProof(proof, wire, size, now)
            self.dirty_proofs.add(verifier)
            while len(self.proofs) > self.max_proofs:  # the oldest goes (dicts keep insertion order)
                oldest = next(iter(self.proofs))
                del self.proofs[oldest]
                self.dirty_proofs.add(oldest)
        for seed in list(self.seeds_of.get(verifier, ())):
            for model_id, epochs in list(self.by_seed[seed][verifier].items()):
                for epoch in list(epochs):
                    self._drop(seed, verifier, model_id, epoch)

    def _drop(self, seed: str, verifier: str, model_id: str, epoch: int) -> None:
        verifiers = self.by_seed[seed]
        models = verifiers[verifier]
        del models[model_id][epoch]
        if not models[model_id]:
            del models[model_id]
        if not models:
            del verifiers[verifier]
            self.seeds_of[verifier].discard(seed)
            if not self.seeds_of[verifier]:
                del self.seeds_of[verifier]
        if not verifiers:
            del self.by_seed[seed]
        self.count -= 1
        self.per_verifier[verifier] -= 1
        if not self.per_verifier[verifier]:
            del self.per_verifier[verifier]
        self.dirty.add((verifier, seed, model_id, epoch))

    def held(self, verifier: str, seed: str, model_id: str, epoch: int) -> _HeldVerdict | None:
        return self.by_seed.get(seed, {}).get(verifier, {}).get(model_id, {}).get(epoch)

    def for_seeds(self, seeds: list[str], budget: int = VERDICT_BUDGET_BYTES) -> list[dict[str, Any]]:
        """Wire verdicts on these seeds within `budget` bytes: every seed's newest epoch of each verifier
        and model first (seeds in the given order, which no peer steers; verifiers, then models, in id
        order), then the next newest, and so on. Walked rank by rank and stopped once the budget is full,
        so a query costs about what its answer holds, not the table's size: ranking every verdict held on
        a page first took ~0.4 s of the tracker's CPU per query with the table full."""
        order = [seed for seed in dict.fromkeys(seeds) if seed in self.by_seed]
        chosen: list[dict[str, Any]] = []
        used, rank, left = 0, 0, True
        while left:
            left = False
            for seed in order:
                verifiers = self.by_seed[seed]
                for verifier in sorted(verifiers):
                    models = verifiers[verifier]
                    for model_id in sorted(models):
                        epochs = models[model_id]
                        if len(epochs) <= rank:
                            continue
                        left = True
                        held = epochs[sorted(epochs, reverse=True)[rank]]
                        if used + held.size > budget or len(chosen) >= MAX_VERDICTS_PER_ANSWER:
                            return chosen
                        chosen.append(held.verdict.to_wire())
                        used += held.size
            rank += 1
        return chosen

    def proofs_for(self, seeds: list[str], budget: int = PROOF_BUDGET_BYTES) -> list[list[dict[str, Any]]]:
        """Proofs within `budget` bytes, at most MAX_EQUIVOCATIONS_PER_ANSWER: those about these seeds first,
        then the newest (a flood of fresh equivocators can crowd out old proofs here, not on the seeds asked
        about, and clients keep the proofs they saw)."""
        wanted = set(seeds)
        ordered = sorted(self.proofs.values(), key=lambda p: (p.proof.first.seed not in wanted, -p.recorded_at))
        chosen: list[list[dict[str, Any]]] = []
        used = 0
        for held in ordered:
            if used + held.size > budget or len(chosen) >= MAX_EQUIVOCATIONS_PER_ANSWER:
                break
            chosen.append(held.wire)
            used += held.size
        return chosen

    def expire(self) -> int:
        now = self.clock()
        gone = [(seed, verifier, model_id, epoch) for seed, verifiers in self.by_seed.items()
                for verifier, models in verifiers.items() for model_id, epochs in models.items()
                for epoch, held in epochs.items() if held.expires_at <= now]
        for seed, verifier, model_id, epoch in gone:
            self._drop(seed, verifier, model_id, epoch)
        for verifier in [v for v, held in self.proofs.items() if held.recorded_at + PROOF_KEEP_S <= now]:
            del self.proofs[verifier]
            self.dirty_proofs.add(verifier)
        # buckets that have refilled are as good as new: forget them (fresh identities leave none behind)
        for verifier in [v for v, bucket in self.buckets.items() if bucket.level(now) >= bucket.burst]:
            del self.buckets[verifier]
        return len(gone)


tracker_migrations = Migrations("gtorrent-tracker")


@tracker_migrations()
def t001_records(db: Database) -> None:
    db.table("tracker_records").create(
        {"peer_id": str, "seq": int, "expires": float, "record": str}, pk="peer_id"
    )


@tracker_migrations()
def t002_listed_since(db: Database) -> None:
    # rows written before this column existed read as NULL: they are listed from the load on, so a
    # restart can only make a relay younger, never older than it is
    db.table("tracker_records").add_column("listed_since", float)


@tracker_migrations()
def t003_work(db: Database) -> None:
    # older rows read as NULL: their records' work is recomputed on load, tombstones count as 0 bits
    db.table("tracker_records").add_column("work", int)


@tracker_migrations()
def t004_verdicts(db: Database) -> None:
    # verdicts verifiers submitted (VerdictTable), with their signatures, as wire JSON
    db.table("tracker_verdicts").create(
        {"verifier": str, "seed": str, "epoch": int, "verdict": str, "received_at": float},
        pk=("verifier", "seed", "epoch"),
    )


@tracker_migrations()
def t005_verdicts_per_model(db: Database) -> None:
    # verdicts v2 (new signed label: t004's rows can never verify again) kept per (verifier, seed, model,
    # epoch); and the proofs of verifiers that equivocated (VerdictTable.proofs), as wire JSON
    db.table("tracker_verdicts").drop()
    db.table("tracker_verdicts").create(
        {"verifier": str, "seed": str, "model_id": str, "epoch": int, "verdict": str, "received_at": float},
        pk=("verifier", "seed", "model_id", "epoch"),
    )
    db.table("tracker_equivocations").create({"verifier": str, "proof": str, "recorded_at": float}, pk="verifier")


class TrackerDatabase:
    """SQLite persistence of a TrackerTable (WAL, one transaction per flush)."""

    def __init__(self, path: Path) -> None:
        ensure_private_dir(path.parent)
        create_private(path)  # SQLite gives the -wal/-shm files the database file's mode
        self.db = Database(path)
        self.db.enable_wal()
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        tracker_migrations.apply(self.db)

    def load_into(self, table: TrackerTable) -> int:
        loaded, changed = 0, set()
        now = table.clock()
        for row in self.db.table("tracker_records").rows:
            record = None
            if row["record"]:
                try:
                    record = PeerRecord.from_wire(json.loads(row["record"]))
                except (ProtocolError, ValueError):
                    # never serve a record that no longer verifies, but keep its sequence as a
                    # tombstone so that an older record of the peer cannot be replayed in its place
                    changed.add(row["peer_id"])
            since = row["listed_since"]
            # a listing cannot have begun in the future: a clock that jumped back restarts it
            since = now if since is None or since > now else float(since)
            proven = work(record.signing_key, record.pow) if record is not None else int(row["work"] or 0)
            table._set(row["peer_id"], _Entry(record, row["seq"], row["expires"], since, proven))
            loaded += 1
        table.dirty = changed  # what was loaded is on disk already
        table.expire()
        try:
            self.flush(table)
        except (sqlite3.Error, OSError) as exc:  # a full disk must not stop the tracker from starting
            log.error("tracker: cannot save the cleaned-up table (%s); will retry", storage_problem(exc))
        return loaded

    def flush(self, table: TrackerTable) -> None:
        """Write every dirty entry in one transaction. The dirty marks are cleared only once the
        transaction has committed: a failed flush leaves them for the next try."""
        if not table.dirty:
            return
        dirty = set(table.dirty)
        with self.db.atomic():
            gone = [peer for peer in dirty if peer not in table.entries]
            if gone:
                self.db.execute(
                    f"delete from tracker_records where peer_id in ({','.join('?' * len(gone))})", gone
                )
            rows = []
            for peer in dirty:
                entry = table.entries.get(peer)
                if entry is not None:
                    record = json.dumps(entry.record.to_wire()) if entry.record is not None else ""
                    rows.append((peer, entry.seq, entry.expires, record, entry.listed_since, entry.work))
            if rows:  # one prepared statement for the whole batch (upsert_all introspects per call)
                self.db.conn.executemany(
                    "insert or replace into tracker_records (peer_id, seq, expires, record, listed_since, work)"
                    " values (?, ?, ?, ?, ?, ?)", rows
                )
        table.dirty -= dirty  # flush is synchronous: nothing was marked in between

    def load_verdicts(self, verdicts: VerdictTable) -> int:
        """Hold the saved proofs and verdicts again, each re-checked (a damaged row is dropped, never
        served); the tracker's current admission, time bounds and bounds apply (a verifier no longer
        admitted is dropped too)."""
        for verifier, text, recorded_at in self.db.execute(
            "select verifier, proof, recorded_at from tracker_equivocations order by recorded_at"
        ).fetchall():
            try:
                proof = Equivocation.from_wire(json.loads(text))
                if proof.verifier != verifier:
                    raise ProtocolError("row does not match its proof")
                verdicts.record_proof(proof, float(recorded_at))
            except (ProtocolError, ValueError):
                verdicts.dirty_proofs.add(verifier)  # deleted by the flush below
        verdicts.dirty_proofs = {v for v in verdicts.dirty_proofs if v not in verdicts.proofs}
        loaded, rows = 0, self.db.execute(
            "select verifier, seed, model_id, epoch, verdict, received_at from tracker_verdicts order by received_at"
        ).fetchall()
        for verifier, seed, model_id, epoch, text, received_at in rows:
            try:
                verdict = verdicts.check(json.loads(text))
                if verdict.key != (verifier, seed, model_id, epoch):
                    raise Rejected("invalid", "row does not match its verdict")
                verdicts.accept(verdict, float(received_at), rated=False)
                loaded += 1
            except (Rejected, ValueError):
                verdicts.dirty.add((verifier, seed, model_id, epoch))  # deleted by the flush below
        verdicts.dirty = {key for key in verdicts.dirty if verdicts.held(*key) is None}  # the rest is on disk
        verdicts.expire()
        self.flush_verdicts(verdicts)
        return loaded

    def flush_verdicts(self, verdicts: VerdictTable) -> None:
        """Write the changed verdicts and proofs in one transaction; the dirty marks clear only once it
        committed."""
        if not verdicts.dirty and not verdicts.dirty_proofs:
            return
        dirty, dirty_proofs = set(verdicts.dirty), set(verdicts.dirty_proofs)
        with self.db.atomic():
            for verifier in dirty_proofs:
                proof = verdicts.proofs.get(verifier)
                if proof is None:
                    self.db.execute("delete from tracker_equivocations where verifier = ?", (verifier,))
                else:
                    self.db.execute("insert or replace into tracker_equivocations (verifier, proof, recorded_at) "
                                    "values (?, ?, ?)", (verifier, json.dumps(proof.wire), proof.recorded_at))
            for key in dirty:
                held = verdicts.held(*key)
                if held is None:
                    self.db.execute("delete from tracker_verdicts where verifier = ? and seed = ? and model_id = ? "
                                    "and epoch = ?", key)
                else:
                    self.db.execute(
                        "insert or replace into tracker_verdicts (verifier, seed, model_id, epoch, verdict, received_at) "
                        "values (?, ?, ?, ?, ?, ?)", (*key, json.dumps(held.verdict.to_wire()), held.received_at),
                    )
        verdicts.dirty -= dirty
        verdicts.dirty_proofs -= dirty_proofs

    def close(self) -> None:
        self.db.close()


def curve_port_for(bootstrap_port: int, curve_port: int | None) -> int:
    """The port of the tracker's CurveZMQ socket: `curve_port` when given (0: any free port), else the
    bootstrap port + 1 (any free port when the bootstrap port is itself 0: "any")."""
    if curve_port is None:
        if bootstrap_port == 0:
            return 0
        if bootstrap_port == 65535:
            raise UsageError("the tracker's CurveZMQ port defaults to the bootstrap port + 1, and 65535 has none",
                             hint="pass --curve-port PORT, or bind a lower port")
        return bootstrap_port + 1
    if not 0 <= curve_port <= 65535:
        raise UsageError(f"invalid CurveZMQ port {curve_port}", hint="pass --curve-port 0 to 65535 (0: any free port)")
    if curve_port != 0 and curve_port == bootstrap_port:
        raise UsageError(f"--curve-port {curve_port} is the bootstrap port too",
                         hint="the tracker needs two ports: pass another --curve-port (default: the --bind port + 1)")
    return curve_port


class TrackerService:
    """The tracker's two sockets (plain bootstrap + CurveZMQ) over a persisted TrackerTable."""

    def __init__(
        self,
        identity: Identity,
        db_path: Path | None,
        clock: Callable[[], float] = time.time,
        *,
        max_entries: int = MAX_ENTRIES,
        expire_interval_s: float = EXPIRE_INTERVAL_S,
        pow_bits: int = 0,
        verifiers: frozenset[str] | None = None,
    ) -> None:
        """`verifiers`: the peer ids of the verifiers whose verdicts are admitted; None: any verifier."""
        if verifiers is not None and len(verifiers) > MAX_ADMITTED_VERIFIERS:
            raise ValueError(f"at most {MAX_ADMITTED_VERIFIERS} verifiers may be admitted")
        self.identity = identity
        self.table = TrackerTable(clock, max_entries, pow_bits=pow_bits)
        self.verdicts = VerdictTable(clock, verifiers)
        self.expire_interval_s = expire_interval_s
        self.storage_errors = 0  # failed commits and flushes since start
        self._storage_logged_at = -STORAGE_LOG_INTERVAL_S
        self._storage_unlogged = 0
        self.database = TrackerDatabase(db_path) if db_path is not None else None
        self.loaded = self.database.load_into(self.table) if self.database else 0
        self.loaded_verdicts = self.database.load_verdicts(self.verdicts) if self.database else 0
        self.ctx = new_context()
        self.bootstrap = Server(self.ctx, curve_secret=None, name="tracker-bootstrap")
        self.server = Server(self.ctx, curve_secret=identity.curve_secret, name="tracker")
        self.url = ""
        self._record: PeerRecord | None = None
        # activity, for the tracker's own report (node.run_tracker): (accepted, refused) per announce
        # burst, and the records each expiry sweep forgot (not re-announced before they expired)
        self.on_announced: Callable[[int, int], None] = lambda accepted, refused: None
        self.on_expired: Callable[[int], None] = lambda expired: None

    def bind(self, url: str, advertise: str | None = None, curve_port: int | None = None) -> str:
        """Bind the bootstrap socket at `url` and the CurveZMQ socket on `curve_port` of the same host.

        `curve_port` None: the bootstrap port + 1 (`curve_port_for`), so that both ports of a tracker
        are known before it starts and a firewall can admit them; 0: any free port."""
        check_endpoint(url, "bind address")
        host, port = url.rsplit(":", 1)
        chosen = curve_port_for(int(port), curve_port)
        self.url = self.bootstrap.bind(url, advertise)
        try:
            self.server.bind(f"{host}:{chosen}", advertise)
        except UsageError as exc:  # the host and --advertise passed with the bootstrap socket: the port failed
            raise UsageError(
                f"{exc.message}, the tracker's CurveZMQ port (its bootstrap port is {self.url.rsplit(':', 1)[1]})",
                hint="pass --curve-port PORT with another free port (0: any free port, which a firewall cannot "
                "admit in advance)",
            ) from exc
        return self.url

    @property
    def counters(self) -> dict[str, int]:
        return {
            **{f"bootstrap_{k}": v for k, v in self.bootstrap.counters.items()},
            **self.server.counters,
            "storage_errors": self.storage_errors,
        }

    def _storage_failed(self, exc: BaseException, what: str, serving: bool = True) -> None:
        """Count and log a failed write; while the fault lasts, log at most once a minute."""
        self.storage_errors += 1
        now = time.monotonic()
        if now - self._storage_logged_at < STORAGE_LOG_INTERVAL_S:
            self._storage_unlogged += 1
            return
        also = f" ({self._storage_unlogged} more failures since the last report)" if self._storage_unlogged else ""
        still = f"; still serving the {self.table.active_count()} records held" if serving else ""
        log.error("tracker: %s: %s%s%s", storage_problem(exc), what, still, also,
                  exc_info=None if disk_full(exc) else exc)
        self._storage_logged_at, self._storage_unlogged = now, 0

    def own_record(self) -> PeerRecord:
        now = self.table.clock()
        if self._record is None or self._record.expires - now < TRACKER_RECORD_TTL_S / 2:
            self._record = PeerRecord.sign(
                self.identity,
                endpoint=self.server.endpoint,
                roles=("tracker",),
                seq=int(now * 1000),
                expires=now + TRACKER_RECORD_TTL_S,
            )
        return self._record

    def hello(self) -> dict[str, object]:
        """The `hello_ok` body: the tracker's record, and the work it asks of new identities if any
        (left out when none, so clients that know no `pow_bits` still read it)."""
        body: dict[str, object] = {"record": self.own_record().to_wire()}
        if self.table.pow_bits:
            body["pow_bits"] = self.table.pow_bits
        if self.verdicts.admitted is not None:  # left out when any verifier is admitted
            body["verifiers"] = sorted(self.verdicts.admitted)
        return body

    async def _on_bootstrap(self, reply: Reply, message: Message) -> None:
        await reply.send("hello_ok", self.hello())

    async def _on_message(self, reply: Reply, message: Message) -> None:
        if message.kind == "hello":
            await reply.send("hello_ok", self.hello())
        elif message.kind == "query":
            try:
                sample, peers = query_sample(message), query_peers(message)
            except Rejected as exc:
                await reply.send("error", {"code": exc.code, "message": str(exc)})
                return
            with_verdicts = message.get("verdicts") is True
            page = self.table.page(
                message.get("model"), message.get("role"), limit=message.get("limit", DEFAULT_QUERY_LIMIT),
                endpoint=message.get("endpoint"), peers=peers, sample=sample, offset=message.get("offset", 0),
                budget=QUERY_BUDGET_BYTES - VERDICT_BUDGET_BYTES if with_verdicts else QUERY_BUDGET_BYTES,
            )
            body: dict[str, object] = {"records": [r.to_wire() for r in page.records]}
            if with_verdicts:  # only when asked: older clients refuse unknown fields
                seeds = [r.peer_id for r in page.records]
                proofs = self.verdicts.proofs_for(seeds)
                if proofs:
                    body["equivocations"] = proofs
                used = sum(len(json.dumps(p, separators=(",", ":"))) + 1 for p in proofs)
                body["verdicts"] = self.verdicts.for_seeds(seeds, VERDICT_BUDGET_BYTES - used)
            if sample is not None:  # a client that pages knows the paging fields; older ones refuse unknown fields
                body["listed_s"] = [round(age, 3) for age in page.listed_s]
                body["total"] = page.total
                if page.next is not None:
                    body["next"] = page.next
            await reply.send("peers", body)
        elif message.kind == "verdict":
            await reply.send(*self._on_verdict(message))
        elif message.kind == "ping":
            await reply.send("pong", {})

    def _on_verdict(self, message: Message) -> tuple[str, dict[str, object]]:
        """Check, hold and save one verdict: one signature check, a few dict operations and one small
        transaction (the bounds are VerdictTable's); a verdict whose save fails is not held. A proof of
        equivocation found on the way is saved too (or on a later sweep, if this save fails)."""
        try:
            verdict = self.verdicts.check(message["verdict"])
            entry = self.table.entries.get(verdict.seed)
            if entry is None or entry.record is None:
                # only verdicts on peers listed here: a flood of verdicts on made-up seeds holds nothing
                raise Rejected("invalid", f"seed {verdict.seed} is not listed by this tracker")
            if not any(info.model_id == verdict.model_id for info in entry.record.models):
                raise Rejected("invalid", f"seed {verdict.seed} does not announce model {verdict.model_id[:12]} here")
            stored = self.verdicts.accept(verdict)
        except Rejected as exc:
            self.server.counters["dropped"] += 1
            if exc.code == "equivocated" and self.database is not None and self.verdicts.dirty_proofs:
                try:
                    self.database.flush_verdicts(self.verdicts)
                except Exception as failure:  # noqa: BLE001 - kept in memory, saved by a later sweep
                    self._storage_failed(failure, "cannot save a proof of equivocation; will retry")
            return "error", {"code": exc.code, "message": str(exc)[:1000]}
        if stored and self.database is not None:
            try:
                self.database.flush_verdicts(self.verdicts)
            except Exception as exc:  # noqa: BLE001 - refuse it rather than claim durability
                self.verdicts._drop(verdict.seed, verdict.verifier, verdict.model_id, verdict.epoch)
                self.verdicts.dirty.discard(verdict.key)
                self._storage_failed(exc, "refused a verdict")
                return "error", {"code": "storage", "message": f"{storage_problem(exc)}: the verdict was not stored"}
        return "verdict_ok", {"stored": stored}

    async def _on_announces(self, batch: list[tuple[Reply, Message]]) -> None:
        """Check every announce of a burst, commit the accepted ones in one transaction, then answer.

        Nothing is acknowledged before it is committed, so an acknowledged announce survives a crash.
        """
        answers: list[tuple[Reply, str, dict[str, object]]] = []
        try:
            # staged: if the commit fails, the table is as it was before the burst
            with self.table.staged():
                for reply, message in batch:
                    answers.append((reply, *self._check(message)))
                if self.database is not None:
                    self.database.flush(self.table)
        except Exception as exc:  # noqa: BLE001 - refuse the burst rather than claim durability
            accepted = sum(1 for _, kind, _ in answers if kind == "announce_ok")
            self._storage_failed(exc, f"refused a burst of {len(batch)} announces ({accepted} valid)")
            problem = storage_problem(exc)
            text = f"{problem}: the announce was not stored; try again later or announce to another tracker"
            refused: dict[str, object] = {"code": "storage", "message": text}
            if len(answers) != len(batch):  # failed before every announce was checked: refuse them all
                answers = [(reply, "announce_ok", {}) for reply, _ in batch]
            # announces refused on their own merits keep their code; the accepted ones were undone
            answers = [(reply, "error", refused) if kind == "announce_ok" else (reply, kind, body)
                       for reply, kind, body in answers]
        peers = self.table.active_count()
        accepted = sum(1 for _, kind, _ in answers if kind == "announce_ok")
        self.on_announced(accepted, len(answers) - accepted)
        for reply, kind, body in answers:
            if kind == "announce_ok":
                body = {"interval_s": REANNOUNCE_INTERVAL_S, "peers": peers}
            else:
                self.server.counters["dropped"] += 1
            await reply.send(kind, body)

    def _check(self, message: Message) -> tuple[str, dict[str, object]]:
        """Accept one announce into the table, or say why not (as an answer's kind and body)."""
        try:
            self.table.accept(PeerRecord.from_wire(message["record"]))
        except Rejected as exc:
            return "error", {"code": exc.code, "message": str(exc)}
        except ProtocolError as exc:
            return "error", {"code": "invalid", "message": str(exc)[:500]}
        except Exception as exc:  # noqa: BLE001 - one odd announce must not sink the burst
            return "error", {"code": "invalid", "message": type(exc).__name__}
        return "announce_ok", {}

    def sweep(self) -> None:
        """Forget expired entries and save what is unsaved; a failed save is logged and retried later."""
        live = self.table.live
        self.table.expire()
        self.on_expired(live - self.table.live)  # records that lapsed (withdrawn peers' tombstones not counted)
        self.verdicts.expire()
        if self.database is not None and (self.verdicts.dirty or self.verdicts.dirty_proofs):
            try:
                self.database.flush_verdicts(self.verdicts)
            except Exception as exc:  # noqa: BLE001 - the tracker keeps serving from memory
                self._storage_failed(exc, "cannot save expired verdicts; will retry")
        if self.database is not None and self.table.dirty:
            try:
                self.database.flush(self.table)
            except Exception as exc:  # noqa: BLE001 - the tracker keeps serving from memory
                self._storage_failed(exc, "cannot save expired entries; will retry")

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expire_interval_s)
            self.sweep()

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        tasks = [
            asyncio.create_task(self.bootstrap.serve(self._on_bootstrap, frozenset({"hello"}))),
            asyncio.create_task(
                self.server.serve(
                    self._on_message,
                    frozenset({"hello", "announce", "query", "verdict", "ping"}),
                    batch_kinds=frozenset({"announce"}),
                    batch_handler=self._on_announces,
                )
            ),
            asyncio.create_task(self._expire_loop()),
        ]
        if ready is not None:
            ready()
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        self.bootstrap.close()
        self.server.close()
        if self.database is not None:
            try:
                self.database.flush(self.table)
            except Exception as exc:  # noqa: BLE001 - unsaved expiries are redone on the next start
                self._storage_failed(exc, "cannot save the table on close (redone at the next start)", serving=False)
            try:
                self.database.close()
            except Exception as exc:  # noqa: BLE001 - closing must not turn a full disk into a crash
                log.error("tracker: closing the database failed (%s)", storage_problem(exc))
        self.ctx.term()
