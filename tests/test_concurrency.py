"""One home, many processes: real gtorrent processes on 127.0.0.1 sharing homes, as a user runs them.

Asks may share a home (its store takes concurrent writers); long-running nodes may not share one
(a home is one identity), and the second is refused with a hint. The README's one-machine recipe is
run as written, with 4 asks at once.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from gtorrent.errors import HomeInUseError
from gtorrent.paths import NODE_LOCK, TRACKER_LOCK, HomeLock, lock_home, try_lock_home
from gtorrent.store import DB_NAME, Store

from .procs import GTORRENT, Proc, start_seed, start_tracker

PROMPT = "The for statement"
README = Path(__file__).parent.parent / "README.md"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GTORRENT_TRACKERS", "GTORRENT_DEBUG")}
    env["GTORRENT_HOME"] = str(home)
    return env


def run_at_once(home: Path, commands: list[list[str]], timeout_s: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """Start every command before waiting for any, all on the same home."""
    procs = [
        subprocess.Popen([GTORRENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(home))
        for args in commands
    ]
    done = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


def run_cli(home: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GTORRENT, *args], capture_output=True, text=True, env=_env(home), timeout=timeout_s)


@pytest.mark.timeout(240)
def test_eight_direct_asks_at_once_share_one_home(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    seed, peer = start_seed(tmp_path / "seed", [url], "--max-concurrency", "4")
    try:
        home = tmp_path / "asker"  # new: the 8 also race to create the store and run its migrations
        done = run_at_once(home, [["ask", PROMPT, "-n", "8", "--direct", "--tracker", url, "--json"]] * 8)
        failed = [d.stderr for d in done if d.returncode != 0]
        assert failed == [], failed[0]
        texts = {json.loads(d.stdout)["text"] for d in done}
        assert len(texts) == 1 and texts != {""}  # greedy: the same answer 8 times
        rows = json.loads(run_cli(home, "peers", "--tracker", url, "--json").stdout)
        assert [(row["peer_id"], row["asks_ok"], row["asks_failed"]) for row in rows] == [(peer, 8, 0)]
    finally:
        seed.kill()
        tracker.kill()


# ---------------------------------------------------------------------- one long-running node per home


def test_home_locks_in_one_process(tmp_path: Path) -> None:
    """flock locks an open file, not a process: a second take in the same process is refused too."""
    held = lock_home(tmp_path, NODE_LOCK, "seed")
    assert stat.S_IMODE((tmp_path / "node.lock").stat().st_mode) == 0o600
    assert (tmp_path / "node.lock").read_text() == f"seed {os.getpid()}\n"
    assert try_lock_home(tmp_path, NODE_LOCK, "relay") == f"seed (pid {os.getpid()})"
    with pytest.raises(HomeInUseError) as caught:
        lock_home(tmp_path, NODE_LOCK, "relay")
    assert caught.value.exit_code == 1 and "GTORRENT_HOME=~/.gtorrent/another-relay gtorrent relay" in (caught.value.hint or "")
    tracker = try_lock_home(tmp_path, TRACKER_LOCK, "tracker")  # another lock of the same home: free
    assert isinstance(tracker, HomeLock)
    tracker.release()
    held.release()
    held.release()  # idempotent
    with lock_home(tmp_path, NODE_LOCK, "relay"):
        assert try_lock_home(tmp_path, NODE_LOCK, "seed") == f"relay (pid {os.getpid()})"
    again = try_lock_home(tmp_path, NODE_LOCK, "seed")
    assert isinstance(again, HomeLock)
    again.release()


def refused(done: subprocess.CompletedProcess[str], home: Path, holder: str, role: str) -> bool:
    first, hint = done.stderr.strip().splitlines()[-2:]
    return (
        done.returncode == 1
        and re.fullmatch(rf"error: the home {re.escape(str(home))} is in use by a running {holder} \(pid \d+\)", first) is not None
        and hint == f"hint: give each long-running node its own home, e.g. GTORRENT_HOME=~/.gtorrent/another-{role} gtorrent {role}"
    )


@pytest.mark.timeout(180)
def test_a_second_node_on_a_home_is_refused_and_the_first_keeps_serving(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    home = tmp_path / "node"
    seed, peer = start_seed(home, [url])
    try:
        pid = seed.popen.pid
        second_seed = run_cli(home, "seed", "--tracker", url)
        assert refused(second_seed, home, "seed", "seed"), second_seed.stderr
        assert f"(pid {pid})" in second_seed.stderr and "Traceback" not in second_seed.stderr
        relay = run_cli(home, "relay", "--tracker", url)  # same identity, so the same peer id: refused too
        assert refused(relay, home, "seed", "relay"), relay.stderr
        second_tracker = run_cli(tmp_path / "tracker", "tracker", "--bind", "tcp://127.0.0.1:0")
        assert refused(second_tracker, tmp_path / "tracker", "tracker", "tracker"), second_tracker.stderr

        assert seed.popen.poll() is None and tracker.popen.poll() is None
        rows = json.loads(run_cli(tmp_path / "asker", "peers", "--tracker", url, "--json").stdout)
        assert [(row["peer_id"], row["roles"], row["online"]) for row in rows] == [(peer, ["relay", "seed"], True)]
        asked = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "4", "--direct", "--tracker", url, "--json")
        assert asked.returncode == 0 and json.loads(asked.stdout)["seed"] == peer, asked.stderr
        # a tracker next to the seed is another lock: allowed (it keeps tracker.db, not a peer record)
        side_tracker = Proc(["tracker", "--bind", "tcp://127.0.0.1:0"], home)
        try:
            side_tracker.wait_for(r"tracker tcp://")
        finally:
            side_tracker.kill()
    finally:
        seed.kill()
        tracker.kill()


@pytest.mark.timeout(120)
def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    home = tmp_path / "relay"
    try:
        first = Proc(["relay", "--tracker", url], home)
        first.wait_for(r"relaying as")
        first.popen.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
        first.popen.wait(10)
        again = Proc(["relay", "--tracker", url], home)
        try:
            again.wait_for(r"relaying as")
        finally:
            again.kill()
    finally:
        tracker.kill()


# ---------------------------------------------------------------------- the README's one-machine recipe


def recipe() -> list[tuple[str | None, list[str]]]:
    """The commands of README's "A swarm on one machine" block: (GTORRENT_HOME or None, argv)."""
    text = README.read_text()
    block = text[text.index("A swarm on one machine") :]
    block = block[block.index("```sh\n") + 6 : block.index("```\n", block.index("```sh\n") + 6)]
    commands: list[tuple[str | None, list[str]]] = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["for"]:  # for i in 1 2 3; do GTORRENT_HOME=…$i gtorrent relay & done
            values = [word.rstrip(";") for word in words[3 : words.index("do")]]
            body = [word for word in words[words.index("do") + 1 : words.index("done")] if word != "&"]
            expanded = [[word.replace("$i", value) for word in body] for value in values]
        else:
            expanded = [[word for word in words if word != "&"]]
        for parts in expanded:
            home = parts.pop(0).split("=", 1)[1] if parts[0].startswith("GTORRENT_HOME=") else None
            assert parts[0] == "gtorrent", line
            commands.append((home, parts[1:]))
    return commands


def test_recipe_gives_each_long_running_node_its_own_home() -> None:
    nodes = [(home, args[0]) for home, args in recipe() if args[0] in ("tracker", "seed", "relay")]
    assert {role for _, role in nodes} == {"tracker", "seed", "relay"}
    assert sum(role == "relay" for _, role in nodes) >= 6  # 3 disjoint paths of 2 hops: the default floor
    homes = [home for home, _ in nodes]
    assert None not in homes and len(set(homes)) == len(homes)


@pytest.mark.timeout(300)
def test_readme_recipe_answers_four_asks_at_once(tmp_path: Path) -> None:
    """The recipe as written, the default port swapped for a free one (other tests run alongside)."""
    base = tmp_path / "dot-gtorrent"
    nodes: list[Proc] = []
    asks: list[list[str]] = []
    url = None
    try:
        for home, args in recipe():
            if home is None:
                asks.append(args)
                continue
            where = base / home.removeprefix("~/.gtorrent/")
            role = args[0]
            if role == "tracker":
                proc = Proc([*args, "--bind", "tcp://127.0.0.1:0"], where)
                url = proc.wait_for(r"tracker (tcp://\S+)").group(1)
            else:
                assert url is not None, "the recipe starts its tracker first"
                proc = Proc([*args, "--tracker", url], where)
                proc.wait_for(r"seeding as" if role == "seed" else r"relaying as", timeout_s=90)
            nodes.append(proc)
        assert url is not None
        queries = [args for args in asks if args[0] == "ask"]
        assert len(queries) == 2
        at_once = [[*args, "--tracker", url] for args in queries * 2]  # 4 asks, private and direct, at once
        done = run_at_once(tmp_path / "user", at_once, timeout_s=180)
        failed = [(d.args, d.stderr) for d in done if d.returncode != 0 or not d.stdout.strip()]
        assert failed == [], failed
        peers = run_cli(tmp_path / "user", "peers", "--tracker", url, "--json")
        assert peers.returncode == 0, peers.stderr
        assert sum(row["online"] for row in json.loads(peers.stdout)) == len(nodes) - 1  # all but the tracker
        store = Store.open(tmp_path / "user")
        try:
            ok = store.db.execute("select count(*) from observations where outcome = 'ok'").fetchall()[0][0]
            assert ok >= 2  # the direct asks' outcomes at least, all in the shared store
        finally:
            store.close()
    finally:
        for proc in nodes:
            proc.kill()


# ---------------------------------------------------------------------- the asker's store on a failing disk


def test_damaged_store_is_an_error_with_a_hint(cli, gtorrent_home: Path) -> None:  # type: ignore[no-untyped-def]
    gtorrent_home.mkdir(parents=True)
    (gtorrent_home / DB_NAME).write_bytes(b"\x00garbage, not SQLite\x00" * 300)
    done = cli("peers", "--tracker", "tcp://127.0.0.1:9")
    assert done.code == 1, done
    assert f"error: the local store {gtorrent_home / DB_NAME} is damaged" in done.err
    assert "hint: move it aside" in done.err and "GTORRENT_HOME" in done.err and "internal error" not in done.err


def _no_room(limit_bytes: int) -> None:
    # a file-size limit makes every write past it fail as on a full disk; SIGXFSZ would kill instead
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.timeout(120)
def test_ask_on_a_disk_with_no_room_is_an_error_with_a_hint(tmp_path: Path) -> None:
    tracker, url = start_tracker(tmp_path / "tracker")
    seed, _ = start_seed(tmp_path / "seed", [url])
    home = tmp_path / "asker"
    try:
        Store.open(home).close()  # the store exists; the disk then fills
        done = subprocess.run(
            [GTORRENT, "ask", PROMPT, "-n", "4", "--direct", "--tracker", url],
            capture_output=True, text=True, env=_env(home), timeout=60, preexec_fn=lambda: _no_room(0),
        )
        assert done.returncode == 1, done
        assert f"error: cannot use the local store {home / DB_NAME}" in done.stderr, done.stderr
        assert "hint:" in done.stderr and "GTORRENT_HOME" in done.stderr and "internal error" not in done.stderr
    finally:
        seed.kill()
        tracker.kill()
