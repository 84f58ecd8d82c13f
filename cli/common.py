"""Options and helpers shared by the networked commands."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.discovery import trackers_from
from gtorrent.node import NodeSettings
from gtorrent.paths import home_dir

TrackerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tracker",
        help="Tracker URL tcp://HOST:PORT[#PEER_ID]; repeat for several (default: $GTORRENT_TRACKERS, else tcp://127.0.0.1:7700).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Print details of what happens.")]
AdvertiseOption = Annotated[
    str | None,
    typer.Option("--advertise", help="Host or IP other machines reach this one at (needed with --bind on 0.0.0.0)."),
]


def settings(trackers: list[str] | None, advertise: str | None = None) -> NodeSettings:
    urls, explicit = trackers_from(trackers)
    return NodeSettings(home=home_dir(), trackers=urls, trackers_explicit=explicit, advertise=advertise)
