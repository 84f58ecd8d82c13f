"""The local SQLite store of one peer (through sqlite-utils): peers seen, observations, signed verdicts,
guards; reputation derived from them.

One database per home, `gtorrent.db`. Migrations are a list of functions applied once and recorded
(sqlite-utils `Migrations`); the database runs in WAL mode and every write is a transaction, so a
crash never loses a committed row. Reputation is derived from the verdicts and observations on read
(`reputation.py` holds the rules), never stored as a number that could drift from its evidence.
Verdicts are stored only once verified, with their signatures, one per (verifier, seed, model, epoch)
(the first stays); only from verifiers this client trusts (when it knows which) and within time bounds
(Verdict.time_problem); at most the newest VERDICT_EPOCHS_KEPT epochs per (verifier, seed, model),
MAX_VERDICTS_PER_SEED per seed and MAX_VERDICTS_KEPT in all, taken from the verifiers holding the most
rows first (their oldest epochs first), so one verifier cannot push out the others' history. A verifier
seen signing two different verdicts for one key is an equivocator: the proof is kept (bounded), its
verdicts are deleted and no further ones are taken, so it counts for nothing.

Many processes may use one store at once (several asks sharing a home). So every connection waits
for another's write lock (busy timeout) instead of failing; every write is one short `BEGIN
IMMEDIATE` transaction, which takes the write lock up front: a deferred transaction that reads and
then writes must upgrade its read snapshot, and in WAL mode that fails at once (SQLITE_BUSY, no
waiting) whenever another process committed in between. Upserts are single `INSERT … ON CONFLICT`
statements; the writes that must read (verdicts compared with those held, guards counted) read inside
their IMMEDIATE transaction, under the lock. Migrations run inside one such transaction and re-read what is
pending there, so processes opening a new home together apply each migration exactly once. A
transaction that still meets SQLITE_BUSY is retried a few times with jittered backoff. Any other
SQLite failure (full disk, read-only or damaged file) becomes a `StoreError` naming the file.
"""

from __future__ import annotations

import functools
import json
import random
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from . import reputation
from .errors import StoreError
from .guards import Guard
from .paths import HOME_ENV, create_private, ensure_private_dir
from .protocol import CREDIBILITY_SCALE, Equivocation, PeerRecord, ProtocolError, Verdict

DB_NAME = "gtorrent.db"
OUTCOMES = ("ok", "failed", "timeout")
RECENT_OBSERVATIONS = 50  # per peer, for reliability and medians
# verdicts kept per (verifier, seed, model): the newest epochs. R forgets its past by ALPHA = 0.4 per epoch,
# so what older epochs would add is below 0.4**64 (~1e-26): the bound costs no precision
VERDICT_EPOCHS_KEPT = 64
MAX_VERDICTS_PER_SEED = 1024  # rows on one seed (e.g. 16 verifiers x 64 epochs); the oldest epochs go first
MAX_VERDICTS_KEPT = 50_000  # rows in all (~0.4 KiB each); the oldest epochs go first
MAX_EQUIVOCATIONS_KEPT = 1024  # proofs kept (one per verifier; ~1.1 KiB each); the oldest go first
BUSY_TIMEOUT_S = 5.0  # one statement waits this long for another process's lock before SQLITE_BUSY
BUSY_ATTEMPTS = 4  # a transaction that still meets SQLITE_BUSY runs again, this many times in all
BUSY_BACKOFF_S = 0.05  # mean pause before the first retry; doubles for each further one (jittered)

# SQLite primary result codes (the low byte of sqlite3.Error.sqlite_errorcode)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 5, 6, 8, 11, 13, 26

migrations = Migrations("gtorrent")


@migrations()
def m001_peers_and_observations(db: Database) -> None:
    db.table("peers").create(
        {"peer_id": str, "record": str, "endpoint": str, "roles": str, "first_seen": float, "last_seen": float},
        pk="peer_id",
    )
    db.table("observations").create(
        {
            "id": int,
            "peer_id": str,
            "kind": str,  # "ask" now; "challenge" and "verdict" come with verification
            "outcome": str,  # ok | failed | timeout
            "ttft_s": float,
            "tokens_per_s": float,
            "detail": str,
            "at": float,
        },
        pk="id",
    )
    db.table("observations").create_index(["peer_id", "at"])


@migrations()
def m002_verdicts(db: Database) -> None:
    db.table("verdicts").create(
        {"id": int, "peer_id": str, "model_id": str, "epoch": int, "credibility": float, "signer": str, "at": float},
        pk="id",
    )
    db.table("verdicts").create_index(["peer_id", "epoch"])


@migrations()
def m003_guards(db: Database) -> None:
    # one guard set per swarm (the trackers an ask uses, guards.swarm_key): guards of one swarm mean
    # nothing in another, and moving between swarms must not push guards out
    db.table("guards").create(
        {"swarm": str, "peer_id": str, "record": str, "chosen_at": float, "rotate_at": float,
         "unreachable_since": float},
        pk=("swarm", "peer_id"),
    )


@migrations()
def m004_signed_verdicts(db: Database) -> None:
    # m002's table never had a writer: replaced by signed verdicts, kept with the signature and the
    # verifier's key so they can be re-checked and handed on. One per (verifier, seed, epoch): the first
    # one stays (Store.add_verdicts says why).
    db.table("verdicts").drop()
    db.table("verdicts").create(
        {"verifier": str, "seed": str, "epoch": int, "verifier_key": str, "model_id": str, "credibility": float,
         "challenges": int, "evidence": str, "signature": str, "received_at": float},
        pk=("verifier", "seed", "epoch"),
    )
    db.table("verdicts").create_index(["seed", "epoch"])


@migrations()
def m005_verdicts_per_model(db: Database) -> None:
    # verdicts v2 (docs/PROTOCOL.md §12): credibility in integer millionths and the epoch placed in time,
    # signed under a new label, so m004's rows (v1 signatures) can never verify again and are dropped.
    # One per (verifier, seed, model, epoch): a verdict is about one model of one seed.
    db.table("verdicts").drop()
    db.table("verdicts").create(
        {"verifier": str, "seed": str, "model_id": str, "epoch": int, "verifier_key": str, "credibility": int,
         "challenges": int, "evidence": str, "epoch_start_ms": int, "epoch_ms": int, "signature": str,
         "received_at": float},
        pk=("verifier", "seed", "model_id", "epoch"),
    )
    db.table("verdicts").create_index(["seed", "epoch"])
    db.table("verdicts").create_index(["epoch_start_ms", "received_at"])  # pruning the oldest
    # proofs that a verifier signed two different verdicts for one key: its verdicts count for nothing
    db.table("verdict_equivocations").create(
        {"verifier": str, "first": str, "second": str, "seen_at": float}, pk="verifier",
    )


@migrations()
def m006_verdict_judges(db: Database) -> None:
    # which verifiers judge a model (Store.judges): the quorum of an epoch counts per model
    db.table("verdicts").create_index(["model_id", "verifier"])


_VERDICT_COLUMNS = ("verifier", "verifier_key", "seed", "model_id", "epoch", "epoch_start_ms", "epoch_ms",
                    "credibility", "challenges", "evidence", "signature")  # as in the wire form


def _verdict_row(verdict: Verdict, now: float) -> tuple[Any, ...]:
    wire = verdict.to_wire()
    return (*(wire[name] for name in _VERDICT_COLUMNS), now)


P = ParamSpec("P")
R = TypeVar("R")


def _primary_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    if _primary_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)  # builds without error codes


def _retrying(path: Path, attempt_once: Callable[[], R]) -> R:
    """Run `attempt_once` again on SQLITE_BUSY (bounded, jittered); turn SQLite errors into StoreError."""
    for attempt in range(BUSY_ATTEMPTS):
        try:
            return attempt_once()
        except sqlite3.Error as exc:
            if not _is_busy(exc) or attempt == BUSY_ATTEMPTS - 1:
                raise _store_error(path, exc) from exc
        # jitter: processes that collided must not retry in lockstep
        time.sleep(BUSY_BACKOFF_S * (2**attempt) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def _guarded(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[Store, P], R]:
    """A Store read, retried on SQLITE_BUSY, with SQLite errors as StoreError (writes use `Store._write`)."""

    @functools.wraps(method)
    def wrapper(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return _retrying(self.path, lambda: method(self, *args, **kwargs))

    return wrapper


def _store_error(path: Path, exc: sqlite3.Error) -> StoreError:
    code = _primary_code(exc)
    other_home = f"or set {HOME_ENV} to another directory"
    if code == _SQLITE_FULL:
        return StoreError(f"cannot write the local store {path}: the database or disk is full ({exc})",
                          hint=f"free some disk space, {other_home} (on a disk with room)")
    if code == _SQLITE_READONLY:
        return StoreError(f"cannot write the local store {path}: it is read-only ({exc})",
                          hint=f"make it and its folder writable, {other_home}")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreError(f"the local store {path} is damaged ({exc})",
                          hint=f"move it aside (it holds only peers seen and ask outcomes, and is made anew), {other_home}")
    if _is_busy(exc):
        return StoreError(f"the local store {path} stayed locked by other processes ({exc})",
                          hint=f"try again; if it persists, stop the gtorrent process stuck on it, {other_home}")
    return StoreError(f"cannot use the local store {path} ({exc})", hint=f"check the disk that holds it (full? failing?), {other_home}")


class Store:
    def __init__(self, path: Path, trusted_verifiers: set[str] | None = None) -> None:
        """`trusted_verifiers`: the verifiers (peer ids) whose verdicts count for reputation; None: any.
        Verdicts of others are still kept (a client may trust more verifiers later)."""
        ensure_private_dir(path.parent)
        self.path = path
        self.trusted_verifiers = None if trusted_verifiers is None else set(trusted_verifiers)
        create_private(path)  # SQLite gives the -wal/-shm files the database file's mode
        try:
            # timeout= is SQLite's busy timeout: wait for another process's lock instead of failing
            self.db = Database(sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S))
        except sqlite3.Error as exc:
            raise _store_error(path, exc) from exc
        try:
            self._open()
        except BaseException:
            self.db.close()
            raise

    def _open(self) -> None:
        _retrying(self.path, self.db.enable_wal)
        if _retrying(self.path, lambda: migrations.pending(self.db)):  # an up-to-date store takes no write lock
            self._write(lambda: migrations.apply(self.db))  # pending is re-read inside, under the lock

    @classmethod
    def open(cls, home: Path, trusted_verifiers: set[str] | None = None) -> Store:
        return cls(home / DB_NAME, trusted_verifiers)

    def close(self) -> None:
        self.db.close()

    def _write(self, body: Callable[[], R]) -> R:
        """Run `body` in one IMMEDIATE transaction (the write lock taken before anything is read), retried."""
        conn = self.db.conn

        def attempt_once() -> R:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return _retrying(self.path, attempt_once)

    # ------------------------------------------------------------------ writes

    def saw_peers(self, records: Iterable[PeerRecord], now: float | None = None) -> None:
        now = time.time() if now is None else now
        rows = [
            (record.peer_id, json.dumps(record.to_wire()), record.endpoint, ",".join(record.roles), now, now)
            for record in records
        ]
        if not rows:
            return
        # one statement per peer, no read first: first_seen keeps the earliest sighting and the record
        # the latest, whatever order concurrent processes commit in
        self._write(
            lambda: self.db.conn.executemany(
                """
                insert into peers (peer_id, record, endpoint, roles, first_seen, last_seen)
                values (?, ?, ?, ?, ?, ?)
                on conflict (peer_id) do update set
                    record = case when excluded.last_seen >= peers.last_seen then excluded.record else peers.record end,
                    endpoint = case when excluded.last_seen >= peers.last_seen then excluded.endpoint else peers.endpoint end,
                    roles = case when excluded.last_seen >= peers.last_seen then excluded.roles else peers.roles end,
                    first_seen = min(peers.first_seen, excluded.first_seen),
                    last_seen = max(peers.last_seen, excluded.last_seen)
                """,
                rows,
            )
        )

    def observe(
        self,
        peer_id: str,
        outcome: str,
        *,
        kind: str = "ask",
        ttft_s: float | None = None,
        tokens_per_s: float | None = None,
        detail: str = "",
        now: float | None = None,
    ) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        row = (peer_id, kind, outcome, ttft_s, tokens_per_s, detail[:500], time.time() if now is None else now)
        self._write(
            lambda: self.db.conn.execute(
                "insert into observations (peer_id, kind, outcome, ttft_s, tokens_per_s, detail, at) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        )

    def add_verdicts(self, verdicts: Iterable[Verdict], now: float | None = None) -> int:
        """Keep these verdicts with their signatures; returns how many were new.

        Each is verified again first (a `Verdict` can be built without `from_wire`): one that fails
        raises ProtocolError and nothing is written. Left out, silently: verdicts of verifiers this
        store does not trust (`trusted_verifiers`, when known: a flood from unknown identities costs
        nothing), of proven equivocators, and those whose epoch is in the future or stale
        (Verdict.time_problem). A second verdict for a (verifier, seed, model, epoch) already held is
        not stored over the first: the same verdict arrives through every tracker (so ingesting is
        idempotent), and a different one is an equivocation (letting the later win would let a verifier
        rewrite an epoch after seeing how the others voted): its proof is kept and the verifier's
        verdicts are deleted. Then the bounds apply (module docstring)."""
        now = time.time() if now is None else now
        checked: list[Verdict] = []
        for verdict in verdicts:
            if not isinstance(verdict, Verdict):
                raise TypeError("add_verdicts takes protocol.Verdict objects")
            checked.append(Verdict.from_wire(verdict.to_wire()))  # raises ProtocolError
        trusted = self.trusted_verifiers
        kept = [v for v in checked if (trusted is None or v.verifier in trusted) and v.time_problem(now) is None]
        if not kept:
            return 0

        def body() -> int:
            conn = self.db.conn
            liars = self._equivocators(conn)
            added = 0
            touched: set[tuple[str, str, str]] = set()
            for verdict in kept:
                if verdict.verifier in liars:
                    continue
                held = self._held_verdict(conn, verdict)
                if held is not None:
                    proof = Equivocation.of(held, verdict)
                    if proof is not None:
                        self._keep_proof(conn, proof, now)
                        liars.add(verdict.verifier)
                    continue
                conn.execute(f"insert into verdicts ({', '.join(_VERDICT_COLUMNS)}, received_at) "
                             f"values ({', '.join('?' * (len(_VERDICT_COLUMNS) + 1))})", _verdict_row(verdict, now))
                added += 1
                touched.add((verdict.verifier, verdict.seed, verdict.model_id))
            for verifier, seed, model_id in sorted(touched):
                conn.execute(
                    "delete from verdicts where verifier = ? and seed = ? and model_id = ? and epoch not in "
                    "(select epoch from verdicts where verifier = ? and seed = ? and model_id = ? "
                    "order by epoch desc limit ?)",
                    (verifier, seed, model_id, verifier, seed, model_id, VERDICT_EPOCHS_KEPT),
                )
            for seed in sorted({seed for _, seed, _ in touched}):
                self._prune(conn, "seed = ?", (seed,), MAX_VERDICTS_PER_SEED)
            self._prune(conn, "1", (), MAX_VERDICTS_KEPT)
            return added

        return self._write(body)

    def add_equivocations(self, proofs: Iterable[Equivocation], now: float | None = None) -> int:
        """Keep these proofs (re-checked: one that fails raises ProtocolError and nothing is written) of
        verifiers this store trusts (when known) and delete the verdicts of each; returns how many verifiers
        were newly proven to equivocate."""
        now = time.time() if now is None else now
        checked = []
        for proof in proofs:
            if not isinstance(proof, Equivocation):
                raise TypeError("add_equivocations takes protocol.Equivocation objects")
            checked.append(Equivocation.from_wire(proof.to_wire()))
        trusted = self.trusted_verifiers
        kept = [p for p in checked if trusted is None or p.verifier in trusted]
        if not kept:
            return 0

        def body() -> int:
            conn = self.db.conn
            liars = self._equivocators(conn)
            new = 0
            for proof in kept:
                if proof.verifier not in liars:
                    self._keep_proof(conn, proof, now)
                    liars.add(proof.verifier)
                    new += 1
            return new

        return self._write(body)

    @staticmethod
    def _prune(conn: sqlite3.Connection, where: str, params: tuple[Any, ...], cap: int) -> None:
        """Bring the rows matching `where` down to `cap`, taking from the verifiers that hold the most of
        them (each one's oldest epochs first) until they hold no more than the others: one verifier (a
        trusted liar signing many epoch numbers, models or seeds) can push out only its own rows, never
        the other verifiers' history. Inside a write transaction."""
        (held,) = conn.execute(f"select count(*) from verdicts where {where}", params).fetchone()
        if held <= cap:  # the usual case: one count, no grouping
            return
        counts = dict(conn.execute(f"select verifier, count(*) from verdicts where {where} group by verifier",
                                   params).fetchall())
        excess = sum(counts.values()) - cap

        def above(level: int) -> int:
            return sum(max(0, count - level) for count in counts.values())

        low, high = 0, max(counts.values())  # the lowest level L with above(L) <= excess
        while low < high:
            middle = (low + high) // 2
            if above(middle) <= excess:
                high = middle
            else:
                low = middle + 1
        cut = {verifier: max(0, count - low) for verifier, count in counts.items()}
        extra = excess - above(low)  # fewer than the verifiers at the level: one more row each from some
        for verifier in sorted(v for v, count in counts.items() if count >= low and count > 0)[:extra]:
            cut[verifier] += 1
        for verifier, rows in sorted(cut.items()):
            if rows:
                conn.execute(f"delete from verdicts where rowid in (select rowid from verdicts where {where} and "
                             "verifier = ? order by epoch_start_ms, received_at limit ?)", (*params, verifier, rows))

    @staticmethod
    def _equivocators(conn: sqlite3.Connection) -> set[str]:
        return {row[0] for row in conn.execute("select verifier from verdict_equivocations").fetchall()}

    @staticmethod
    def _held_verdict(conn: sqlite3.Connection, verdict: Verdict) -> Verdict | None:
        row = conn.execute(
            f"select {', '.join(_VERDICT_COLUMNS)} from verdicts where verifier = ? and seed = ? and model_id = ? "
            "and epoch = ?", verdict.key,
        ).fetchone()
        if row is None:
            return None
        try:
            return Verdict.from_wire(dict(zip(_VERDICT_COLUMNS, row, strict=True)))
        except ProtocolError:  # a damaged row: the new verdict cannot be compared with it, and is not stored
            return verdict

    @staticmethod
    def _keep_proof(conn: sqlite3.Connection, proof: Equivocation, now: float) -> None:
        """Record the proof and delete the equivocator's verdicts (inside a write transaction)."""
        first, second = (json.dumps(v.to_wire()) for v in (proof.first, proof.second))
        conn.execute("insert or ignore into verdict_equivocations (verifier, first, second, seen_at) values (?, ?, ?, ?)",
                     (proof.verifier, first, second, now))
        conn.execute("delete from verdicts where verifier = ?", (proof.verifier,))
        conn.execute("delete from verdict_equivocations where rowid in (select rowid from verdict_equivocations "
                     "order by seen_at desc, rowid desc limit -1 offset ?)", (MAX_EQUIVOCATIONS_KEPT,))

    def add_guards(self, swarm: str, guards: Iterable[Guard], limit: int) -> None:
        """Add these guards to the swarm's set while it holds fewer than `limit`.

        Counted inside the write transaction: asks running at once on one home may each have chosen
        guards, and together they never take the set beyond `limit`."""
        rows = [(swarm, g.peer_id, json.dumps(g.record.to_wire()), g.chosen_at, g.rotate_at) for g in guards]

        def body() -> None:
            conn = self.db.conn
            (held,) = conn.execute("select count(*) from guards where swarm = ?", (swarm,)).fetchone()
            room = limit - int(held)
            for row in rows:
                if room <= 0:
                    break
                added = conn.execute("insert or ignore into guards (swarm, peer_id, record, chosen_at, rotate_at, "
                                     "unreachable_since) values (?, ?, ?, ?, ?, null)", row).rowcount
                room -= added

        if rows:
            self._write(body)

    def update_guards(self, swarm: str, answered: Iterable[PeerRecord], silent: Iterable[str],
                      now: float | None = None) -> None:
        """Record which guards answered just now (with the record each sent) and which did not."""
        now = time.time() if now is None else now
        seen = [(json.dumps(r.to_wire()), swarm, r.peer_id) for r in answered]
        gone = [(now, swarm, peer_id) for peer_id in silent]

        def body() -> None:
            conn = self.db.conn
            conn.executemany("update guards set record = ?, unreachable_since = null where swarm = ? and peer_id = ?", seen)
            conn.executemany("update guards set unreachable_since = coalesce(unreachable_since, ?) "
                             "where swarm = ? and peer_id = ?", gone)

        if seen or gone:
            self._write(body)

    def drop_guards(self, swarm: str, peer_ids: Iterable[str] | None = None) -> None:
        """Forget these guards of the swarm (all of them when None: `gtorrent guards --reset`)."""
        ids = None if peer_ids is None else [(swarm, p) for p in peer_ids]

        def body() -> None:
            if ids is None:
                self.db.conn.execute("delete from guards where swarm = ?", (swarm,))
            else:
                self.db.conn.executemany("delete from guards where swarm = ? and peer_id = ?", ids)

        self._write(body)

    # ------------------------------------------------------------------ reads

    def _peer_row(self, peer_id: str) -> dict[str, Any] | None:
        rows = list(self.db.table("peers").rows_where("peer_id = ?", [peer_id], limit=1))
        return rows[0] if rows else None

    @_guarded
    def known_records(self) -> list[PeerRecord]:
        """Records of every peer seen (re-verified: the database is not trusted blindly either)."""
        records = []
        for row in self.db.table("peers").rows:
            try:
                records.append(PeerRecord.from_wire(json.loads(row["record"])))
            except (ValueError, KeyError):
                continue
        return records

    @_guarded
    def guards(self, swarm: str) -> list[Guard]:
        """The swarm's guards in the order chosen (the order of preference: a batch is inserted in its
        random draw order, never by peer id, which anyone can grind); records re-verified."""
        held = []
        for row in self.db.execute(
            "select record, chosen_at, rotate_at, unreachable_since from guards where swarm = ? order by chosen_at, rowid",
            (swarm,),
        ).fetchall():
            try:
                record = PeerRecord.from_wire(json.loads(row[0]))
            except (ValueError, KeyError):
                continue
            held.append(Guard(record, float(row[1]), float(row[2]), None if row[3] is None else float(row[3])))
        return held

    @_guarded
    def verdicts(self, seed: str, epoch: int | None = None, *, model_id: str | None = None) -> list[Verdict]:
        """The verdicts held on `seed` (for one `epoch` and one `model_id`, or all), oldest epoch first, then
        by verifier and model; each re-verified: they are shown and handed on with their signatures, so a
        damaged row is left out, never passed along."""
        held = []
        for row in self.db.execute(
            f"select {', '.join(_VERDICT_COLUMNS)} from verdicts where seed = ? and (? is null or epoch = ?) "
            "and (? is null or model_id = ?) order by epoch, verifier, model_id",
            (seed, epoch, epoch, model_id, model_id),
        ).fetchall():
            try:
                held.append(Verdict.from_wire(dict(zip(_VERDICT_COLUMNS, row, strict=True))))
            except ProtocolError:
                continue
        return held

    @_guarded
    def judges(self, model_ids: Iterable[str]) -> dict[str, set[str]]:
        """model id -> the verifiers with a verdict held on that model, on any seed (the quorum of an
        epoch counts over those of them a client trusts, reputation.consensus_history)."""
        return self._judges(self.db.conn, set(model_ids))

    @staticmethod
    def _judges(conn: sqlite3.Connection, model_ids: set[str]) -> dict[str, set[str]]:
        # a skip scan over the (model_id, verifier) index: one lookup per verifier, not one per row (a
        # plain `select distinct` reads every verdict of the model: ~7 ms at 50 000, on every standing)
        found: dict[str, set[str]] = {}
        for model_id in sorted(model_ids):
            found[model_id] = {row[0] for row in conn.execute(
                "with recursive judge(verifier) as (select min(verifier) from verdicts where model_id = ?1 "
                "union all select (select min(verifier) from verdicts where model_id = ?1 and verifier > "
                "judge.verifier) from judge where judge.verifier is not null) "
                "select verifier from judge where verifier is not null", (model_id,)).fetchall()}
        return found

    @_guarded
    def equivocators(self) -> set[str]:
        """The verifiers proven to have equivocated (their verdicts are gone and none is taken again)."""
        return self._equivocators(self.db.conn)

    @_guarded
    def equivocations(self) -> list[Equivocation]:
        """The proofs held, newest first, re-checked (a damaged one is left out)."""
        proofs = []
        for first, second in self.db.execute(
            "select first, second from verdict_equivocations order by seen_at desc, rowid desc"
        ).fetchall():
            try:
                proofs.append(Equivocation.from_wire([json.loads(first), json.loads(second)]))
            except (ProtocolError, ValueError):
                continue
        return proofs

    @_guarded
    def verdict_seeds(self) -> list[str]:
        """Every seed some verdict held is about."""
        return [row[0] for row in self.db.execute("select distinct seed from verdicts order by seed").fetchall()]

    @_guarded
    def first_seen(self) -> dict[str, float]:
        """When this peer first saw each peer listed: among records that copy one another's endpoint or
        keys, the one seen first is the genuine one (routing.candidate_records)."""
        return {row[0]: float(row[1]) for row in self.db.execute("select peer_id, first_seen from peers").fetchall()}

    @_guarded
    def last_seen(self, peer_id: str) -> float | None:
        row = self._peer_row(peer_id)
        return float(row["last_seen"]) if row else None

    @_guarded
    def standing(self, peer_id: str) -> reputation.PeerStanding:
        rows = list(
            self.db.table("observations").rows_where(
                "peer_id = ? and kind = 'ask'", [peer_id], order_by="at desc, id desc", limit=RECENT_OBSERVATIONS
            )
        )
        rows.reverse()  # oldest first
        counts = self.db.execute(
            "select sum(outcome = 'ok'), sum(outcome != 'ok') from observations where peer_id = ? and kind = 'ask'",
            [peer_id],
        ).fetchall()[0]  # fetchall: a cursor left mid-result would hold a read snapshot open
        consecutive = 0
        last_failure = None
        for row in reversed(rows):
            if row["outcome"] == "ok":
                break
            consecutive += 1
            last_failure = last_failure or row["at"]
        # the numbers only: every row was verified on its way in (add_verdicts), and seeds are ranked
        # often; `verdicts()` re-verifies what is shown or handed on. Within an epoch and verifier the
        # lowest C of the seed's models comes first, so a rule that takes one per verifier and epoch
        # takes its worst model: a good model never launders a bad one (equivocators' rows are deleted)
        scored = [
            _Scored(row[0], int(row[1]), int(row[2]) / CREDIBILITY_SCALE, row[3])
            for row in self.db.execute(
                "select verifier, epoch, credibility, model_id from verdicts where seed = ? "
                "order by epoch, verifier, credibility, model_id", (peer_id,)
            ).fetchall()
        ]
        history = reputation.consensus_history(scored, self.trusted_verifiers,
                                               self._judges(self.db.conn, {s.model_id for s in scored}))
        reliability = reputation.reliability_from_outcomes(row["outcome"] == "ok" for row in rows)
        ok_rows = [row for row in rows if row["outcome"] == "ok"]
        ttfts = [row["ttft_s"] for row in ok_rows if row["ttft_s"] is not None]
        rates = [row["tokens_per_s"] for row in ok_rows if row["tokens_per_s"] is not None]
        return reputation.PeerStanding(
            peer_id=peer_id,
            reputation=history[-1].reputation if history else reputation.INITIAL_REPUTATION,
            asks_ok=int(counts[0] or 0),
            asks_failed=int(counts[1] or 0),
            consecutive_failures=consecutive,
            avoid_until=reputation.avoid_until(consecutive, last_failure),
            median_ttft_s=statistics.median(ttfts) if ttfts else None,
            median_tokens_per_s=statistics.median(rates) if rates else None,
            verified=bool(history),
            reliability=reliability,
            last_epoch=history[-1] if history else None,
        )


@dataclass(frozen=True)
class _Scored:
    """A stored verdict's numbers, as reputation.consensus_history reads them."""

    verifier: str
    epoch: int
    credibility: float
    model_id: str = ""  # the model the verdict is about (a seed may serve several)
