"""What `gtorrent ask` writes: one answer on stdout however many seeds it took, and requests no seed
could read refused before anything is sent."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from gtorrent.identity import short_id

from .procs import Proc, start_seed, start_tracker
from .test_swarm import PROMPT, free_port, local_greedy

pytestmark = pytest.mark.timeout(120)


def kill_on_first_token(monkeypatch: pytest.MonkeyPatch, seeds: dict[str, Proc]) -> list[str]:
    """SIGKILL whichever seed is answering as soon as its first token reaches the asker."""
    from gtorrent import transport

    original = transport.Connection.recv
    killed: list[str] = []

    async def recv(self, timeout_s, expected):  # type: ignore[no-untyped-def]
        message = await original(self, timeout_s, expected)
        if message.kind == "token" and len(killed) < len(seeds) - 1:
            for peer, proc in seeds.items():
                if self.name == f"seed {short_id(peer)}" and peer not in killed:
                    killed.append(peer)
                    proc.popen.send_signal(signal.SIGKILL)
        return message

    monkeypatch.setattr(transport.Connection, "recv", recv)
    return killed


@pytest.mark.timeout(180)
def test_a_restarted_answer_is_written_once(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    tracker, url = start_tracker(tmp_path / "tracker")
    seeds = {peer: proc for proc, peer in (start_seed(tmp_path / f"seed{i}", [url]) for i in range(2))}
    try:
        killed = kill_on_first_token(monkeypatch, seeds)
        # stdout is captured here, not a terminal: only the final answer, once
        done = cli("ask", PROMPT, "-n", "300", "--direct", "--tracker", url)
        assert done.code == 0, done
        assert len(killed) == 1 and "restarting the answer" in done.err
        assert done.out == local_greedy(300) + "\n"
    finally:
        for proc in seeds.values():
            proc.kill()
        tracker.kill()


@pytest.mark.timeout(180)
def test_on_a_terminal_the_discarded_part_is_marked(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import sys

    tracker, url = start_tracker(tmp_path / "tracker")
    seeds = {peer: proc for proc, peer in (start_seed(tmp_path / f"seed{i}", [url]) for i in range(2))}
    try:
        killed = kill_on_first_token(monkeypatch, seeds)
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        done = cli("ask", PROMPT, "-n", "300", "--direct", "--tracker", url)
        assert done.code == 0, done
        answer = local_greedy(300)
        partial, _, rest = done.out.partition("\n")
        assert killed and answer.startswith(partial) and rest.endswith(answer + "\n")
        assert "the partial answer above is discarded" in done.err
    finally:
        for proc in seeds.values():
            proc.kill()
        tracker.kill()


@pytest.mark.parametrize("mode", [[], ["--direct"]])
@pytest.mark.parametrize("where", ["prompt", "model"])
def test_a_lone_surrogate_is_refused_before_anything_is_sent(cli, mode: list[str], where: str) -> None:  # type: ignore[no-untyped-def]
    # no tracker listens there: an exit 2 (not 1, "cannot reach tracker") proves nothing was sent
    dead = f"tcp://127.0.0.1:{free_port()}"
    args = ["ask", "a\ud800b", *mode] if where == "prompt" else ["ask", PROMPT, "--model", "demo\udcff", *mode]
    done = cli(*args, "--tracker", dead)
    assert done.code == 2, done
    assert "error:" in done.err and "lone surrogate" in done.err and "hint:" in done.err
    assert "Traceback" not in done.err and done.out == ""


def test_a_lone_surrogate_blames_no_seed(tmp_path: Path) -> None:
    import json

    from .test_swarm import run_cli

    tracker, url = start_tracker(tmp_path / "tracker")
    seed, _ = start_seed(tmp_path / "seed", [url])
    try:
        home = tmp_path / "asker"
        done = run_cli(home, "ask", "x\udcffy", "--direct", "--tracker", url)  # argv bytes that are not UTF-8
        assert done.returncode == 2 and "lone surrogate" in done.stderr, done.stderr
        rows = json.loads(run_cli(home, "peers", "--tracker", url, "--json").stdout)
        assert rows and sum(row["asks_failed"] for row in rows) == 0
    finally:
        seed.kill()
        tracker.kill()


def test_one_hop_paths_need_their_own_flag(cli) -> None:  # type: ignore[no-untyped-def]
    dead = f"tcp://127.0.0.1:{free_port()}"
    done = cli("ask", PROMPT, "--hops", "1", "--tracker", dead)
    assert done.code == 2 and "sees both you and the seed" in done.err and "--allow-one-hop" in done.err, done
    # allowed, it goes on to the network (here: no tracker)
    allowed = cli("ask", PROMPT, "--hops", "1", "--allow-one-hop", "--tracker", dead)
    assert allowed.code == 1 and "cannot reach tracker" in allowed.err, allowed
