"""`gtorrent guards`: the relays this home uses as first hops of private asks (guards.py), or forget them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from gtorrent.identity import short_id
from gtorrent.node import guards

from . import output
from .common import JsonOption, TrackerOption, settings


def _date(when: float) -> str:
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%d")


def guards_command(
    tracker: TrackerOption = None,
    reset: Annotated[bool, typer.Option("--reset", help="Forget the guards; the next private ask draws new ones.")] = False,
    json_output: JsonOption = False,
) -> None:
    """List the guard relays of the trackers' swarm: the first hops of your private asks, kept for weeks
    so that repeated asks do not keep exposing you to new first relays."""
    held = guards(settings(tracker), reset=reset)
    now = time.time()
    if json_output:
        output.print_json({
            "reset": reset,
            "guards": [
                {"peer_id": g.peer_id, "endpoint": g.record.endpoint, "chosen_at": g.chosen_at, "rotate_at": g.rotate_at,
                 "unreachable_since": g.unreachable_since}
                for g in held
            ],
        })
        return
    if reset:
        output.info(f"forgot {len(held)} guard{'' if len(held) == 1 else 's'}; the next private ask draws new ones")
        return
    if not held:
        output.info("no guards yet: the first private ask (`gtorrent ask`) chooses them")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("PEER", "ENDPOINT", "CHOSEN", "ROTATES", "STATUS"):
        table.add_column(column)
    for guard in held:
        silent = guard.unreachable_since
        status = "answering" if silent is None else f"silent for {output.human_seconds(now - silent)}"
        # the endpoint came from a peer's record: data, never markup
        table.add_row(output.remote(short_id(guard.peer_id)), output.remote(guard.record.endpoint),
                      _date(guard.chosen_at), _date(guard.rotate_at), status)
    output.out.print(table)
