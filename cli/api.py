"""`gtorrent api`: an OpenAI-compatible HTTP endpoint over the swarm (gtorrent/api.py).

Each request is an ask as `gtorrent ask` makes it: private by default, `--direct` straight to the seed.
Without --api-key only a loopback address may be bound. Each request ends with a line on stderr, as the
other long-running commands say what they do (output.NodeLog: `-q` none, `--json` one JSON event per
line on stdout instead, ASCII only); what the client sent (path, model name) is shown as data, never as
markup or terminal control.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from gtorrent.api import DEFAULT_API_HOST, DEFAULT_API_PORT
from gtorrent.private import DEFAULT_HOPS, DEFAULT_PATHS
from gtorrent.routing import DEFAULT_MIN_RELAY_AGE_S

from . import output
from .common import (
    AllowSameNetworkOption,
    HopsOption,
    MinRelayAgeOption,
    PathsOption,
    StrictOption,
    TrackerOption,
    VerifierOption,
    check_path_count,
    settings,
)

if TYPE_CHECKING:
    from gtorrent.api import RequestLog


def request_line(log: RequestLog) -> str:
    """The human line of one request (rich markup; the client's strings escaped by `output.remote`)."""
    parts = [f"{log.status} {output.remote(log.method)} {output.remote(log.path)}"]
    if log.model is not None:
        parts.append(f"model {output.remote(log.model)}" + (" (stream)" if log.stream else ""))
    if log.completion_tokens is not None:
        prompt = "?" if log.prompt_tokens is None else str(log.prompt_tokens)
        parts.append(f"{prompt} prompt + {log.completion_tokens} answer tokens")
    if log.error is not None:
        parts.append(f"[red]{output.remote(log.error)}[/]")
    parts.append(output.human_seconds(log.seconds))
    return " · ".join(parts)


def request_event(log: RequestLog) -> dict[str, Any]:
    """The fields of one request's JSON event (`"event": "request"`), the client's strings as sent."""
    return {"method": log.method, "path": log.path, "status": log.status,
            "model": log.model, "model_id": log.model_id, "stream": log.stream, "prompt_tokens": log.prompt_tokens,
            "completion_tokens": log.completion_tokens, "seconds": round(log.seconds, 6), "error": log.error}


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
    paths: Annotated[int, PathsOption()] = DEFAULT_PATHS,
    hops: HopsOption = DEFAULT_HOPS,
    strict: StrictOption = False,
    min_relay_age: MinRelayAgeOption = DEFAULT_MIN_RELAY_AGE_S,
    allow_same_network: AllowSameNetworkOption = False,
    quiet: output.QuietOption = False,
    json_events: output.EventsOption = False,
) -> None:
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions) over the swarm."""
    from gtorrent.api import run_api
    from gtorrent.node import PrivacyOptions

    check_path_count(paths)  # before anything binds: as `ask` checks it
    privacy = PrivacyOptions(direct=direct, paths=paths, hops=hops, strict=strict,
                             min_relay_age_s=min_relay_age, distinct_networks=not allow_same_network)
    mode = "direct" if direct else "private"
    log = output.NodeLog(quiet=quiet, json_events=json_events)

    def ready(url: str) -> None:
        log.status(f"[green]api[/] on {url} ({mode} asks) · Ctrl-C to stop", "ready", url=url, mode=mode)

    def on_request(request: RequestLog) -> None:
        log.activity(request_line(request), "request", **request_event(request))

    run_api(settings(tracker, verifiers=verifier, client=True), bind, privacy, api_key or None, ready,
            None if quiet else on_request)
    log.status("api stopped", "stopped")
