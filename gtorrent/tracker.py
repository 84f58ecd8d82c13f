"""The tracker: keeps the signed records peers announce and answers queries by model and role.

Rules (`TrackerTable`, pure over an injected clock):
- a record is accepted only with a valid signature (checked in `PeerRecord.from_wire`), an expiry in
  the future and no further than MAX_RECORD_TTL_S ahead, and a sequence number above any seen before
  for that peer — so a replayed or rolled-back announce is refused, also after the peer stopped
  (its tombstone keeps the sequence until the record would have expired);
- `stopped` removes the peer; expired records are forgotten;
- the table is persisted in SQLite (group commit: all announces that arrive together are written in one
  transaction before any of them is acknowledged), so a restart loses nothing acknowledged.

Ports: the tracker's protocol runs over CurveZMQ like every link, but a client given only
`tcp://host:port` cannot know the tracker's key yet. So the URL's port is a plain bootstrap socket that
answers `hello` with the tracker's own signed record, whose endpoint is the CurveZMQ port; a URL of the
form `tcp://host:port#PEER_ID` pins the tracker's identity.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .identity import Identity
from .paths import create_private, ensure_private_dir
from .protocol import MAX_RECORD_TTL_S, Message, PeerRecord, ProtocolError
from .transport import Reply, Server, new_context

log = logging.getLogger(__name__)

REANNOUNCE_INTERVAL_S = 30.0  # what the tracker asks peers to keep to
DEFAULT_QUERY_LIMIT = 200
TRACKER_RECORD_TTL_S = 600.0
CLOCK_SKEW_S = 60.0  # a record may claim this much more than the TTL, for clocks that run ahead


QUERY_BUDGET_BYTES = 192 * 1024  # an answer stays well under the message limit


def within_budget(records: list[dict[str, object]], budget: int = QUERY_BUDGET_BYTES) -> list[dict[str, object]]:
    """The leading records whose encoding fits the budget (records are sorted by load, best first)."""
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


@dataclass
class _Entry:
    record: PeerRecord | None  # None: a tombstone of a peer that stopped
    seq: int
    expires: float


class TrackerTable:
    """Records by peer id, with the acceptance rules above. Persistence is the caller's (see `flush`)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.entries: dict[str, _Entry] = {}
        self.live = 0  # entries holding a record (not tombstones); expired ones count until expire()
        self.dirty: set[str] = set()

    def accept(self, record: PeerRecord) -> None:
        now = self.clock()
        if record.expires <= now:
            raise Rejected("expired", f"record of {record.peer_id} expired")
        if record.expires > now + MAX_RECORD_TTL_S + CLOCK_SKEW_S:
            raise Rejected("ttl", f"record of {record.peer_id} claims to live too long")
        known = self.entries.get(record.peer_id)
        if known is not None and known.expires > now and record.seq <= known.seq:
            raise Rejected("replay", f"sequence {record.seq} of {record.peer_id} is not above {known.seq}")
        # keep the latest expiry seen, so an older record cannot be replayed once a shorter-lived newer
        # one has expired
        expires = max(record.expires, known.expires) if known is not None else record.expires
        self._set(record.peer_id, _Entry(None if record.stopped else record, record.seq, expires))

    def _set(self, peer_id: str, entry: _Entry | None) -> None:
        """Replace or remove an entry, keeping the live-record count in step."""
        old = self.entries.pop(peer_id, None)
        if old is not None and old.record is not None:
            self.live -= 1
        if entry is not None:
            self.entries[peer_id] = entry
            if entry.record is not None:
                self.live += 1
        self.dirty.add(peer_id)

    def query(self, model: str | None = None, role: str | None = None, limit: int = DEFAULT_QUERY_LIMIT) -> list[PeerRecord]:
        now = self.clock()
        found = []
        for entry in self.entries.values():
            record = entry.record
            if record is None or entry.expires <= now:
                continue
            if role is not None and role not in record.roles:
                continue
            if model is not None and not record.serves(model):
                continue
            found.append(record)
        found.sort(key=lambda r: (r.load.get("queue", 0.0), r.peer_id))
        return found[:limit]

    def active_count(self) -> int:
        return self.live

    def expire(self) -> int:
        now = self.clock()
        gone = [peer for peer, entry in self.entries.items() if entry.expires <= now]
        for peer in gone:
            self._set(peer, None)
        return len(gone)


tracker_migrations = Migrations("gtorrent-tracker")


@tracker_migrations()
def t001_records(db: Database) -> None:
    db.table("tracker_records").create(
        {"peer_id": str, "seq": int, "expires": float, "record": str}, pk="peer_id"
    )


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
        loaded = 0
        for row in self.db.table("tracker_records").rows:
            record = None
            if row["record"]:
                try:
                    record = PeerRecord.from_wire(json.loads(row["record"]))
                except (ProtocolError, ValueError):
                    continue  # never serve a record that no longer verifies
            table._set(row["peer_id"], _Entry(record, row["seq"], row["expires"]))
            loaded += 1
        table.expire()
        self.flush(table)
        return loaded

    def flush(self, table: TrackerTable) -> None:
        if not table.dirty:
            return
        dirty, table.dirty = table.dirty, set()
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
                    rows.append((peer, entry.seq, entry.expires, record))
            if rows:  # one prepared statement for the whole batch (upsert_all introspects per call)
                self.db.conn.executemany(
                    "insert or replace into tracker_records (peer_id, seq, expires, record) values (?, ?, ?, ?)", rows
                )

    def close(self) -> None:
        self.db.close()


class TrackerService:
    """The tracker's two sockets (plain bootstrap + CurveZMQ) over a persisted TrackerTable."""

    def __init__(self, identity: Identity, db_path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.table = TrackerTable(clock)
        self.database = TrackerDatabase(db_path) if db_path is not None else None
        self.loaded = self.database.load_into(self.table) if self.database else 0
        self.ctx = new_context()
        self.bootstrap = Server(self.ctx, curve_secret=None, name="tracker-bootstrap")
        self.server = Server(self.ctx, curve_secret=identity.curve_secret, name="tracker")
        self.url = ""
        self._record: PeerRecord | None = None

    def bind(self, url: str, advertise: str | None = None) -> str:
        """Bind the bootstrap socket at `url` and the CurveZMQ socket on a free port of the same host."""
        self.url = self.bootstrap.bind(url, advertise)
        host = url.rsplit(":", 1)[0]
        self.server.bind(f"{host}:0", advertise)
        return self.url

    @property
    def counters(self) -> dict[str, int]:
        return {**{f"bootstrap_{k}": v for k, v in self.bootstrap.counters.items()}, **self.server.counters}

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

    async def _on_bootstrap(self, reply: Reply, message: Message) -> None:
        await reply.send("hello_ok", {"record": self.own_record().to_wire()})

    async def _on_message(self, reply: Reply, message: Message) -> None:
        if message.kind == "hello":
            await reply.send("hello_ok", {"record": self.own_record().to_wire()})
        elif message.kind == "query":
            records = self.table.query(message.get("model"), message.get("role"), message.get("limit", DEFAULT_QUERY_LIMIT))
            await reply.send("peers", {"records": within_budget([r.to_wire() for r in records])})
        elif message.kind == "ping":
            await reply.send("pong", {})

    async def _on_announces(self, batch: list[tuple[Reply, Message]]) -> None:
        """Check every announce of a burst, commit the accepted ones in one transaction, then answer.

        Nothing is acknowledged before it is committed, so an acknowledged announce survives a crash.
        """
        answers: list[tuple[Reply, str, dict[str, object]]] = []
        for reply, message in batch:
            try:
                self.table.accept(PeerRecord.from_wire(message["record"]))
            except Rejected as exc:
                answers.append((reply, "error", {"code": exc.code, "message": str(exc)}))
            except ProtocolError as exc:
                answers.append((reply, "error", {"code": "invalid", "message": str(exc)[:500]}))
            except Exception as exc:  # noqa: BLE001 - one odd announce must not sink the burst
                answers.append((reply, "error", {"code": "invalid", "message": type(exc).__name__}))
            else:
                answers.append((reply, "announce_ok", {}))
        if self.database is not None:
            try:
                self.database.flush(self.table)
            except Exception:  # noqa: BLE001 - refuse the burst rather than claim durability
                log.exception("tracker: cannot commit announces")
                answers = [(reply, "error", {"code": "storage", "message": "tracker storage failed"}) for reply, _, _ in answers]
        peers = self.table.active_count()
        for reply, kind, body in answers:
            if kind == "announce_ok":
                body = {"interval_s": REANNOUNCE_INTERVAL_S, "peers": peers}
            else:
                self.server.counters["dropped"] += 1
            await reply.send(kind, body)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            if self.table.expire() and self.database is not None:
                self.database.flush(self.table)

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        tasks = [
            asyncio.create_task(self.bootstrap.serve(self._on_bootstrap, frozenset({"hello"}))),
            asyncio.create_task(
                self.server.serve(
                    self._on_message,
                    frozenset({"hello", "announce", "query", "ping"}),
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
            self.database.flush(self.table)
            self.database.close()
        self.ctx.term()
