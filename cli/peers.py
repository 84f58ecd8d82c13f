"""`gtorrent peers [PEER_ID]`: peers known to the trackers and to this peer's store, with their verification
reputation and trust state; with a peer id, that peer's verdict history from the local store.

The list fits the terminal: every column when they fit, else the NARROW ones (80 columns: peer, roles,
models, trust, last seen, endpoint), with `--wide` for all of them anyway. Output that is not a terminal
is 200 columns wide (output.out), so pipes and scripts get every column."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from gtorrent.errors import GtorrentError
from gtorrent.identity import short_id
from gtorrent.node import PeerHistory, PeerRow, list_peers, peer_history
from gtorrent.reputation import state_of

from . import output
from .common import JsonOption, TrackerOption, VerifierOption, settings

# colour is decoration only: the word itself says the state (pipes, colour-blind readers, --json)
_STATE_STYLE = {"trusted": "green", "untrusted": "bold red", "unverified": "yellow"}


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


def cache_hit_text(value: object) -> str:
    """A seed's cache hit rate as a percentage, or "-": the value comes from the seed's own record
    (untrusted data), so anything but a finite number in 0..1 shows as "-"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return "-"  # NaN fails the range test too
    return f"{value * 100:.0f}%"


def state_text(state: str) -> str:
    """The trust state as a plain word, coloured when the console has colour."""
    style = _STATE_STYLE.get(state)
    return f"[{style}]{output.remote(state)}[/]" if style else output.remote(state)


def peers_command(
    peer: Annotated[
        str | None,
        typer.Argument(metavar="PEER_ID", help="Show this peer's verdict history (its id, or its first characters)."),
    ] = None,
    tracker: TrackerOption = None,
    verifier: VerifierOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only peers serving this model (name or id).")] = None,
    json_output: JsonOption = False,
    wide: Annotated[
        bool, typer.Option("--wide", "-w", help="Every column (reputation details, ask outcomes, speed, load), "
                           "even where the terminal is too narrow for them.")
    ] = False,
) -> None:
    """List peers: roles, models, verification reputation and trust state, and what this peer observed of them."""
    if peer is not None:
        # the same verifiers count as in the list: --verifier / $GTORRENT_VERIFIERS, else the trackers' own
        history = peer_history(settings(tracker, verifiers=verifier, client=True), peer)
        if history.trust.source == "none":
            output.warning(history.trust.describe(),
                           hint="name the verifiers to trust with --verifier PEER_ID (or GTORRENT_VERIFIERS), or pass --tracker")
        if json_output:
            output.print_json(history.as_json())
        else:
            output.out.print(history_header(history))
            output.out.print(history_table(history))
        return
    node = settings(tracker, verifiers=verifier, client=True)
    rows, failed = list_peers(node, model)
    for url, message in failed.items():
        output.warning(f"tracker {url} did not answer: {message}")
    if json_output:
        output.print_json([row.as_json() for row in rows])
    elif rows or model is None:
        table = peers_table(rows)
        output.out.print(table if wide or fits(output.out, table) else peers_table(rows, wide=False))
    if model is not None and not any(row.online for row in rows) and len(failed) < len(node.trackers):
        # an empty table with exit 0 reads as "nothing wrong"; a script checking for a model needs the code
        raise GtorrentError(
            f"no peer the trackers list serves model {model!r}",
            hint="list the models served with `gtorrent peers`, or serve it with `gtorrent seed MODEL --name NAME`",
        )


NOT_LISTED = "not listed by these trackers (known from this peer's store)"
# the columns shown at any width; `--wide` (or a terminal wide enough for all) adds the rest
NARROW = ("PEER", "ROLES", "MODELS", "TRUST", "LAST SEEN", "ENDPOINT")
WIDE = ("PEER", "ROLES", "MODELS", "ENDPOINT", "REPUTATION", "STATE", "LAST C", "AGREED", "OK", "FAILED",
        "TTFT", "TOK/S", "QUEUE", "CACHE HIT", "LAST SEEN")
_NUMERIC = ("REPUTATION", "LAST C", "AGREED", "OK", "FAILED", "TTFT", "TOK/S", "QUEUE", "CACHE HIT")
_SHRINKABLE = ("MODELS", "ENDPOINT")  # cut with "…" when the terminal is narrow; the others never wrap


def short_endpoint(endpoint: str) -> str:
    """An endpoint without its scheme: every peer speaks tcp://, so it says nothing in a narrow table."""
    return endpoint.removeprefix("tcp://")


def short_roles(roles: list[str]) -> list[str]:
    """The roles without "relay" beside "seed": every seed relays (gtorrent's seeds announce both)."""
    return [role for role in roles if role != "relay"] if "seed" in roles else roles


def _trust(row: PeerRow) -> str:
    """State and reputation in one cell ("trusted 0.69"; "unverified" alone: no R yet)."""
    return state_text(row.state) + (f" {row.reputation:.2f}" if row.reputation is not None else "")


def _cells(row: PeerRow, now: float) -> dict[str, str]:
    # every string in a row came from a peer's record: data, never markup (output.remote)
    seen = row.announced if row.announced is not None else row.last_seen
    return {
        "PEER": output.remote(short_id(row.peer_id)) + ("" if row.online else " [dim]*[/]"),
        "ROLES": output.remote(",".join(row.roles)),
        "MODELS": output.remote(", ".join(m["name"] for m in row.models)) or "-",
        "TRUST": _trust(row),
        "ENDPOINT": output.remote(row.endpoint),
        "REPUTATION": f"{row.reputation:.2f}" if row.reputation is not None else "-",
        "STATE": state_text(row.state),
        "LAST C": f"{row.last_consensus:.2f}" if row.last_consensus is not None else "-",
        "AGREED": f"{row.verifiers_agreed}/{row.verifiers}" if row.verifiers else "-",
        "OK": str(row.asks_ok),
        "FAILED": str(row.asks_failed),
        "TTFT": output.human_seconds(row.median_ttft_s) if row.median_ttft_s is not None else "-",
        "TOK/S": f"{row.median_tokens_per_s:.1f}" if row.median_tokens_per_s is not None else "-",
        "QUEUE": f"{row.queue:g}" if row.queue is not None else "-",
        "CACHE HIT": cache_hit_text(row.cache_hit) if "seed" in row.roles else "-",
        "LAST SEEN": _ago(seen, now),
    }


def peers_table(rows: list[PeerRow], wide: bool = True, now: float | None = None) -> Table:
    """The `ollama ps`-style table of peers, with a total row: every column (`wide`), or the NARROW ones,
    which fit 80 columns (roles without a seed's "relay", the endpoint without its scheme; long model
    names and endpoints cut with "…").
    LAST SEEN is when the peer last announced (its record's `seq`, node.announced_at), else when this
    peer last saw it listed. Peers only this peer's store knows are marked `*`, explained under the table."""
    now = time.time() if now is None else now
    columns = WIDE if wide else NARROW
    unlisted = any(not row.online for row in rows)
    table = Table(box=None, header_style="bold", pad_edge=False, caption=f"* {NOT_LISTED}" if unlisted else None,
                  caption_justify="left", caption_style="dim")
    for column in columns:
        # narrow: one line per peer, only the model and endpoint cut short (wide: as rich fits it)
        table.add_column(column, justify="right" if column in _NUMERIC else "left",
                         no_wrap=not wide and column not in _SHRINKABLE, overflow="ellipsis")
    for row in rows:
        cells = _cells(row, now)
        if not wide:
            cells["ENDPOINT"] = output.remote(short_endpoint(row.endpoint))
            cells["ROLES"] = output.remote(",".join(short_roles(row.roles)))
        table.add_row(*(cells[column] for column in columns))
    listed = sum(1 for r in rows if r.online)
    totals = {"PEER": f"[bold]{len(rows)} peers[/]", "ROLES": f"{listed} listed",
              "STATE": f"{sum(1 for r in rows if r.state == 'untrusted')} untrusted",
              "OK": str(sum(r.asks_ok for r in rows)), "FAILED": str(sum(r.asks_failed for r in rows))}
    totals["TRUST"] = totals["STATE"]
    table.add_section()
    table.add_row(*(totals.get(column, "") for column in columns))
    return table


def fits(console: Console, table: Table) -> bool:
    """Whether `table` fits `console`'s width without shrinking a column."""
    # measured unbounded: Measurement.get caps what it returns at the options' width
    return Measurement.get(console, console.options.update_width(1 << 16), table).maximum <= console.width


def history_header(history: PeerHistory) -> str:
    reputation = "no verdict yet" if history.reputation is None else f"R {history.reputation:.2f} after {len(history.epochs)} epochs"
    line = f"[bold]{output.remote(history.peer_id)}[/]: {state_text(history.state)} ({reputation})"
    if history.untrusted_verifiers:
        line += f"; verdicts of {len(history.untrusted_verifiers)} verifiers not trusted here are left out"
    return line + "\n" + output.remote(history.trust.describe())


def history_table(history: PeerHistory) -> Table:
    """One row per epoch (and model, when the seed was judged on several): each trusted verifier's C, the
    consensus (median), how many agreed, and the seed's R after it (the worst of its models')."""
    verifiers = sorted({v for epoch in history.epochs for v in epoch.credibilities})
    several = len({epoch.model_id for epoch in history.epochs}) > 1
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("EPOCH", justify="right")
    if several:
        table.add_column("MODEL")
    for verifier in verifiers:
        table.add_column(f"C {output.remote(short_id(verifier))}", justify="right")
    for column in ("CONSENSUS", "AGREED", "R AFTER", "STATE"):
        table.add_column(column, justify="left" if column == "STATE" else "right")
    for epoch in history.epochs:
        table.add_row(
            str(epoch.epoch),
            *([output.remote(epoch.model_id[:12])] if several else []),
            *(f"{epoch.credibilities[v]:.3f}" if v in epoch.credibilities else "-" for v in verifiers),
            f"{epoch.consensus:.3f}",
            f"{epoch.agreed}/{epoch.verifiers}",
            f"{epoch.reputation:.3f}",
            state_text(state_of(epoch.reputation)),
        )
    return table
