"""`gtorrent api`: an OpenAI-compatible HTTP endpoint over the swarm (gtorrent/api.py).

Each request is an ask as `gtorrent ask` makes it: private by default, `--direct` straight to the seed.
Without --api-key only a loopback address may be bound.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.api import DEFAULT_API_HOST, DEFAULT_API_PORT
from gtorrent.routing import DEFAULT_MIN_RELAY_AGE_S

from . import output
from .common import TrackerOption, VerifierOption, settings


def api_command(
    bind: Annotated[
        str, typer.Option("--bind", metavar="HOST:PORT",
                          help="Address to serve HTTP on (port 0: any free port; a non-loopback HOST needs --api-key).")
    ] = f"{DEFAULT_API_HOST}:{DEFAULT_API_PORT}",
    tracker: TrackerOption = None,
    verifier: VerifierOption = None,
    direct: Annotated[bool, typer.Option("--direct", help="Ask seeds directly (faster; seeds then see this machine).")] = False,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="GTORRENT_API_KEY", metavar="KEY",
                                 help="Require `Authorization: Bearer KEY` (default: $GTORRENT_API_KEY; none on loopback).")
    ] = None,
    paths: Annotated[int, typer.Option("--paths", min=1, max=16, help="Disjoint onion paths for a private ask.")] = 4,
    hops: Annotated[int, typer.Option("--hops", min=1, max=8, help="Relays per path (at most 8).")] = 3,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse instead of using fewer paths or hops.")] = False,
    min_relay_age: Annotated[
        float, typer.Option("--min-relay-age", min=0.0, metavar="SECONDS",
                            help="Use only relays listed at least this long (Sybil friction; 0 turns it off).")
    ] = DEFAULT_MIN_RELAY_AGE_S,
    allow_same_network: Annotated[
        bool, typer.Option("--allow-same-network",
                           help="Let one path use relays of one /16 (IPv4) or /32 (IPv6) network, e.g. on a LAN.")
    ] = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the swarm."""
    from gtorrent.api import run_api
    from gtorrent.node import PrivacyOptions

    privacy = PrivacyOptions(direct=direct, paths=paths, hops=hops, strict=strict,
                             min_relay_age_s=min_relay_age, distinct_networks=not allow_same_network)
    mode = "direct" if direct else "private"

    def ready(url: str) -> None:
        output.info(f"[green]api[/] on {url} ({mode} asks) · Ctrl-C to stop")

    run_api(settings(tracker, verifiers=verifier, client=True), bind, privacy, api_key or None, ready)
