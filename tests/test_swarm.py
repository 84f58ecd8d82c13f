"""The swarm end to end: real tracker and seed processes, real sockets on 127.0.0.1, real SQLite."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gtorrent.asker import AskEvents, AskRequest
from gtorrent.identity import unb64
from gtorrent.node import NodeSettings, ask
from gtorrent.runtime import GenerationParams, LanguageModel

from .procs import GTORRENT, start_seed, start_tracker

pytestmark = pytest.mark.timeout(120)

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One tracker and two seeds of the bundled model, shared by the tests that only ask."""
    base = tmp_path_factory.mktemp("swarm")
    tracker, url = start_tracker(base / "tracker")
    seeds = [start_seed(base / f"seed{i}", [url]) for i in range(2)]
    yield {"url": url, "tracker": tracker, "seeds": seeds, "base": base}
    for proc, _ in seeds:
        proc.kill()
    tracker.kill()


def run_cli(home: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GTORRENT_TRACKERS"}
    env["GTORRENT_HOME"] = str(home)
    return subprocess.run([GTORRENT, *args], capture_output=True, text=True, env=env, timeout=timeout_s)


def local_greedy(max_tokens: int) -> str:
    return LanguageModel.load(None).generate(PROMPT, GenerationParams(max_tokens=max_tokens)).text


def test_ask_equals_local_run(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    done = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "40", "--direct", "--tracker", swarm["url"], "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["text"] == local_greedy(40)
    assert doc["seed"] in {peer for _, peer in swarm["seeds"]}
    assert doc["attempts"] == 1 and doc["tokens"] == 40 and len(doc["model_id"]) == 64
    assert len(doc["token_ids"]) == 40 and len(unb64(doc["signature"])) == 64  # the seed's signed transcript
    for key in ("ttft_s", "total_s", "tokens_per_s"):
        assert doc[key] > 0
    streamed = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "40", "--direct", "--tracker", swarm["url"])
    assert streamed.returncode == 0 and streamed.stdout == doc["text"] + "\n"


def test_peers_shows_recorded_outcomes(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "asker"
    for _ in range(2):
        assert run_cli(home, "ask", PROMPT, "-n", "5", "--direct", "--tracker", swarm["url"]).returncode == 0
    done = run_cli(home, "peers", "--tracker", swarm["url"], "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    seeds = {peer for _, peer in swarm["seeds"]}
    assert {row["peer_id"] for row in rows if row["online"]} >= seeds
    assert sum(row["asks_ok"] for row in rows) == 2
    for row in rows:
        for key in ("peer_id", "roles", "models", "endpoint", "reputation", "asks_ok", "asks_failed", "last_seen"):
            assert key in row
        assert row["roles"] == ["relay", "seed"] and row["models"][0]["name"] == "gtorrent-demo"
    table = run_cli(home, "peers", "--tracker", swarm["url"])
    assert table.returncode == 0 and "REPUTATION" in table.stdout and "2 peers" in table.stdout


def test_seed_killed_mid_answer_completes_on_another(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    seeds = {peer: proc for proc, peer in (start_seed(tmp_path / f"seed{i}", [url]) for i in range(2))}
    try:
        killed: list[str] = []
        restarts: list[tuple[str, int]] = []
        current: list[str] = []

        def on_attempt(record, attempt: int) -> None:  # type: ignore[no-untyped-def]
            current.append(record.peer_id)

        def on_text(piece: str) -> None:
            if not killed:
                killed.append(current[-1])
                seeds[current[-1]].popen.send_signal(signal.SIGKILL)

        def on_restart(record, reason: str, lost: int) -> None:  # type: ignore[no-untyped-def]
            restarts.append((record.peer_id, lost))

        settings = NodeSettings(home=tmp_path / "asker", trackers=[url], trackers_explicit=True)
        request = AskRequest(PROMPT, max_tokens=300)
        result = ask(settings, request, AskEvents(on_text=on_text, on_attempt=on_attempt, on_restart=on_restart))
        assert killed and result.seed != killed[0]
        assert result.attempts == 2 and restarts and restarts[0][0] == killed[0] and restarts[0][1] >= 1
        assert result.text == local_greedy(300)  # the whole answer from the second seed, not a mix
        assert result.failures[0]["seed"] == killed[0]
    finally:
        for proc in seeds.values():
            proc.kill()
        tracker.kill()


def test_clean_shutdown_removes_seed_from_tracker(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    seed, peer = start_seed(tmp_path / "seed", [url])
    try:
        listed = json.loads(run_cli(tmp_path / "asker", "peers", "--tracker", url, "--json").stdout)
        assert [row["peer_id"] for row in listed if row["online"]] == [peer]
        assert seed.terminate() == 0
        seed.wait_for("telling the trackers", 5)
        seed.wait_for("seed stopped", 5)
        after = json.loads(run_cli(tmp_path / "asker2", "peers", "--tracker", url, "--json").stdout)
        assert after == []
        failed = run_cli(tmp_path / "asker2", "ask", PROMPT, "--tracker", url)
        assert failed.returncode == 1 and "no seed is in the swarm" in failed.stderr
    finally:
        seed.kill()
        tracker.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_tracker_reachable_fails_fast(tmp_path: Path) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    for args in (["ask", PROMPT], ["peers"]):
        started = time.monotonic()
        done = run_cli(tmp_path, *args, "--tracker", dead, timeout_s=30)
        assert time.monotonic() - started < 15
        assert done.returncode == 1, done
        assert done.stderr.startswith(f"error: cannot reach tracker {dead}")
        assert "hint:" in done.stderr and "gtorrent tracker" in done.stderr and "Traceback" not in done.stderr
    bad = run_cli(tmp_path, "ask", PROMPT, "--tracker", "http://nowhere")
    assert bad.returncode == 2 and "invalid tracker address" in bad.stderr


def test_ask_for_a_model_no_seed_serves(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    done = run_cli(tmp_path, "ask", PROMPT, "--model", "llama-70b", "--tracker", swarm["url"])
    assert done.returncode == 1
    assert "error: no seed serves model 'llama-70b'" in done.stderr and "gtorrent-demo" in done.stderr
    assert "hint:" in done.stderr


def test_bad_request_is_refused_locally_and_blames_no_seed(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "asker"
    done = run_cli(home, "ask", "x" * 70_000, "--tracker", swarm["url"])
    assert done.returncode == 2 and "error: the request is not valid" in done.stderr and "Traceback" not in done.stderr
    rows = json.loads(run_cli(home, "peers", "--tracker", swarm["url"], "--json").stdout)
    assert sum(row["asks_failed"] for row in rows) == 0


def test_untrusted_seeds_get_no_asks(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gtorrent.identity import Identity
    from gtorrent.protocol import Verdict
    from gtorrent.store import Store

    # untrusted by verification (two epochs at C = 0.1); ask outcomes alone never untrust a seed
    home = tmp_path / "asker"
    store = Store.open(home)
    verifier = Identity.generate()
    for _, peer in swarm["seeds"]:
        store.add_verdicts([Verdict.sign(verifier, seed=peer, model_id="0" * 64, epoch=epoch, credibility=0.1,
                                         challenges=3, evidence="0" * 64) for epoch in range(2)])
        store.observe(peer, "ok", now=1.0)
    store.close()
    done = run_cli(home, "ask", PROMPT, "-n", "4", "--tracker", swarm["url"])
    assert done.returncode == 1 and "untrusted" in done.stderr and "hint:" in done.stderr


def test_private_ask_through_the_cli_degrades_explicitly(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "asker"
    # two seeds: the one not asked is the only relay, so 4 x 3 would degrade to 1 path of 1 hop: below
    # the 2-hop floor, refused unless --allow-one-hop
    floor = run_cli(home, "ask", PROMPT, "-n", "12", "--tracker", swarm["url"])
    assert floor.returncode == 1 and "need 6 relays; 1 are available" in floor.stderr
    assert "--allow-one-hop" in floor.stderr and floor.stdout == ""
    done = run_cli(home, "ask", PROMPT, "-n", "12", "--tracker", swarm["url"], "--json", "--allow-one-hop")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["mode"] == "private" and doc["text"] == local_greedy(12)
    assert doc["privacy"] == {"paths": 1, "hops": 1, "k": 1, "degraded": True}
    assert doc["path_setup_s"] > 0 and doc["ttft_s"] > 0 and doc["total_s"] >= doc["ttft_s"]
    assert "warning: privacy degraded: 1 paths of 1 hops" in done.stderr  # announced with --json too
    streamed = run_cli(home, "ask", PROMPT, "-n", "12", "--tracker", swarm["url"], "--verbose", "--allow-one-hop")
    assert streamed.returncode == 0 and streamed.stdout == doc["text"] + "\n"
    assert "warning: privacy degraded: 1 paths of 1 hops" in streamed.stderr
    assert "path 1: you → " in streamed.stderr
    strict = run_cli(home, "ask", PROMPT, "--strict", "--tracker", swarm["url"])
    assert strict.returncode == 1 and "need 12 relays" in strict.stderr and "hint:" in strict.stderr


def test_private_ask_with_fewer_paths_than_the_threshold(swarm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    done = run_cli(tmp_path, "ask", PROMPT, "--paths", "2", "--tracker", swarm["url"])
    assert done.returncode == 2 and "error: --paths must be at least 3" in done.stderr and "hint:" in done.stderr
