"""`gtorrent tracker`: run a tracker."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.discovery import DEFAULT_TRACKER
from gtorrent.node import run_tracker

from . import output
from .common import AdvertiseOption, settings


def tracker_command(
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on (port 0: any free port).")] = DEFAULT_TRACKER,
    advertise: AdvertiseOption = None,
) -> None:
    """Run a tracker: keep the signed records peers announce and answer queries by model and role."""

    def ready(service) -> None:  # type: ignore[no-untyped-def]
        record = service.own_record()
        restored = f", {service.table.active_count()} records restored" if service.loaded else ""
        output.info(f"[green]tracker[/] {service.url}  (pinned: {service.url}#{record.peer_id}){restored}")
        output.info("[dim]Ctrl-C to stop[/]")

    counters = run_tracker(settings(None, advertise), bind, ready)
    output.info(f"tracker stopped ({counters.get('received', 0)} messages, {counters.get('dropped', 0)} dropped)")
