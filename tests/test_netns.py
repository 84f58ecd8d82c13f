"""A swarm across machines, on one Linux host: each node in a network namespace of its own.

A tracker, 2 seeds, 12 relays, an asker and a `gtorrent api` node each get a namespace with its own
address on one bridge (10.77.0.0/24), and are started as on machines of their own: `--bind
tcp://0.0.0.0:PORT --advertise IP` on fixed ports (the tracker's CurveZMQ port set by `--curve-port`),
the tracker pinned by id (`tcp://IP:7700#PEER_ID`), a GTORRENT_HOME each. A private ask (`gtorrent ask`
without --direct: 4 onion paths of 3 hops over the 12 relays and the other seed) and an OpenAI-style
HTTP request to `gtorrent api` from the asker's machine must answer what the model computes locally, and
the two seeds must find each other as a model group (their forwarding links cross machines too).

The addresses are private (a LAN), so the asker and the api pass `--allow-same-network`, and the relays
are minutes old rather than the 30 minutes a private ask waits for by default, so `--min-relay-age 0`
(tests/test_swarm.py needs neither: on loopback those rules are lifted, routing.py).

Skipped, with the reason, where namespaces cannot be made (not Linux, no `ip`, not root / no
CAP_NET_ADMIN): the probe really creates one, with a bridge and a veth pair in it. The bridge lives in a
namespace of its own, so nothing is added to the host's network; every namespace this test makes is
deleted at teardown, also when it fails, and a run killed before its teardown is swept up by the next.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtorrent.identity import load_or_create_identity
from gtorrent.runtime import GenerationParams, LanguageModel

from .procs import GTORRENT, Proc

pytestmark = pytest.mark.timeout(150)

PREFIX = "gtns"  # namespaces are named gtns<pid>-<n>: the pid tells a live run's from a dead one's
SUBNET = "10.77.0"
TRACKER_PORT, CURVE_PORT, SEED_PORT, RELAY_PORT, API_PORT = 7700, 7710, 7720, 7730, 7780
RELAYS = 12
PROMPT = "The for statement"
TOKENS = 12
API_KEY = "netns-test-key"


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)


def namespaces_unavailable() -> str | None:
    """Why this host cannot run the test (None: it can): tried for real, since root alone may not do
    (a container without CAP_NET_ADMIN, a kernel without bridges)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe)
    if made.returncode != 0:
        return f"cannot create a network namespace (needs root or CAP_NET_ADMIN): {made.stderr.strip()}"
    try:
        for step in (("-n", probe, "link", "add", "br0", "type", "bridge"),
                     ("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"),
                     ("netns", "exec", probe, "true")):
            done = ip(*step)
            if done.returncode != 0:
                return f"`ip {' '.join(step)}` failed: {done.stderr.strip()}"
    finally:
        ip("netns", "del", probe)
    return None


def sweep_stale() -> None:
    """Delete the namespaces of earlier runs that were killed before their teardown (their pid is gone)."""
    listed = ip("netns", "list").stdout
    for name in re.findall(rf"^({PREFIX}(\d+)-\S+)", listed, re.MULTILINE):
        full, pid = name
        if not Path(f"/proc/{pid}").exists():
            ip("netns", "del", full)


class Lan:
    """Namespaces on one bridge; the bridge is in a namespace of its own (`switch`), not on the host."""

    def __init__(self) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.made: list[str] = []

    def must(self, *args: str) -> None:
        done = ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def namespace(self, name: str) -> None:
        self.must("netns", "add", name)
        self.made.append(name)

    def start(self) -> None:
        self.namespace(self.switch)
        self.must("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self.must("-n", self.switch, "link", "set", "br0", "up")

    def host(self, index: int) -> tuple[str, str]:
        """A machine at 10.77.0.<index> on the bridge: (its namespace, its address)."""
        name, address = f"{self.prefix}-{index}", f"{SUBNET}.{index}"
        self.namespace(name)
        self.must("-n", self.switch, "link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", name)
        self.must("-n", self.switch, "link", "set", f"v{index}", "master", "br0", "up")
        self.must("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        self.must("-n", name, "link", "set", "eth0", "up")
        self.must("-n", name, "link", "set", "lo", "up")
        return name, address

    def close(self) -> None:
        for name in reversed(self.made):  # deleting a namespace deletes its end of each veth pair
            ip("netns", "del", name)
        self.made.clear()


@pytest.fixture
def lan() -> Iterator[Lan]:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    sweep_stale()
    made = Lan()
    try:
        made.start()
        yield made
    finally:
        made.close()


class NsProc(Proc):
    """tests/procs.Proc, run inside a namespace (`ip netns exec` execs the command: signals reach it)."""

    def __init__(self, namespace: str, args: list[str], home: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "GTORRENT_TRACKERS"}
        env.update({"GTORRENT_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
        self.args = args
        self.popen = subprocess.Popen(["ip", "netns", "exec", namespace, GTORRENT, *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()


def run_in(namespace: str, home: Path, *command: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GTORRENT_TRACKERS"}
    env["GTORRENT_HOME"] = str(home)
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False)


def seen_or_wait(proc: Proc, pattern: str, timeout_s: float) -> None:
    """Wait for a line, which may already have gone by while waiting for an earlier one."""
    if not any(re.search(pattern, line) for line in proc.seen):
        proc.wait_for(pattern, timeout_s)


# an OpenAI client's two requests, as curl would send them, from the asker's machine
CLIENT = r"""
import json, sys, urllib.request
base, key, prompt, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
auth = {"Authorization": "Bearer " + key}
models = json.load(urllib.request.urlopen(urllib.request.Request(base + "/models", headers=auth), timeout=30))
body = json.dumps({"model": "gtorrent-demo", "prompt": prompt, "max_tokens": tokens}).encode()
request = urllib.request.Request(base + "/completions", body, {**auth, "Content-Type": "application/json"})
print(json.dumps({"models": models, "completion": json.load(urllib.request.urlopen(request, timeout=90))}))
"""


def test_private_ask_and_api_request_across_namespaces(lan: Lan, tmp_path: Path) -> None:
    expected = LanguageModel.load(None).generate(PROMPT, GenerationParams(max_tokens=TOKENS)).text
    procs: list[Proc] = []
    try:
        tracker_ns, tracker_ip = lan.host(1)
        seeds = [lan.host(2 + i) for i in range(2)]
        relays = [lan.host(10 + i) for i in range(RELAYS)]
        asker_ns, _ = lan.host(30)
        api_ns, api_ip = lan.host(31)

        tracker_home = tmp_path / "tracker"
        tracker_id = load_or_create_identity(tracker_home)[0].peer_id  # known before it starts: pinned below
        tracker = NsProc(tracker_ns, ["tracker", "--bind", f"tcp://0.0.0.0:{TRACKER_PORT}", "--curve-port",
                                      str(CURVE_PORT), "--advertise", tracker_ip], tracker_home)
        procs.append(tracker)
        assert tracker.wait_for(r"tracker (tcp://\S+)").group(1) == f"tcp://{tracker_ip}:{TRACKER_PORT}"
        pinned = f"tcp://{tracker_ip}:{TRACKER_PORT}#{tracker_id}"

        def node(namespace: str, address: str, role: str, port: int, name: str) -> NsProc:
            proc = NsProc(namespace, [role, "--bind", f"tcp://0.0.0.0:{port}", "--advertise", address,
                                      "--tracker", pinned], tmp_path / name)
            procs.append(proc)
            return proc

        seed_procs = [node(ns, address, "seed", SEED_PORT, f"seed{i}") for i, (ns, address) in enumerate(seeds)]
        relay_procs = [node(ns, address, "relay", RELAY_PORT, f"relay{i}") for i, (ns, address) in enumerate(relays)]
        api = NsProc(api_ns, ["api", "--bind", f"0.0.0.0:{API_PORT}", "--api-key", API_KEY, "--tracker", pinned,
                              "--min-relay-age", "0", "--allow-same-network"], tmp_path / "api")
        procs.append(api)

        seed_ids = set()
        for proc, (_, address) in zip(seed_procs, seeds, strict=True):
            match = proc.wait_for(r"seeding as (\w+) on (tcp://\S+)", timeout_s=90)
            assert match.group(2) == f"tcp://{address}:{SEED_PORT}"  # announced at --advertise, the port of --bind
            seed_ids.add(match.group(1))
        for proc, (_, address) in zip(relay_procs, relays, strict=True):
            assert proc.wait_for(r"relaying as \w+ on (tcp://\S+)", timeout_s=90).group(1) == f"tcp://{address}:{RELAY_PORT}"
        assert api.wait_for(r"on (http://\S+/v1)", timeout_s=90).group(1) == f"http://0.0.0.0:{API_PORT}/v1"
        for proc in [*seed_procs, *relay_procs]:  # each announced once before its ready line: none refused
            assert not any("announce to" in line for line in proc.seen), proc.seen

        asker_home = tmp_path / "asker"
        ask = run_in(asker_ns, asker_home, GTORRENT, "ask", PROMPT, "-n", str(TOKENS), "--json", "--tracker", pinned,
                     "--min-relay-age", "0", "--allow-same-network")
        assert ask.returncode == 0, ask.stderr
        doc = json.loads(ask.stdout)
        assert doc["mode"] == "private" and doc["text"] == expected and doc["seed"] in seed_ids
        assert (doc["privacy"]["paths"], doc["privacy"]["hops"], doc["privacy"]["degraded"]) == (4, 3, False)

        served = run_in(asker_ns, asker_home, sys.executable, "-c", CLIENT, f"http://{api_ip}:{API_PORT}/v1",
                        API_KEY, PROMPT, str(TOKENS))
        assert served.returncode == 0, served.stderr + "".join(api.seen)
        answer: dict[str, Any] = json.loads(served.stdout)
        (listed,) = answer["models"]["data"]
        assert listed["name"] == "gtorrent-demo" and listed["seeds"] == 2
        completion = answer["completion"]
        assert completion["choices"][0]["text"] == expected
        assert completion["usage"]["completion_tokens"] == TOKENS

        for proc in seed_procs:  # the model group's links reach the other seed at its advertised endpoint
            seen_or_wait(proc, r"group: \S+ joined", timeout_s=30)
    finally:
        for proc in procs:
            proc.kill()
