"""The typer application and the one error boundary of the CLI.

`main()` runs the command tree in non-standalone mode so that every failure comes back here: library
errors (`GtorrentError`) and usage errors (bad flags) are printed as `error: …` / `hint: …` with their
exit codes, anything unexpected as a one-line internal error. A traceback appears only with --debug
(or GTORRENT_DEBUG=1). Commands import the model runtime lazily, so `gtorrent id` never loads ONNX
Runtime.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer
from typer import _click as click  # typer >= 0.29 vendors click
from typer.core import TyperOption

from gtorrent import __version__
from gtorrent.environment import DUAL_INSTALL_HINT, DUAL_INSTALL_WARNING, both_ort_builds_installed
from gtorrent.errors import GtorrentError

from . import output
from .api import api_command
from .ask import ask_command
from .demo import demo_command
from .guards import guards_command
from .identity import id_command
from .peers import peers_command
from .relay import relay_command
from .run import run_command
from .seed import seed_command
from .tracker import tracker_command
from .verify import verify_command

HELP_OPTION_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="gtorrent",
    help="Serve and use large language models over a peer-to-peer swarm.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals can hold keys
    context_settings={"help_option_names": HELP_OPTION_NAMES},
)


def _version(value: bool) -> None:
    if value:
        output.write_text(f"gtorrent {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """gtorrent: serve and use LLMs over a peer-to-peer swarm."""


app.command("id")(id_command)
app.command("run")(run_command)
app.command("tracker")(tracker_command)
app.command("seed")(seed_command)
app.command("relay")(relay_command)
app.command("ask")(ask_command)
app.command("api")(api_command)
app.command("peers")(peers_command)
app.command("guards")(guards_command)
app.command("demo")(demo_command)
app.command("verify")(verify_command)


def _debug_requested(argv: Sequence[str]) -> bool:
    args = list(argv[: argv.index("--")] if "--" in argv else argv)
    return "--debug" in args or os.environ.get("GTORRENT_DEBUG", "") not in ("", "0")


def _without_debug(argv: Sequence[str]) -> list[str]:
    """argv less `--debug` (before any `--`): the boundary reads it, so it works after the command too
    (`gtorrent ask "…" --debug`), where the root callback's option would be an unknown flag."""
    end = argv.index("--") if "--" in argv else len(argv)
    return [arg for arg in argv[:end] if arg != "--debug"] + list(argv[end:])


def _tidy_help(command: click.Command) -> None:
    """Flags take no value: typer would print a `<bool>` type label beside each (`--chat <bool>`). The help
    option is made on first use and cached, so making it here (with the app's names) tidies it too."""
    help_option = command.get_help_option(click.Context(command, help_option_names=HELP_OPTION_NAMES))
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _tidy_help(sub)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gtorrent` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(args)
    args = _without_debug(args)
    if both_ort_builds_installed():
        output.warning(DUAL_INSTALL_WARNING, DUAL_INSTALL_HINT)
    command = typer.main.get_command(app)
    _tidy_help(command)
    try:
        result = command.main(args=args, prog_name="gtorrent", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        return 2  # the help is printed: there is no error to add (an empty `error:` line was shown)
    except GtorrentError as exc:
        if debug:
            output.err.print_exception()
        output.error(exc.message, exc.hint)
        return exc.exit_code
    except click.exceptions.UsageError as exc:
        if debug:
            output.err.print_exception()
        path = exc.ctx.command_path if exc.ctx is not None else "gtorrent"
        output.error(exc.format_message(), f"see `{path} --help`")
        return 2
    except typer.Abort:
        output.error("aborted")
        return 130
    except KeyboardInterrupt:
        output.error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: never a bare traceback for users
        if debug:
            output.err.print_exception()
        output.error(f"internal error: {type(exc).__name__}: {exc}", "run again with --debug and report the traceback")
        return 70
    return result if isinstance(result, int) else 0


def entry() -> None:
    sys.exit(main())
