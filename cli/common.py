"""Options and helpers shared by the commands: the networked ones' tracker/verifier options, and the
prompt (argument, `-`/piped stdin or `--file`) and sampling/path checks of `ask` and `run`.

Invariant: help and validation say the same thing. Where typer's closed ranges cannot state a bound
(top-p's open 0, --paths' S-IDA minimum with its own message) the option has no typer range, the help
states the bound and a `check_*` function here enforces it before anything runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from gtorrent.discovery import trackers_from, verifiers_from
from gtorrent.node import NodeSettings
from gtorrent.paths import home_dir

from . import output

TrackerOption = Annotated[
    list[str] | None,
    typer.Option(
        "--tracker", metavar="URL",
        help="Tracker URL: tcp://HOST:PORT, optionally followed by #PEER_ID to pin the tracker's identity; repeat "
        "for several (default: $GTORRENT_TRACKERS, else tcp://127.0.0.1:7700).",
    ),
]
VerifierOption = Annotated[
    list[str] | None,
    typer.Option(
        "--verifier", metavar="PEER_ID",
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


PromptArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="PROMPT", show_default=False,
        help="The prompt; - (or nothing, with stdin not a terminal) reads it from stdin. One final newline of "
        "stdin or --file is dropped.",
    ),
]
FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", metavar="PATH", show_default=False, help="Read the prompt from this UTF-8 file."),
]
TOP_P_HELP = "Nucleus sampling: sample from the smallest set of tokens with this mass, in (0, 1]; 1 turns it off."
TopPOption = Annotated[float, typer.Option("--top-p", metavar="P", help=TOP_P_HELP)]


ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads", min=1, max=4096, show_default=False,
        help="CPU threads the model computes with (default: ONNX Runtime's, one per core). Where several seeds "
        "or other work share the machine, give each a share, e.g. --threads 1 for each of 4 seeds on 2 cores.",
    ),
]


def load_model(
    model: Path | None, cache_dir: Path, device: str = "auto", spinner: bool = True, threads: int | None = None
) -> Any:
    """The model at `model` (None: the bundled demo), its files hashed first with a byte progress bar (a
    large model's first use takes a while; later loads find the digests in `cache_dir`), then loaded
    under a spinner, with `threads` intra-op threads (None: ONNX Runtime's default)."""
    from contextlib import nullcontext

    from gtorrent.runtime import LanguageModel
    from gtorrent.runtime.files import locate_model, model_id

    with output.byte_progress("hashing the model's files (first use only)") as progress:
        model_id(locate_model(model), cache_dir, progress)
    with output.err.status("loading model…", spinner="dots") if spinner else nullcontext():
        return LanguageModel.load(model, device=device, cache_dir=cache_dir,  # type: ignore[arg-type]
                                  intra_op_threads=threads or 0)


def compute_text(lm: Any) -> str:
    """Where a loaded model computes: its execution provider, and its threads where --threads set them."""
    if not lm.threads:
        return str(lm.provider)
    return f"{lm.provider} with {lm.threads} thread{'s' if lm.threads != 1 else ''}"


def check_top_p(top_p: float) -> None:
    """Typer ranges are closed; top-p's is open at 0, so it is checked here (and the help says so)."""
    from gtorrent.errors import UsageError

    if not 0.0 < top_p <= 1.0:  # NaN fails too
        raise UsageError(f"--top-p {top_p:g} is not in (0, 1]", hint="use --top-p 1 to disable it, e.g. --top-p 0.9")


def _drop_final_newline(text: str) -> str:
    # `echo … |` and editors end input with a newline the user did not mean as part of the prompt
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def read_prompt(prompt: str | None, file: Path | None, command: str) -> str:
    """The prompt from the argument, `--file`, or stdin (`-`, or no argument with stdin not a terminal).

    An empty prompt is refused here with a hint: it would only fail later, at a seed or in the model."""
    from gtorrent.errors import UsageError

    if file is not None:
        if prompt is not None:
            raise UsageError("both a PROMPT argument and --file were given", hint="give the prompt one way only")
        try:
            text = _drop_final_newline(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise UsageError(f"cannot read the prompt from {file} ({reason})",
                             hint="pass a readable UTF-8 text file with --file") from exc
        source = str(file)
    elif prompt == "-" or (prompt is None and sys.stdin is not None and not sys.stdin.isatty()):
        try:
            text = _drop_final_newline(sys.stdin.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the prompt from stdin ({type(exc).__name__})",
                             hint="pipe UTF-8 text, or pass --file PATH") from exc
        source = "stdin"
    elif prompt is None:
        raise UsageError(
            "no prompt given",
            hint=f'pass one: gtorrent {command} "Hello", --file PATH, or pipe it: echo Hello | gtorrent {command}',
        )
    else:
        return _refuse_empty(prompt, "", command)
    return _refuse_empty(text, f" ({source})", command)


def _refuse_empty(text: str, where: str, command: str) -> str:
    from gtorrent.errors import UsageError

    if not text:
        raise UsageError(f"the prompt is empty{where}", hint=f'give the text to continue, e.g. gtorrent {command} "Hello"')
    return text


MAX_PATHS = 16
PATHS_HELP = "Disjoint onion paths for a private ask: 3 to 16 (3 is the S-IDA threshold)."


def PathsOption(help_text: str = PATHS_HELP) -> Any:  # noqa: N802 - an Annotated option, named like one
    """`--paths` without typer's range: typer would print `1<=x<=16` or, with 3, its own message for 1 and 2;
    `check_path_count` gives both the real range (3..16) and the S-IDA reason."""
    return typer.Option("--paths", metavar="N", help=help_text)


# the private-ask options `ask` and `api` share (verify states its own help: its challenges ask as users do)
HopsOption = Annotated[int, typer.Option("--hops", min=1, max=8, help="Relays per path (at most 8).")]
StrictOption = Annotated[bool, typer.Option("--strict", help="Refuse instead of using fewer paths or hops.")]
MinRelayAgeOption = Annotated[
    float, typer.Option("--min-relay-age", min=0.0, metavar="SECONDS",
                        help="Use only relays listed at least this long (Sybil friction; 0 turns it off).")
]
AllowSameNetworkOption = Annotated[
    bool, typer.Option("--allow-same-network",
                       help="Let one path use relays of one /16 (IPv4) or /32 (IPv6) network, e.g. on a LAN.")
]


def check_path_count(paths: int) -> None:
    from gtorrent.errors import UsageError
    from gtorrent.private import DEFAULT_K

    if not 1 <= paths <= MAX_PATHS:
        raise UsageError(f"Invalid value for '--paths': {paths} is not in the range {DEFAULT_K}<=x<={MAX_PATHS}",
                         hint=f"use --paths {DEFAULT_K} to {MAX_PATHS}")
    if paths < DEFAULT_K:
        raise UsageError(f"--paths must be at least {DEFAULT_K} (the S-IDA threshold)", hint=f"use --paths {DEFAULT_K} or more")
