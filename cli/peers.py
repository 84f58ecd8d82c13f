"""`gtorrent peers`: peers known to the trackers and to this peer's store, with their reputation."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from gtorrent.identity import short_id
from gtorrent.node import PeerRow, list_peers

from . import output
from .common import JsonOption, TrackerOption, settings


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def peers_command(
    tracker: TrackerOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only peers serving this model (name or id).")] = None,
    json_output: JsonOption = False,
) -> None:
    """List peers: roles, models, reputation and what this peer observed of them."""
    rows, failed = list_peers(settings(tracker), model)
    for url, message in failed.items():
        output.warning(f"tracker {url} did not answer: {message}")
    if json_output:
        output.print_json([row.as_json() for row in rows])
        return
    output.out.print(peers_table(rows))


def peers_table(rows: list[PeerRow]) -> Table:
    """The `ollama ps`-style table of peers, with a total row."""
    now = time.time()
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PEER", "ROLES", "MODELS", "ENDPOINT", "REPUTATION", "OK", "FAILED", "TTFT", "TOK/S", "QUEUE", "LAST SEEN"):
        table.add_column(column, justify="right" if column in ("REPUTATION", "OK", "FAILED", "TTFT", "TOK/S", "QUEUE") else "left")
    for row in rows:
        # every string in a row came from a peer's record: data, never markup (output.remote)
        rep = f"{row.reputation:.2f}" + ("" if row.trusted else " [red]untrusted[/]")
        table.add_row(
            output.remote(short_id(row.peer_id)) + ("" if row.online else " [dim](offline)[/]"),
            output.remote(",".join(row.roles)),
            output.remote(", ".join(m["name"] for m in row.models)) or "-",
            output.remote(row.endpoint),
            rep,
            str(row.asks_ok),
            str(row.asks_failed),
            output.human_seconds(row.median_ttft_s) if row.median_ttft_s is not None else "-",
            f"{row.median_tokens_per_s:.1f}" if row.median_tokens_per_s is not None else "-",
            f"{row.queue:g}" if row.queue is not None else "-",
            _ago(row.last_seen, now),
        )
    online = sum(1 for r in rows if r.online)
    table.add_section()
    table.add_row(
        f"[bold]{len(rows)} peers[/]", f"{online} online", "", "", "",
        str(sum(r.asks_ok for r in rows)), str(sum(r.asks_failed for r in rows)), "", "", "", "",
    )
    return table
