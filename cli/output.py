"""Terminal output shared by every command: the answer on stdout, everything else on stderr.

Answers stream to stdout as plain text (pipe-friendly); progress, warnings, errors and `--verbose`
statistics go to stderr through rich, so `gtorrent run "…" > answer.txt` captures only the answer.

Invariant: text that came from another peer (model names, endpoints, answer text, error messages) is
data, never markup or terminal control. Before it reaches the terminal it goes through `remote()`
(for rich markup: controls removed, markup escaped) or `answer_text()` (plain stdout: controls removed
but newlines and tabs kept). A peer that names its model `[/x]` or `\\x1b]0;…\\x07` can neither crash a
table nor retitle, recolour or rewrite the user's terminal. JSON output keeps every string exactly
(a consumer gets the remote bytes back) but escapes the characters JSON itself leaves raw and a terminal
would obey.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

# emoji=False: ":name:" in a remote string is text, not an emoji code
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
# tables and listings; piped output is not squeezed to 80 columns
out = Console(highlight=False, soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 200)

# Bidi embeddings, overrides and isolates reorder what follows them on screen ("Trojan Source"); lone
# surrogates cannot be encoded to UTF-8 at all (writing one would crash the command).
_BIDI_CONTROLS = "\u202a-\u202e\u2066-\u2069"
_BIDI_MARKS = "\u061c\u200e\u200f"
_SURROGATES = "\ud800-\udfff"
# C0 controls (ESC, BEL, CR, backspace…), DEL and C1 controls (0x9b is a one-byte CSI on some terminals)
_LINE_BREAKS = re.compile("[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
_REMOTE_DROP = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI_CONTROLS}{_BIDI_MARKS}]+")
_ANSWER_DROP = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI_CONTROLS}]+")
_LONE_SURROGATE = re.compile(f"[{_SURROGATES}]")
# what json.dumps(ensure_ascii=False) leaves unescaped but a terminal may act on
_JSON_UNSAFE = re.compile(f"[\x7f-\x9f{_BIDI_CONTROLS}{_BIDI_MARKS}\u2028\u2029{_SURROGATES}]")


def plain(text: str) -> str:
    """A remote string as one line of plain text: breaks and tabs become spaces, other controls go."""
    text = _LINE_BREAKS.sub(" ", text)
    return _LONE_SURROGATE.sub("\ufffd", _REMOTE_DROP.sub("", text))


def remote(text: str) -> str:
    """A remote string, ready to put inside rich markup (tables, `info`, f-strings with `[bold]…[/]`)."""
    return escape(plain(text))


def answer_text(text: str) -> str:
    """Answer text for stdout: newlines and tabs kept, every other control character removed.

    Stateless per character, so an escape sequence split across two streamed pieces is still
    defused: its ESC is removed and the rest is printed as the harmless text it then is.
    """
    return _LONE_SURROGATE.sub("\ufffd", _ANSWER_DROP.sub("", text))


def write_text(piece: str) -> None:
    """Write (a piece of) answer text to stdout, made safe with `answer_text`."""
    sys.stdout.write(answer_text(piece))
    sys.stdout.flush()


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_text(value: Any) -> str:
    """`value` as indented JSON whose every string decodes back exactly, with nothing a terminal obeys.

    json.dumps escapes C0 controls (ESC included) but, with ensure_ascii=False, leaves DEL, C1 controls,
    bidi controls and lone surrogates raw. They can only occur inside JSON strings, where `\\uXXXX` means
    the same character, so escaping them here changes no decoded value.
    """
    return _JSON_UNSAFE.sub(_json_escape, json.dumps(value, indent=2, ensure_ascii=False))


def print_json(value: Any) -> None:
    sys.stdout.write(json_text(value) + "\n")
    sys.stdout.flush()


def event_text(value: dict[str, Any]) -> str:
    """`value` as one line of JSON, ASCII only: every non-ASCII character (remote text included) is a
    `\\uXXXX` escape, and so is DEL, the one ASCII control json.dumps leaves raw."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("\x7f", "\\u007f")


def print_event(value: dict[str, Any]) -> None:
    """One JSON event on one stdout line (`--json` of the long-running commands)."""
    sys.stdout.write(event_text(value) + "\n")
    sys.stdout.flush()


# the long-running commands' output flags (seed, tracker, relay)
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No activity lines (start, stop, warnings and errors still show).")
]
EventsOption = Annotated[
    bool, typer.Option("--json", help="Print each line as one JSON event on stdout (start and stop lines show on stderr too).")
]


def LogIntervalOption(what: str) -> Any:  # noqa: N802 - an Annotated option, named like one
    """`--log-interval SECONDS` of the nodes that sum their activity up (tracker, relay): say `what` at most
    this often."""
    return typer.Option("--log-interval", min=1.0, max=3600.0, metavar="SECONDS", help=f"Say {what} at most this often.")


class NodeLog:
    """What a long-running node (seed, tracker, relay) says it does.

    Text goes to stderr; with `json_events`, each line is one JSON event on stdout instead (`print_event`;
    "event" names it, "ts" is the Unix time), start-up and stop lines showing on stderr as well. Activity
    lines (a request served, a tracker's round, a relay's circuits) start with the local time; `quiet`
    drops them, while start-up, stop, warnings and errors always show. Callers put remote strings
    through `remote` in text and pass them raw in events (the event line escapes them)."""

    def __init__(self, *, quiet: bool = False, json_events: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.quiet, self.json_events, self.clock = quiet, json_events, clock

    def status(self, text: str, event: str, **fields: Any) -> None:
        """A start-up or stop line: always shown."""
        info(text)
        if self.json_events:
            print_event({"event": event, "ts": round(self.clock(), 3), **fields})

    def activity(self, text: str, event: str, **fields: Any) -> None:
        """One activity line (unless quiet): `HH:MM:SS text` on stderr, or with json the event alone."""
        if self.quiet:
            return
        now = self.clock()
        if self.json_events:
            print_event({"event": event, "ts": round(now, 3), **fields})
        else:
            info(f"[dim]{time.strftime('%H:%M:%S', time.localtime(now))}[/] {text}")


@contextmanager
def byte_progress(description: str, console: Console | None = None) -> Iterator[Callable[[int, int], None]]:
    """A progress callback `(bytes done, total)` that draws a transient bar with rate and time left on
    `console` (stderr by default), only when it is a terminal: piped or logged output gets nothing (a
    bar there is a stream of control sequences). The bar disappears when done."""
    console = console or err
    if not console.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn(escape(description)), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        task: TaskID | None = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task(description, total=total)
            progress.update(task, completed=done, total=total)

        yield update


def error(message: str, hint: str | None = None) -> None:
    """`error: …` / `hint: …` on stderr; both may quote remote text, so both go through `remote`."""
    err.print(f"[bold red]error:[/] {remote(message)}")
    if hint:
        err.print(f"[yellow]hint:[/] {remote(hint)}")


def warning(message: str, hint: str | None = None) -> None:
    err.print(f"[bold yellow]warning:[/] {remote(message)}")
    if hint:
        err.print(f"[yellow]hint:[/] {remote(hint)}")


def info(message: str) -> None:
    """Print rich markup to stderr. Callers wrap every remote value in `remote()`."""
    err.print(message)


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"
