"""Terminal output shared by every command: the answer on stdout, everything else on stderr.

Answers stream to stdout as plain text (pipe-friendly); progress, warnings, errors and `--verbose`
statistics go to stderr through rich, so `gtorrent run "…" > answer.txt` captures only the answer.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, highlight=False, soft_wrap=True)
# tables and listings; piped output is not squeezed to 80 columns
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def write_text(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error(message: str, hint: str | None = None) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}")
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}")


def warning(message: str, hint: str | None = None) -> None:
    err.print(f"[bold yellow]warning:[/] {escape(message)}")
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}")


def info(message: str) -> None:
    err.print(message)


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"
