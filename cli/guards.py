"""`gtorrent guards`: the relays this home uses as first hops of private asks (guards.py), or forget them."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from gtorrent.identity import short_id
from gtorrent.node import guards
from gtorrent.paths import home_dir

from . import output
from .common import JsonOption


def _date(when: float) -> str:
    return datetime.fromtimestamp(when, tz=UTC).strftime("%Y-%m-%d")


def guards_command(
    reset: Annotated[bool, typer.Option("--reset", help="Forget the guards; the next private ask draws new ones.")] = False,
    json_output: JsonOption = False,
) -> None:
    """List the guard relays: the first hops of your private asks, kept for weeks so that repeated asks
    do not keep exposing you to new first relays."""
    held = guards(home_dir(), reset=reset)
    now = time.time()
    if json_output:
        output.print_json({
            "reset": reset,
            "guards": [
                {"peer_id": g.peer_id, "endpoint": g.record.endpoint, "chosen_at": g.chosen_at, "rotate_at": g.rotate_at,
                 "unlisted_since": g.unlisted_since}
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
        status = "listed" if guard.unlisted_since is None else f"unlisted for {output.human_seconds(now - guard.unlisted_since)}"
        # the endpoint came from a peer's record: data, never markup
        table.add_row(output.remote(short_id(guard.peer_id)), output.remote(guard.record.endpoint),
                      _date(guard.chosen_at), _date(guard.rotate_at), status)
    output.out.print(table)
