"""`gtorrent peers [PEER_ID]`: peers known to the trackers and to this peer's store, with their verification
reputation and trust state; with a peer id, that peer's verdict history from the local store."""

from __future__ import annotations

import time
from typing import Annotated

import typer
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
        output.out.print(peers_table(rows))
    if model is not None and not any(row.online for row in rows) and len(failed) < len(node.trackers):
        # an empty table with exit 0 reads as "nothing wrong"; a script checking for a model needs the code
        raise GtorrentError(
            f"no peer the trackers list serves model {model!r}",
            hint="list the models served with `gtorrent peers`, or serve it with `gtorrent seed MODEL --name NAME`",
        )


def peers_table(rows: list[PeerRow]) -> Table:
    """The `ollama ps`-style table of peers, with a total row."""
    now = time.time()
    table = Table(box=None, header_style="bold", pad_edge=False)
    numeric = ("REPUTATION", "LAST C", "AGREED", "OK", "FAILED", "TTFT", "TOK/S", "QUEUE", "CACHE HIT")
    columns = ("PEER", "ROLES", "MODELS", "ENDPOINT", "REPUTATION", "STATE", "LAST C", "AGREED", "OK", "FAILED",
               "TTFT", "TOK/S", "QUEUE", "CACHE HIT", "LAST SEEN")
    for column in columns:
        table.add_column(column, justify="right" if column in numeric else "left")
    for row in rows:
        # every string in a row came from a peer's record: data, never markup (output.remote)
        table.add_row(
            output.remote(short_id(row.peer_id)) + ("" if row.online else " [dim](offline)[/]"),
            output.remote(",".join(row.roles)),
            output.remote(", ".join(m["name"] for m in row.models)) or "-",
            output.remote(row.endpoint),
            f"{row.reputation:.2f}" if row.reputation is not None else "-",
            state_text(row.state),
            f"{row.last_consensus:.2f}" if row.last_consensus is not None else "-",
            f"{row.verifiers_agreed}/{row.verifiers}" if row.verifiers else "-",
            str(row.asks_ok),
            str(row.asks_failed),
            output.human_seconds(row.median_ttft_s) if row.median_ttft_s is not None else "-",
            f"{row.median_tokens_per_s:.1f}" if row.median_tokens_per_s is not None else "-",
            f"{row.queue:g}" if row.queue is not None else "-",
            cache_hit_text(row.cache_hit) if "seed" in row.roles else "-",
            _ago(row.last_seen, now),
        )
    online = sum(1 for r in rows if r.online)
    untrusted = sum(1 for r in rows if r.state == "untrusted")
    table.add_section()
    table.add_row(
        f"[bold]{len(rows)} peers[/]", f"{online} online", "", "", "", f"{untrusted} untrusted", "", "",
        str(sum(r.asks_ok for r in rows)), str(sum(r.asks_failed for r in rows)), "", "", "", "", "",
    )
    return table


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
