"""The local SQLite store of one peer (through sqlite-utils): peers seen, observations, reputation.

One database per home, `gtorrent.db`. Migrations are a list of functions applied once and recorded
(sqlite-utils `Migrations`); the database runs in WAL mode and every write is a transaction, so a
crash never loses a committed row. Reputation is derived from the observations on read
(`reputation.py` holds the rules), never stored as a number that could drift from its evidence.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from . import reputation
from .paths import create_private, ensure_private_dir
from .protocol import PeerRecord

DB_NAME = "gtorrent.db"
OUTCOMES = ("ok", "failed", "timeout")
RECENT_OBSERVATIONS = 50  # per peer, for reliability and medians

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


class Store:
    def __init__(self, path: Path) -> None:
        ensure_private_dir(path.parent)
        self.path = path
        create_private(path)  # SQLite gives the -wal/-shm files the database file's mode
        self.db = Database(path)
        self.db.enable_wal()
        migrations.apply(self.db)

    @classmethod
    def open(cls, home: Path) -> Store:
        return cls(home / DB_NAME)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writes

    def saw_peers(self, records: Iterable[PeerRecord], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db.atomic():
            for record in records:
                existing = self._peer_row(record.peer_id)
                self.db.table("peers").upsert(
                    {
                        "peer_id": record.peer_id,
                        "record": json.dumps(record.to_wire()),
                        "endpoint": record.endpoint,
                        "roles": ",".join(record.roles),
                        "first_seen": existing["first_seen"] if existing else now,
                        "last_seen": now,
                    },
                    pk="peer_id",
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
        with self.db.atomic():
            self.db.table("observations").insert(
                {
                    "peer_id": peer_id,
                    "kind": kind,
                    "outcome": outcome,
                    "ttft_s": ttft_s,
                    "tokens_per_s": tokens_per_s,
                    "detail": detail[:500],
                    "at": time.time() if now is None else now,
                }
            )

    # ------------------------------------------------------------------ reads

    def _peer_row(self, peer_id: str) -> dict[str, Any] | None:
        rows = list(self.db.table("peers").rows_where("peer_id = ?", [peer_id], limit=1))
        return rows[0] if rows else None

    def known_records(self) -> list[PeerRecord]:
        """Records of every peer seen (re-verified: the database is not trusted blindly either)."""
        records = []
        for row in self.db.table("peers").rows:
            try:
                records.append(PeerRecord.from_wire(json.loads(row["record"])))
            except (ValueError, KeyError):
                continue
        return records

    def last_seen(self, peer_id: str) -> float | None:
        row = self._peer_row(peer_id)
        return float(row["last_seen"]) if row else None

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
        ).fetchone()
        consecutive = 0
        last_failure = None
        for row in reversed(rows):
            if row["outcome"] == "ok":
                break
            consecutive += 1
            last_failure = last_failure or row["at"]
        verdicts = [
            row["credibility"]
            for row in self.db.table("verdicts").rows_where("peer_id = ?", [peer_id], order_by="epoch, id")
        ]
        quality = reputation.quality_from_verdicts(verdicts)
        reliability = reputation.reliability_from_outcomes(row["outcome"] == "ok" for row in rows)
        ok_rows = [row for row in rows if row["outcome"] == "ok"]
        ttfts = [row["ttft_s"] for row in ok_rows if row["ttft_s"] is not None]
        rates = [row["tokens_per_s"] for row in ok_rows if row["tokens_per_s"] is not None]
        return reputation.PeerStanding(
            peer_id=peer_id,
            reputation=reputation.combined(quality, reliability),
            asks_ok=int(counts[0] or 0),
            asks_failed=int(counts[1] or 0),
            consecutive_failures=consecutive,
            avoid_until=reputation.avoid_until(consecutive, last_failure),
            median_ttft_s=statistics.median(ttfts) if ttfts else None,
            median_tokens_per_s=statistics.median(rates) if rates else None,
        )
