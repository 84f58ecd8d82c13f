"""`gtorrent ask`: ask the swarm, streaming the answer to the terminal.

What reaches stdout is one answer, whatever happened on the way. On a terminal the answer streams;
when a seed fails mid-answer and the ask restarts, a line on stderr says the text above was discarded.
When stdout is not a terminal (a pipe, a file) nothing is written until the answer is final, so a
restarted answer can never appear twice. Notices about the route (a degraded private route) and the
model chosen for a contested name go to stderr before any answer text.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from gtorrent.identity import b64, short_id
from gtorrent.private import DEFAULT_HOPS, DEFAULT_PATHS
from gtorrent.routing import DEFAULT_MIN_RELAY_AGE_S

from . import output
from .common import (
    AllowSameNetworkOption,
    FileOption,
    HopsOption,
    JsonOption,
    MinRelayAgeOption,
    PathsOption,
    PromptArgument,
    StrictOption,
    TopPOption,
    TrackerOption,
    VerboseOption,
    VerifierOption,
    check_path_count,
    check_top_p,
    read_prompt,
    settings,
)

if TYPE_CHECKING:
    from gtorrent.asker import AskResult


def ask_command(
    prompt: PromptArgument = None,
    file: FileOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name or id (optional when the swarm serves one).")] = None,
    tracker: TrackerOption = None,
    verifier: VerifierOption = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", min=1, max=65536,
                          help="New tokens at most (the model's context, in tokens, bounds prompt + answer).")
    ] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, max=100.0, help="0 is greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, max=1 << 20, help="Sample among the K likeliest tokens (0: all).")] = 0,
    top_p: TopPOption = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Seed for reproducible sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Format the prompt with the model's chat template.")] = False,
    direct: Annotated[bool, typer.Option("--direct", help="Go straight to the seed (faster; the seed then sees who asks).")] = False,
    paths: Annotated[int, PathsOption()] = DEFAULT_PATHS,
    hops: HopsOption = DEFAULT_HOPS,
    strict: StrictOption = False,
    allow_one_hop: Annotated[
        bool, typer.Option("--allow-one-hop", help="Let a private ask use one-hop paths (that relay sees you and the seed).")
    ] = False,
    min_relay_age: MinRelayAgeOption = DEFAULT_MIN_RELAY_AGE_S,
    allow_same_network: AllowSameNetworkOption = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Ask the swarm PROMPT (or --file, or stdin): find a seed of the model, stream its answer (retrying on another
    seed if one fails)."""
    from gtorrent.asker import AskEvents, AskRequest, ModelChoice
    from gtorrent.node import PrivacyOptions, ask

    check_top_p(top_p)
    check_path_count(paths)
    text = read_prompt(prompt, file, "ask")
    if direct:
        ignored = [flag for flag, given in (("--paths", paths != DEFAULT_PATHS), ("--hops", hops != DEFAULT_HOPS), ("--strict", strict),
                                            ("--allow-one-hop", allow_one_hop), ("--allow-same-network", allow_same_network),
                                            ("--min-relay-age", min_relay_age != DEFAULT_MIN_RELAY_AGE_S)) if given]
        if ignored:
            one = len(ignored) == 1
            output.warning(f"{', '.join(ignored)} {'shapes' if one else 'shape'} private routes, which --direct does not use: "
                           f"{'it has' if one else 'they have'} no effect",
                           f"drop --direct for a private ask, or drop {'it' if one else 'them'}")
    request = AskRequest(text, model, max_tokens, temperature, top_k, top_p, seed, chat)
    # streamed only to a terminal: elsewhere the final answer is written once, at the end
    stream = not json_output and sys.stdout.isatty()
    streamed = {"any": False}
    announced: list[dict[str, object]] = []

    def on_text(piece: str) -> None:
        streamed["any"] = True
        output.write_text(piece)

    def on_attempt(record, attempt: int) -> None:  # type: ignore[no-untyped-def]
        if verbose:
            output.info(f"[dim]asking seed {short_id(record.peer_id)} at {output.remote(record.endpoint)} (attempt {attempt})[/]")

    def on_restart(record, reason: str, lost: int) -> None:  # type: ignore[no-untyped-def]
        discarded = streamed["any"]
        if discarded:
            output.write_text("\n")
            streamed["any"] = False
        output.warning(f"the attempt with seed {short_id(record.peer_id)} failed ({reason}); restarting the answer")
        if discarded:
            output.warning("the partial answer above is discarded; the whole answer follows")

    def on_model(choice: ModelChoice) -> None:
        if choice.rivals:
            others = ", ".join(
                f"{mid[:12]} ({name}, {count} trusted seed{'' if count == 1 else 's'})" for mid, name, count in choice.rivals[:5]
            )
            what = f"the name {choice.wanted!r} is claimed by several model ids" if choice.wanted else "the swarm serves several models"
            output.warning(
                f"{what}; using {choice.name} ({choice.model_id[:12]}), the one most trusted seeds serve; also: {others}",
                "pass --model ID to choose another",
            )
        elif verbose:
            output.info(f"[dim]model {output.remote(choice.name)} ({choice.model_id[:12]})[/]")

    def on_route(record, privacy_now: dict[str, object], routes: list[list[str]]) -> None:  # type: ignore[no-untyped-def]
        if privacy_now.get("degraded") and privacy_now not in announced:
            announced.append(privacy_now)
            output.warning(
                f"privacy degraded: {privacy_now['paths']} paths of {privacy_now['hops']} hops (k={privacy_now['k']}), "
                f"asked for {paths} of {hops}",
                "start more relays, or pass --strict to refuse instead",
            )

    events = AskEvents(on_text=on_text if stream else None, on_attempt=on_attempt, on_restart=on_restart,
                       on_model=on_model, on_route=on_route)
    privacy = PrivacyOptions(direct=direct, paths=paths, hops=hops, strict=strict, allow_one_hop=allow_one_hop,
                             min_relay_age_s=min_relay_age, distinct_networks=not allow_same_network)
    result = ask(settings(tracker, verifiers=verifier, client=True), request, events, privacy=privacy)
    if json_output:
        output.print_json(
            {
                "text": result.text,
                "tokens": result.tokens,
                "seed": result.seed,
                "model_id": result.model_id,
                "finish_reason": result.finish_reason,
                "ttft_s": round(result.ttft_s, 6),
                "total_s": round(result.total_s, 6),
                "tokens_per_s": round(result.tokens_per_s, 3),
                "attempts": result.attempts,
                "failures": result.failures,
                "mode": result.mode,
                "token_ids": result.token_ids,
                "signature": b64(result.signature),  # the signer's, over the transcript (docs/PROTOCOL.md §10)
                # forwarding (issue 9): `seed`/`entry` was asked, `signer` generated and signed the answer
                "forwarded": result.forwarded,
                "entry": result.entry,
                "signer": result.signer,
                "cached_tokens": result.cached,  # null: the seed did not say (not signed: the entry's word)
                "prompt_tokens": result.prompt_tokens,
                **({"privacy": result.privacy, "path_setup_s": round(result.path_setup_s or 0.0, 6)} if result.privacy else {}),
            }
        )
        return
    output.write_text(("" if stream else result.text) + "\n")
    if verbose and result.route:
        for number, route in enumerate(result.route, 1):
            output.info(f"[dim]path {number}: you → {' → '.join(short_id(p) for p in route)} → seed {short_id(result.seed)}[/]")
    if verbose:
        output.info(f"[dim]{forwarding_line(result)}[/]")
        output.info(
            f"[dim]seed {short_id(result.seed)} · model {result.model_id[:12]} · first token "
            f"{output.human_seconds(result.ttft_s)} · {result.tokens} tokens in {output.human_seconds(result.total_s)} · "
            f"{result.tokens_per_s:.1f} tokens/s · attempts {result.attempts} · {result.mode}"
            + (f" · path setup {output.human_seconds(result.path_setup_s)}" if result.path_setup_s is not None else "")
            + "[/]"
        )


def forwarding_line(result: AskResult) -> str:
    """Whether the seed asked forwarded the ask, to whom, and the prompt tokens served from cache
    (the ids are hex from records the asker checked; the counts are ints: no markup to escape)."""
    if result.forwarded:
        line = f"forwarded: seed {short_id(result.entry)} passed the ask to seed {short_id(result.signer)}, which signed the answer"
    else:
        line = f"not forwarded: seed {short_id(result.entry)} generated the answer"
    if result.cached is not None and result.prompt_tokens is not None:
        return f"{line} · cached {result.cached}/{result.prompt_tokens} prompt tokens"
    return f"{line} · cached tokens not reported"
