"""`gtorrent tracker`: run a tracker."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.discovery import DEFAULT_TRACKER
from gtorrent.node import run_tracker
from gtorrent.pow import MAX_POW_BITS

from . import output
from .common import AdvertiseOption, settings


def tracker_command(
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on (port 0: any free port).")] = DEFAULT_TRACKER,
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
) -> None:
    """Run a tracker: keep the signed records peers announce and answer queries by model and role."""

    def ready(service) -> None:  # type: ignore[no-untyped-def]
        # set before the first message is served: run_tracker calls this before its loop goes on
        service.table.pow_bits = pow_bits
        record = service.own_record()
        restored = f", {service.table.active_count()} records restored" if service.loaded else ""
        work = f", new peers need {pow_bits} bits of proof of work" if pow_bits else ""
        admitted = service.verdicts.admitted
        verdicts = f", verdicts from {len(admitted)} verifiers" if admitted is not None else ", verdicts from any verifier"
        output.info(f"[green]tracker[/] {service.url}  (pinned: {service.url}#{record.peer_id}){restored}{work}{verdicts}")
        output.info("[dim]Ctrl-C to stop[/]")

    counters = run_tracker(settings(None, advertise, verifier), bind, ready)
    output.info(f"tracker stopped ({counters.get('received', 0)} messages, {counters.get('dropped', 0)} dropped)")
