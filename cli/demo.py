"""`gtorrent demo`: a whole swarm on loopback, one private ask, the route and the peers, then stop."""

from __future__ import annotations

from typing import Annotated

import typer

from gtorrent.identity import short_id

from . import output
from .peers import peers_table

DEFAULT_PROMPT = "The for statement"


def demo_command(
    prompt: Annotated[str, typer.Argument(help="The prompt to ask privately.")] = DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, max=400, help="New tokens at most.")] = 64,
) -> None:
    """Start a tracker, 3 seeds and 10 relays on loopback, ask privately over 4 paths x 3 hops, stop."""
    from gtorrent.asker import AskEvents
    from gtorrent.demo import DemoEvents, run_demo

    status = output.err.status("starting a swarm on 127.0.0.1…", spinner="dots")
    status.start()
    streaming = {"started": False}

    def progress(message: str) -> None:
        output.info(f"[dim]· {output.remote(message)}[/]")

    def on_attempt(record, attempt: int) -> None:  # type: ignore[no-untyped-def]
        status.update(f"building 4 onion paths to seed {output.remote(short_id(record.peer_id))}…")

    def on_text(piece: str) -> None:
        if not streaming["started"]:
            status.stop()
            streaming["started"] = True
            output.info(f"[bold]{output.remote(prompt)}[/]")
        output.write_text(piece)

    def on_restart(record, reason: str, lost: int) -> None:  # type: ignore[no-untyped-def]
        output.warning(f"seed {short_id(record.peer_id)} failed ({reason}); asking again on fresh paths")

    events = DemoEvents(progress=progress, ask=AskEvents(on_text=on_text, on_attempt=on_attempt, on_restart=on_restart))
    try:
        result = run_demo(prompt, max_tokens, events)
    finally:
        status.stop()
    answer = result.answer
    output.write_text("\n\n")
    privacy = answer.privacy or {}
    output.info(
        f"[green]answered privately[/] by seed {output.remote(short_id(answer.seed))} over {privacy.get('paths')} paths x "
        f"{privacy.get('hops')} hops (any {privacy.get('k')} suffice) · swarm up in {output.human_seconds(result.startup_s)} · "
        f"paths built in {output.human_seconds(answer.path_setup_s or 0.0)} · first token {output.human_seconds(answer.ttft_s)} · "
        f"{answer.tokens} tokens in {output.human_seconds(answer.total_s)} · transcript signature verified"
    )
    for number, route in enumerate(answer.route, 1):
        hops = " → ".join(short_id(p) for p in route)
        output.info(f"  path {number}: you → {output.remote(hops)} → seed {output.remote(short_id(answer.seed))}")
    output.out.print(peers_table(result.peers))
