"""`gtorrent id`: create on first use, then show, this peer's identity."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from gtorrent.identity import load_or_create_identity
from gtorrent.paths import home_dir

from . import output


def id_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print the identity as JSON.")] = False,
) -> None:
    """Show this peer's identity (peer id and public keys), creating it on first use."""
    home = home_dir()
    identity, created = load_or_create_identity(home)
    info = {**identity.public_info(), "home": str(home), "created": created}
    if json_output:
        output.print_json(info)
        return
    if created:
        output.info(f"[green]created[/] a new identity in {output.remote(str(home))}")
    table = Table(show_header=False, box=None, pad_edge=False)
    for key in ("peer_id", "home", "signing_key", "curve_key"):
        table.add_row(f"[bold]{key}[/]", output.remote(str(info[key])))  # a home path may hold "["
    output.out.print(table)
