"""Shared fixtures: every test gets its own GTORRENT_HOME, and the committed models by path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gtorrent.runtime.files import bundled_model_path

MODELS = Path(__file__).parent / "models"
DEMO = bundled_model_path()
GPT2 = MODELS / "gpt2-tiny"
GPT2_NOCACHE = MODELS / "gpt2-tiny-nocache"


@pytest.fixture(autouse=True)
def gtorrent_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("GTORRENT_HOME", str(home))
    monkeypatch.delenv("GTORRENT_DEBUG", raising=False)
    return home


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run `gtorrent ARGS…` in-process through the real entry point and its error boundary."""
    from gtorrent_cli.app import main

    def invoke(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
async def swarm() -> AsyncIterator[Any]:
    """An in-process swarm of real services on loopback (tests/test_private.py's `Swarm`), closed after
    the test. test_swarm.py has its own `swarm` of real processes, which overrides this one there."""
    from .test_private import Swarm

    made = Swarm()
    yield made
    await made.close()


@pytest.fixture
async def ctx() -> AsyncIterator[Any]:
    """A ZeroMQ context for the test's clients, destroyed after it."""
    from gtorrent.transport import new_context

    context = new_context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def launch() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """tests/test_tracker.py's `start`, with every tracker stopped at teardown even when the test failed
    half-way."""
    from .test_tracker import start

    started: list[Any] = []

    async def launch_one(*args: Any, **options: Any) -> Any:
        started.append(await start(*args, **options))
        return started[-1]

    yield launch_one
    for running in started:
        await running.stop()
