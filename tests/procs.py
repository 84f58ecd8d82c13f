"""Real gtorrent processes for multi-peer tests: start, wait for a line they print, stop.

Waiting reads the process's stderr in a thread and blocks on a queue with a deadline, so tests wait
for the event (the "ready" line) and never sleep for a guessed time.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

GTORRENT = str(Path(sys.executable).parent / "gtorrent")


class Proc:
    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if k != "GTORRENT_TRACKERS"}
        full_env.update({"GTORRENT_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})})
        self.args = args
        self.popen = subprocess.Popen(
            [GTORRENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.args[0]} did not print {pattern!r} in {timeout_s} s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.args[0]} exited ({self.popen.wait()}) before printing {pattern!r}; saw {self.seen}")
            self.seen.append(line)
            match = regex.search(line)
            if match:
                return match

    def terminate(self, timeout_s: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)


def start_tracker(home: Path) -> tuple[Proc, str]:
    proc = Proc(["tracker", "--bind", "tcp://127.0.0.1:0"], home)
    url = proc.wait_for(r"tracker (tcp://\S+)").group(1)
    return proc, url


def start_seed(home: Path, trackers: list[str], *extra: str) -> tuple[Proc, str]:
    args = ["seed", *extra]
    for url in trackers:
        args += ["--tracker", url]
    proc = Proc(args, home)
    match = proc.wait_for(r"seeding as (\w+) on (tcp://\S+)", timeout_s=60)
    return proc, match.group(1)
