"""`gtorrent seed`: serve a model to the swarm.

Order matters to a new user: the flags are checked, then the listening address is bound (node.PortHold,
so a port clash fails at once, not after minutes of loading), then the model's files are hashed (a byte
progress bar on a terminal, first use only) and loaded. While serving, one line per request finished
here (`request_line`); `-q` drops them, `--json` makes every line a JSON event on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gtorrent.forwarding import DEFAULT_POLICY, POLICIES
from gtorrent.node import DEFAULT_SEED_BIND, PortHold, SeedEvents, run_seed
from gtorrent.protocol import MAX_MODEL_NAME_CHARS, MODEL_NAME_CHARS, model_name_problem

from . import output
from .common import AdvertiseOption, ThreadsOption, TrackerOption, compute_text, load_model, settings
from .run import MODEL_HELP

NAME_HINT = f"pass --name with 1 to {MAX_MODEL_NAME_CHARS} {MODEL_NAME_CHARS}, e.g. --name my-model"
DEFAULT_KV_CACHE_MB = 256  # = runtime.prefix_cache.DEFAULT_MAX_BYTES (not imported: no runtime before a command runs)


def served_line(served) -> str:  # type: ignore[no-untyped-def]
    """One line per request finished at this seed (seed.ServedRequest); peer ids are escaped."""
    line = f"served {served.tokens} tokens · cached {served.cached}/{served.prompt_tokens} prompt tokens · " \
        f"{output.human_seconds(served.total_s)}"
    if served.forwarded_to is not None:
        line = f"forwarded to {output.remote(served.forwarded_to[:8])}: {line}"
    elif served.forwarded_by is not None:
        line = f"{line} · forwarded by {output.remote(served.forwarded_by[:8])}"
    return line


def request_line(served) -> str:  # type: ignore[no-untyped-def]
    """The per-request line: how the asker came (direct: the seed sees who asks; private: over circuits),
    then `served_line`."""
    return f"{output.remote(served.mode)} ask · {served_line(served)}"


def request_event(served) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """The per-request JSON event's fields (peer ids as sent: the event line escapes them)."""
    return {"asker": served.mode, "tokens": served.tokens, "prompt_tokens": served.prompt_tokens,
            "cached": served.cached, "total_s": round(served.total_s, 4), "forwarded_to": served.forwarded_to,
            "forwarded_by": served.forwarded_by}


def seed_command(
    model: Annotated[Path | None, typer.Argument(help=MODEL_HELP, show_default=False)] = None,
    tracker: TrackerOption = None,
    bind: Annotated[str, typer.Option("--bind", help="Address to serve on (port 0: any free port).")] = DEFAULT_SEED_BIND,
    name: Annotated[str | None, typer.Option("--name", help="Model name to announce (default: its folder name).")] = None,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", min=1, max=64, help="Requests generated at once; the rest queue.")
    ] = 1,
    device: Annotated[str, typer.Option("--device", help="auto (GPU when usable), cpu or cuda.")] = "auto",
    threads: ThreadsOption = None,
    advertise: AdvertiseOption = None,
    forwarding: Annotated[
        str, typer.Option("--forwarding", help=f"Route requests within the model's group: {', '.join(POLICIES)}.")
    ] = DEFAULT_POLICY,
    kv_cache_mb: Annotated[
        int, typer.Option("--kv-cache-mb", min=0, max=1 << 20, help="Prefix KV cache budget in MiB (0: none).")
    ] = DEFAULT_KV_CACHE_MB,
    quiet: output.QuietOption = False,
    json_events: output.EventsOption = False,
) -> None:
    """Serve MODEL to the swarm (without MODEL: the bundled demo model)."""
    from gtorrent.errors import UsageError
    from gtorrent.paths import NODE_LOCK, lock_home

    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}", hint="use --device auto, cpu or cuda")
    if forwarding not in POLICIES:
        raise UsageError(f"unknown forwarding policy {forwarding!r}", hint=f"use --forwarding {' | '.join(POLICIES)}")
    if name is not None and (problem := model_name_problem(name)):  # before loading anything
        raise UsageError(f"cannot announce the model name {name!r}: {problem}", hint=NAME_HINT)
    node = settings(tracker, advertise)
    log = output.NodeLog(quiet=quiet, json_events=json_events)
    lock_home(node.home, NODE_LOCK, "seed").release()  # refuse a busy home before a long model load
    held = PortHold(bind, node.advertise)  # a busy port or an unreachable address fails now, not after the load
    try:
        lm = load_model(model, node.home / "cache", device, threads=threads)
        if name is None and (problem := model_name_problem(lm.name)):  # the folder name is the default
            raise UsageError(f"cannot announce the folder name {lm.name!r} as the model name: {problem}", hint=NAME_HINT)
    except BaseException:
        held.release()
        raise
    log.status(f"loaded [bold]{output.remote(name or lm.name)}[/] ({lm.model_id[:12]}) in {output.human_seconds(lm.load_s)} "
               f"on {compute_text(lm)}", "loaded", model=name or lm.name, model_id=lm.model_id,
               load_s=round(lm.load_s, 3), provider=lm.provider, threads=lm.threads or None)

    def tracker_started(url: str) -> None:
        output.info(f"[yellow]no tracker answered at {url}: started one in this process[/]")

    def tracker_skipped(url: str, holder: str) -> None:
        output.warning(
            f"no tracker answered at {url}, and this home's tracker.db belongs to a running {holder}: "
            "none started here",
            "pass that tracker's address with --tracker",
        )

    def ready(seed) -> None:  # type: ignore[no-untyped-def]
        trackers = [t.address for t in seed.announcer.trackers]
        log.status(
            f"[green]seeding[/] as {seed.identity.peer_id} on {seed.server.endpoint} "
            f"to {output.remote(', '.join(trackers))} · up to {max_concurrency} at once · "
            f"forwarding {forwarding} · KV cache {kv_cache_mb} MiB · Ctrl-C to stop",
            "ready", peer_id=seed.identity.peer_id, endpoint=seed.server.endpoint, trackers=trackers,
        )

    def announced(errors: dict[str, str]) -> None:
        for url, message in errors.items():
            output.warning(f"announce to {url} failed: {message}")

    def stopping() -> None:
        output.info("stopping: telling the trackers…")

    def served(request) -> None:  # type: ignore[no-untyped-def]
        log.activity(request_line(request), "served", **request_event(request))

    def group_changed(peer_id: str, joined: bool) -> None:
        log.activity(f"group: {output.remote(peer_id[:8])} {'joined' if joined else 'left'}", "group",
                     peer_id=peer_id, joined=joined)

    events = SeedEvents(
        tracker_started=tracker_started, tracker_skipped=tracker_skipped, ready=ready, announced=announced, stopping=stopping,
        served=served, group_changed=group_changed,
    )
    counters = run_seed(node, lm, bind=bind, name=name, max_concurrency=max_concurrency, events=events,
                        forwarding=forwarding, kv_cache_mb=kv_cache_mb, held=held)
    log.status(f"seed stopped ({counters.get('received', 0)} requests, {counters.get('dropped', 0)} dropped)", "stopped",
               requests=counters.get("received", 0), dropped=counters.get("dropped", 0))
