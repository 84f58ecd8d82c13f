"""What a new user trips over (issue 10, item 4), each tried as a new user would: hints that name a fix
that applies, help that matches validation, prompts from stdin and files, flags that do nothing in a mode.

Most cases run in-process through the real entry point (`cli`); stdin and the tracker cases run the
installed console script and a real tracker process (tests/procs.py)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .procs import GTORRENT, start_tracker

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "tcp://127.0.0.1:9"  # nothing listens on the discard port
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
BACKTICKED = re.compile(r"`([^`]*)`")
OTHER_TOOL = re.compile(r"\b(?:pip|optimum-cli)\s[^`(;]*")  # another program's command line, unquoted
ROOT_FLAGS = {"--help", "--version", "--debug"}


def _command_flags() -> dict[str, set[str]]:
    """Every command's option names (with ROOT_FLAGS, which every command line accepts)."""
    import typer
    from gtorrent_cli.app import app

    root = typer.main.get_command(app)
    flags: dict[str, set[str]] = {}
    for name, command in getattr(root, "commands", {}).items():
        names = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}
        flags[name] = names | ROOT_FLAGS
    return flags


def _strings(node: ast.AST) -> Iterator[str]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


def _hint_texts() -> Iterator[tuple[str, str]]:
    """(where, text) of every string that can end up in a `hint:` line: `hint=` arguments, the second
    argument of output.error / output.warning, `default_hint` and module constants named *_HINT. The
    constant parts of f-strings are enough: flags are never interpolated."""
    for path in sorted([*(ROOT / "gtorrent").rglob("*.py"), *(ROOT / "cli").glob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            values: list[ast.AST] = []
            if isinstance(node, ast.Call):
                values += [kw.value for kw in node.keywords if kw.arg == "hint"]
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if name in ("error", "warning") and len(node.args) >= 2:
                    values.append(node.args[1])
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if node.value is not None and any(n == "default_hint" or n.endswith("_HINT") for n in names):
                    values.append(node.value)
            for value in values:
                for text in _strings(value):
                    yield f"{where}:{getattr(node, 'lineno', 0)}", text


def test_every_flag_a_hint_names_exists() -> None:
    """A hint naming `--model PATH` where the command takes MODEL as an argument sends the user to an
    error. Flags inside `gtorrent CMD …` must be CMD's; other flags must be some command's (flags inside
    other tools' command lines, e.g. optimum-cli, are theirs)."""
    flags = _command_flags()
    every = set().union(*flags.values())
    texts = list(_hint_texts())
    assert len(texts) > 50  # the scan finds the hints at all
    wrong = []
    for where, text in texts:
        for quoted in BACKTICKED.findall(text):
            words = quoted.split()
            if len(words) >= 2 and words[0] == "gtorrent" and words[1] in flags:
                wrong += [(where, quoted, f) for f in FLAG.findall(quoted) if f not in flags[words[1]]]
        wrong += [(where, text, f) for f in FLAG.findall(OTHER_TOOL.sub("", BACKTICKED.sub("", text))) if f not in every]
    assert not wrong, wrong


def test_a_missing_model_hint_fits_seed_and_run(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "no-such-model")
    for args in (("seed", missing), ("run", "Hello", "--model", missing)):
        result = cli(*args)
        assert result.code == 1 and "error: model not found" in result.err, result
        hint = result.err.split("hint:", 1)[1]
        assert "--model" not in hint and "model.onnx" in hint, result  # `seed` has no --model option
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.onnx", "b.onnx"):
        (several / name).write_bytes(b"")
    result = cli("seed", str(several))
    assert result.code == 1 and "holds several .onnx files" in result.err, result
    assert "--model" not in result.err and str(several / "a.onnx") in result.err, result


def test_device_cuda_without_a_gpu_hints_at_the_device(cli) -> None:  # type: ignore[no-untyped-def]
    from gtorrent.runtime.providers import gpu_usable

    if gpu_usable():
        pytest.skip("a GPU is usable here")
    result = cli("run", "Hello", "-n", "2", "--device", "cuda")
    assert result.code == 1 and "no usable GPU" in result.err, result
    assert "optimum-cli" not in result.err and "as an ONNX model" not in result.err, result
    assert "--device cpu" in result.err.split("hint:", 1)[1]


def test_a_too_long_prompt_names_the_limit_and_no_sampling_flag(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("ask", "x" * 70_000, "--tracker", UNREACHABLE)
    assert result.code == 2, result
    assert "the prompt is 70000 characters; an ask carries at most 65536" in result.err, result
    hint = result.err.split("hint:", 1)[1]
    assert "--top-k" not in hint and "shorten the prompt" in hint and "tokens" in hint


def test_the_seeds_refusal_comes_with_a_hint() -> None:
    from gtorrent.asker import RequestRefused

    refused = RequestRefused("the seed refused the request: the prompt is 8000 tokens; model m holds 512")
    assert refused.hint is not None and "shorten" in refused.hint


@pytest.mark.timeout(60)
def test_tracker_pin_mismatch_and_a_model_nobody_serves(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    try:
        wrong = f"{url}#{'a' * 26}"
        pinned = _gtorrent(tmp_path / "asker", "peers", "--tracker", wrong)
        assert pinned.returncode == 1 and "not the pinned" in pinned.stderr, pinned
        assert "check the #PEER_ID part" in pinned.stderr and "start one" not in pinned.stderr, pinned

        nobody = _gtorrent(tmp_path / "asker", "peers", "--model", "llama-70b", "--tracker", url)
        assert nobody.returncode == 1, nobody
        assert "error: no peer the trackers list serves model 'llama-70b'" in nobody.stderr
        assert "`gtorrent peers`" in nobody.stderr
        as_json = _gtorrent(tmp_path / "asker", "peers", "--model", "llama-70b", "--json", "--tracker", url)
        assert as_json.returncode == 1 and json.loads(as_json.stdout) == []
        everyone = _gtorrent(tmp_path / "asker", "peers", "--tracker", url)
        assert everyone.returncode == 0, everyone  # no --model: an empty swarm is not an error
    finally:
        tracker.terminate()


def _gtorrent(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GTORRENT_TRACKERS", "GTORRENT_DEBUG")}
    env.update({"GTORRENT_HOME": str(home), "COLUMNS": "200"})
    return subprocess.run([GTORRENT, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL if stdin is None else None)


# help matches validation


def _help(cli, *command: str) -> str:  # type: ignore[no-untyped-def]
    result = cli(*command, "--help")
    assert result.code == 0, result
    return " ".join(result.out.replace("│", " ").split())  # one line: the table wraps words anywhere


def test_help_shows_the_ranges_validation_uses(cli) -> None:  # type: ignore[no-untyped-def]
    for command in ("ask", "verify"):
        text = _help(cli, command)
        assert "3 to 16" in text and "1<=x<=16" not in text, text
    for command in ("ask", "run"):
        text = _help(cli, command)
        assert "(0, 1]" in text and "0.0<=x<=1.0" not in text, text
    for args, needle in ((("--paths", "2"), "--paths must be at least 3"), (("--paths", "17"), "3<=x<=16"),
                         (("--paths", "0"), "3<=x<=16"), (("--top-p", "0"), "(0, 1]")):
        result = cli("ask", "Hello", *args, "--tracker", UNREACHABLE)
        assert result.code == 2 and needle in result.err and "hint:" in result.err, result
    assert cli("run", "Hello", "--top-p", "0").code == 2


def test_no_bool_labels_and_the_pin_survives(cli) -> None:  # type: ignore[no-untyped-def]
    for command in _command_flags():
        text = _help(cli, command)
        assert "<bool>" not in text, (command, text)
    assert "#PEER_ID" in _help(cli, "ask")


def test_no_arguments_prints_help_without_an_empty_error(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli()
    assert "Usage: gtorrent" in result.out + result.err
    assert "error:" not in result.err, result
    assert result.code == 2


def test_debug_after_the_command(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok = cli("run", "The for statement", "-n", "2", "--debug", "--json")
    assert ok.code == 0 and "No such option" not in ok.err, ok
    failed = cli("run", "Hello", "--model", str(tmp_path / "missing"), "--debug")
    assert failed.code == 1 and "Traceback" in failed.err and "error: model not found" in failed.err, failed


# the prompt from stdin and files


def test_prompt_from_stdin_and_file_match_the_argument(tmp_path: Path) -> None:
    prompt = "The for statement"
    args = ("run", "-n", "6", "--json")
    expected = json.loads(_gtorrent(tmp_path, *args[:1], prompt, *args[1:]).stdout)["text"]
    dash = _gtorrent(tmp_path, "run", "-", *args[1:], stdin=prompt + "\n")
    assert dash.returncode == 0 and json.loads(dash.stdout)["text"] == expected, dash
    piped = _gtorrent(tmp_path, *args, stdin=prompt + "\n")  # no PROMPT, stdin not a terminal
    assert piped.returncode == 0 and json.loads(piped.stdout)["text"] == expected, piped
    file = tmp_path / "prompt.txt"
    file.write_text(prompt + "\n", encoding="utf-8")
    from_file = _gtorrent(tmp_path, *args, "--file", str(file))
    assert from_file.returncode == 0 and json.loads(from_file.stdout)["text"] == expected, from_file


def test_a_long_prompt_from_a_file_is_judged_in_tokens(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    file = tmp_path / "long.txt"
    file.write_text("word " * 3000, encoding="utf-8")  # too long for argv comfort, and for the demo model
    result = cli("run", "--file", str(file), "-n", "2")
    assert result.code == 2 and re.search(r"the prompt is \d+ tokens; model \S+ holds \d+", result.err), result


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (("ask", ""), None, "error: the prompt is empty"),
        (("run", ""), None, "error: the prompt is empty"),
        (("run", "-"), "", "error: the prompt is empty (stdin)"),
        (("run", "--file", "{empty}"), None, "error: the prompt is empty ("),
        (("run", "Hello", "--file", "{empty}"), None, "both a PROMPT argument and --file"),
        (("run", "--file", "{missing}"), None, "cannot read the prompt from"),
        (("ask", "--file", "{binary}", "--tracker", UNREACHABLE), None, "cannot read the prompt from"),
    ],
)
def test_prompt_mistakes_get_a_hint(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,  # type: ignore[no-untyped-def]
                                    args: tuple[str, ...], stdin: str | None, needle: str) -> None:
    import io

    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    names = {"{empty}": "empty.txt", "{missing}": "missing.txt", "{binary}": "binary.txt"}
    args = tuple(str(tmp_path / names[a]) if a in names else a for a in args)
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    result = cli(*args)
    assert result.code == 2 and needle in result.err and "hint:" in result.err, result


def test_no_prompt_on_a_terminal_says_how_to_give_one(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(""))
    result = cli("run")
    assert result.code == 2 and "error: no prompt given" in result.err and "--file PATH" in result.err, result


# flags that do nothing in a mode


@pytest.mark.timeout(60)
def test_route_flags_with_direct_say_they_do_nothing(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("ask", "Hello", "--direct", "--paths", "5", "--strict", "--tracker", UNREACHABLE)
    assert "warning: --paths, --strict shape private routes, which --direct does not use" in result.err, result
    quiet = cli("ask", "Hello", "--direct", "--tracker", UNREACHABLE)
    assert "warning:" not in quiet.err, quiet
