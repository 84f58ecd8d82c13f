"""Options and helpers shared by the networked commands."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.discovery import trackers_from, verifiers_from
from gtorrent.node import NodeSettings
from gtorrent.paths import home_dir

TrackerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tracker",
        help="Tracker URL tcp://HOST:PORT[#PEER_ID]; repeat for several (default: $GTORRENT_TRACKERS, else tcp://127.0.0.1:7700).",
    ),
]
VerifierOption = Annotated[
    list[str] | None,
    typer.Option(
        "--verifier",
        help="Peer id of a verifier whose verdicts count; repeat for several (default: $GTORRENT_VERIFIERS, "
        "comma-separated, else those the trackers admit).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Print details of what happens.")]
AdvertiseOption = Annotated[
    str | None,
    typer.Option("--advertise", help="Host or IP other machines reach this one at (needed with --bind on 0.0.0.0)."),
]


def settings(
    trackers: list[str] | None, advertise: str | None = None, verifiers: list[str] | None = None, *,
    client: bool = False,
) -> NodeSettings:
    """`client`: a command that weighs verdicts (`ask`, `peers`): --verifier, else $GTORRENT_VERIFIERS; other
    commands take `verifiers` from their own flags only (a tracker's admitted list is never read from the
    environment a user set for their asks)."""
    urls, explicit = trackers_from(trackers)
    chosen = verifiers_from(verifiers) if client or verifiers else None  # non-empty flags never read the env
    return NodeSettings(home=home_dir(), trackers=urls, trackers_explicit=explicit, advertise=advertise,
                        verifiers=chosen)
