"""`gtorrent tracker`: run a tracker.

While running, one line per round (`--log-interval`, 30 s: one round of re-announces) in which announces
arrived or records expired (node.TrackerRound); `-q` drops them, `--json` makes every line a JSON event."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.discovery import DEFAULT_TRACKER
from gtorrent.node import TRACKER_ROUND_S, TrackerRound, run_tracker
from gtorrent.pow import MAX_POW_BITS

from . import output
from .common import AdvertiseOption, settings


def tracker_command(
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on (port 0: any free port).")] = DEFAULT_TRACKER,
    curve_port: Annotated[
        int | None,
        typer.Option("--curve-port", min=0, max=65535, metavar="PORT", show_default=False,
                     help="Port of the tracker's CurveZMQ socket, where peers announce and query (the --bind port "
                     "serves only the tracker's key) [default: the --bind port + 1; 0: any free port]."),
    ] = None,
    advertise: AdvertiseOption = None,
    pow_bits: Annotated[
        int,
        typer.Option("--pow-bits", min=0, max=MAX_POW_BITS,
                     help="Proof of work a new peer identity must carry, in bits (each bit doubles its cost; 0: none)."),
    ] = 0,
    verifier: Annotated[
        list[str] | None,
        typer.Option("--verifier", help="Peer id of a verifier whose verdicts this tracker accepts; repeat for several "
                     "(none: any verifier's)."),
    ] = None,
    quiet: output.QuietOption = False,
    json_events: output.EventsOption = False,
    log_interval: Annotated[float, output.LogIntervalOption("what the tracker did")] = TRACKER_ROUND_S,
) -> None:
    """Run a tracker: keep the signed records peers announce and answer queries by model and role."""
    log = output.NodeLog(quiet=quiet, json_events=json_events)

    def ready(service) -> None:  # type: ignore[no-untyped-def]
        # set before the first message is served: run_tracker calls this before its loop goes on
        service.table.pow_bits = pow_bits
        record = service.own_record()
        restored = f", {service.table.active_count()} records restored" if service.loaded else ""
        work = f", new peers need {pow_bits} bits of proof of work" if pow_bits else ""
        admitted = service.verdicts.admitted
        verdicts = f", verdicts from {len(admitted)} verifiers" if admitted is not None else ", verdicts from any verifier"
        log.status(f"[green]tracker[/] {service.url}  (pinned: {service.url}#{record.peer_id}){restored}{work}{verdicts}",
                   "ready", url=service.url, peer_id=record.peer_id, peers=service.table.active_count())
        output.info("[dim]Ctrl-C to stop[/]")

    def round_done(done: TrackerRound) -> None:
        log.activity(round_line(done), "round", announces=done.announces, refused=done.refused,
                     expired=done.expired, peers=done.peers, interval_s=done.interval_s)

    counters = run_tracker(settings(None, advertise, verifier), bind, ready, curve_port, on_round=round_done,
                           round_s=log_interval)
    log.status(f"tracker stopped ({counters.get('received', 0)} messages, {counters.get('dropped', 0)} dropped)",
               "stopped", messages=counters.get("received", 0), dropped=counters.get("dropped", 0))


def round_line(done: TrackerRound) -> str:
    """`12 announces (1 refused) · 2 expired · 14 peers listed, in 30 s`."""
    refused = f" ({done.refused} refused)" if done.refused else ""
    return (f"{done.announces} announces{refused} · {done.expired} expired · {done.peers} peers listed, "
            f"in {done.interval_s:g} s")
