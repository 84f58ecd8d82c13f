"""The command line through its one error boundary, and the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import GPT2, MODELS


def assert_clean_error(result, code: int, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.code == code, result
    assert "error:" in result.err and "hint:" in result.err, result
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in result.err, result


def test_run_json_on_bundled_model(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("run", "The for statement", "--max-tokens", "12", "--json")
    assert result.code == 0, result
    doc = json.loads(result.out)
    for key in ("text", "tokens", "ttft_s", "total_s", "tokens_per_s", "provider", "model_id"):
        assert key in doc
    assert 1 <= doc["tokens"] <= 12 and doc["provider"] == "CPUExecutionProvider"
    assert doc["threads"] is None  # ONNX Runtime's own choice
    assert len(doc["model_id"]) == 64


def test_run_threads_sets_the_models_threads(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("run", "The for statement", "--max-tokens", "2", "--json", "--threads", "1")
    assert result.code == 0, result
    assert json.loads(result.out)["threads"] == 1
    verbose = cli("run", "The for statement", "--max-tokens", "2", "--verbose", "--threads", "2")
    assert verbose.code == 0 and "CPUExecutionProvider with 2 threads" in verbose.err, verbose
    refused = cli("run", "x", "--threads", "0")
    assert_clean_error(refused, 2, "--threads")


def test_run_streams_and_verbose(cli) -> None:  # type: ignore[no-untyped-def]
    streamed = cli("run", "The for statement", "-n", "10", "--verbose", "--model", str(GPT2))
    assert streamed.code == 0, streamed
    as_json = json.loads(cli("run", "The for statement", "-n", "10", "--json", "--model", str(GPT2)).out)
    assert streamed.out == as_json["text"] + "\n"
    assert "tokens/s" in streamed.err and "CPUExecutionProvider" in streamed.err


def test_run_sampling_flags_reproducible(cli) -> None:  # type: ignore[no-untyped-def]
    args = ("run", "The for statement", "-n", "16", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--json")
    first = json.loads(cli(*args, "--seed", "5").out)
    second = json.loads(cli(*args, "--seed", "5").out)
    assert first["text"] == second["text"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "many"], "--top-k"),
        (["--device", "tpu"], "unknown device"),
        (["--no-such-flag"], "No such option"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_flag_values(cli, args: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    assert_clean_error(cli("run", "hi", *args), 2, needle)


def test_missing_model_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_clean_error(cli("run", "hi", "--model", str(tmp_path / "nope.onnx")), 1, "model not found")


def test_onnx_that_is_not_a_causal_lm(cli) -> None:  # type: ignore[no-untyped-def]
    assert_clean_error(cli("run", "hi", "--model", str(MODELS / "not-an-lm")), 1, "not a causal language model", "optimum-cli")


def test_folder_without_tokenizer(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shutil.copy(GPT2 / "model.onnx", tmp_path / "model.onnx")
    assert_clean_error(cli("run", "hi", "--model", str(tmp_path)), 1, "no tokenizer.json", "tokenizer.json")


def test_chat_without_template(cli) -> None:  # type: ignore[no-untyped-def]
    assert_clean_error(cli("run", "hi", "--chat", "--model", str(GPT2)), 2, "no chat template")


def test_unwritable_home_on_run(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    monkeypatch.setenv("GTORRENT_HOME", str(blocker / "home"))
    assert_clean_error(cli("id"), 1, "cannot create directory")


def test_debug_shows_traceback(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("--debug", "run", "hi", "--model", str(tmp_path / "nope"))
    assert result.code == 1 and "Traceback" in result.err and "error: model not found" in result.err


def test_every_command_has_help(cli) -> None:  # type: ignore[no-untyped-def]
    import typer
    from gtorrent_cli.app import app

    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert command.help, f"{name} has no help text"
        result = cli(name, "--help")
        assert result.code == 0 and "Usage" in result.out


def installed_gtorrent() -> str:
    found = shutil.which("gtorrent", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    assert found, "the gtorrent console script is not installed"
    return found


@pytest.mark.timeout(60)
def test_installed_console_script(gtorrent_home: Path) -> None:
    env = {**os.environ, "GTORRENT_HOME": str(gtorrent_home)}
    exe = installed_gtorrent()
    done = subprocess.run(
        [exe, "run", "The for statement", "--max-tokens", "8", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tokens"] >= 1
    # no ONNX Runtime provider noise on a CPU machine
    assert "CUDAExecutionProvider" not in done.stderr and "provider_bridge" not in done.stderr
    failed = subprocess.run([exe, "run", "x", "--model", "/nonexistent"], capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: model not found") and "Traceback" not in failed.stderr


def test_unexpected_exception_is_an_internal_error_without_traceback(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import gtorrent_cli.identity as identity_cmd

    def boom(home):  # type: ignore[no-untyped-def]
        raise RuntimeError("kaboom")

    monkeypatch.setattr(identity_cmd, "load_or_create_identity", boom)
    result = cli("id")
    assert result.code == 70
    assert "error: internal error: RuntimeError: kaboom" in result.err and "hint:" in result.err
    assert "Traceback" not in result.err


def test_run_refuses_a_lone_surrogate(cli) -> None:  # type: ignore[no-untyped-def]
    """Undecodable bytes in argv arrive as a lone surrogate: a usage error, not an internal one (70)."""
    result = cli("run", "The \udced statement", "-n", "4")
    assert result.code == 2, result
    assert "error: the prompt is not valid text" in result.err and "hint:" in result.err


def test_a_seed_answers_a_lone_surrogate_in_a_request_as_a_bad_request() -> None:
    """JSON can carry "\\ud800": a seed must answer bad_request (the asker's fault), never `internal`."""
    import asyncio

    from gtorrent.identity import Identity
    from gtorrent.runtime import LanguageModel
    from gtorrent.seed import DirectResponder, SeedService

    class Recorder(DirectResponder):
        def __init__(self) -> None:
            self.errors: list[tuple[str, str]] = []
            self.count = 0

        async def accepted(self, queue: int) -> None:
            pass

        async def text(self, piece: str) -> None:
            pass

        async def error(self, code: str, message: str) -> None:
            self.errors.append((code, message))

    async def run() -> list[tuple[str, str]]:
        seed = SeedService(Identity.generate(), LanguageModel.load(None), trackers=[])
        try:
            recorder = Recorder()
            request = {"model": seed.model.model_id, "prompt": "x\ud800y", "max_tokens": 4, "temperature": 0.0,
                       "top_k": 0, "top_p": 1.0}
            await seed.serve_request(request, recorder)
            return recorder.errors
        finally:
            seed.close()

    errors = asyncio.run(run())
    assert errors and errors[0][0] == "bad_request", errors
