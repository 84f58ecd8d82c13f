"""`gtorrent relay`: relay onion circuits for the swarm (no model, no GPU needed).

While relaying, one line per report interval in which circuits opened or closed or cells moved
(node.RelayActivity, at most one every `--log-interval` seconds); `-q` drops them, `--json` makes every
line a JSON event on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.node import RELAY_REPORT_S, RelayActivity, RelayEvents, run_relay

from . import output
from .common import AdvertiseOption, TrackerOption, settings


def relay_command(
    tracker: TrackerOption = None,
    bind: Annotated[str, typer.Option("--bind", help="Address to serve on (port 0: any free port).")] = "tcp://127.0.0.1:0",
    advertise: AdvertiseOption = None,
    quiet: output.QuietOption = False,
    json_events: output.EventsOption = False,
    log_interval: Annotated[float, output.LogIntervalOption("what was relayed")] = RELAY_REPORT_S,
) -> None:
    """Relay onion-encrypted circuits for other peers' private asks (never loads a model)."""
    log = output.NodeLog(quiet=quiet, json_events=json_events)

    def ready(parts) -> None:  # type: ignore[no-untyped-def]
        identity, server, _ = parts
        log.status(f"[green]relaying[/] as {identity.peer_id} on {server.endpoint} · Ctrl-C to stop", "ready",
                   peer_id=identity.peer_id, endpoint=server.endpoint)

    def announced(errors: dict[str, str]) -> None:
        for url, message in errors.items():
            output.warning(f"announce to {url} failed: {message}")

    def stopping() -> None:
        output.info("stopping: telling the trackers…")

    def activity(moved: RelayActivity) -> None:
        log.activity(activity_line(moved), "circuits", opened=moved.opened, closed=moved.closed, open=moved.open,
                     cells=moved.cells, dropped=moved.dropped, interval_s=moved.interval_s)

    events = RelayEvents(ready=ready, announced=announced, stopping=stopping, activity=activity)
    counters = run_relay(settings(tracker, advertise), bind=bind, events=events, report_s=log_interval)
    log.status(f"relay stopped ({counters.get('circuits', 0)} circuits, {counters.get('cells', 0)} cells, "
               f"{counters.get('dropped', 0)} dropped)", "stopped", circuits=counters.get("circuits", 0),
               cells=counters.get("cells", 0), dropped=counters.get("dropped", 0))


def activity_line(moved: RelayActivity) -> str:
    """`circuits +3 -1 (5 open) · 120 cells · 2 dropped in 10 s` (dropped only when some were)."""
    line = f"circuits +{moved.opened} -{moved.closed} ({moved.open} open) · {moved.cells} cells"
    if moved.dropped:
        line += f" · {moved.dropped} dropped"
    return f"{line} in {moved.interval_s:g} s"
