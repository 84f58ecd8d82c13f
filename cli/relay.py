"""`gtorrent relay`: relay onion circuits for the swarm (no model, no GPU needed)."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.node import RelayEvents, run_relay

from . import output
from .common import AdvertiseOption, TrackerOption, settings


def relay_command(
    tracker: TrackerOption = None,
    bind: Annotated[str, typer.Option("--bind", help="Address to serve on (port 0: any free port).")] = "tcp://127.0.0.1:0",
    advertise: AdvertiseOption = None,
) -> None:
    """Relay onion-encrypted circuits for other peers' private asks (never loads a model)."""

    def ready(parts) -> None:  # type: ignore[no-untyped-def]
        identity, server, _ = parts
        output.info(f"[green]relaying[/] as {identity.peer_id} on {server.endpoint} · Ctrl-C to stop")

    def announced(errors: dict[str, str]) -> None:
        for url, message in errors.items():
            output.warning(f"announce to {url} failed: {message}")

    def stopping() -> None:
        output.info("stopping: telling the trackers…")

    counters = run_relay(settings(tracker, advertise), bind=bind, events=RelayEvents(ready=ready, announced=announced, stopping=stopping))
    output.info(f"relay stopped ({counters.get('circuits', 0)} circuits, {counters.get('cells', 0)} cells, {counters.get('dropped', 0)} dropped)")
