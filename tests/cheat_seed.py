"""A cheating seed as a real process (issue 8 item 7), for swarm tests and scripts/bench_verify.py.

    python -m tests.cheat_seed --kind KIND [--honest-share F] [--model DIR] --tracker URL
        [--bind tcp://127.0.0.1:0] [--threads N]

run from the repository root with GTORRENT_HOME set. It serves exactly as `gtorrent seed` does
(node.run_seed: the same SeedService, announces, lock on the home, signals) with the model object
`tests.cheaters.cheat_model(KIND, honest)`: it announces the honest model's id and name (MODEL, default
the bundled demo model) and signs its transcripts correctly; only what it generates lies. It prints to
stderr the lines `gtorrent seed` prints that tests wait for, above all the ready line
`seeding as PEER_ID on ENDPOINT to TRACKERS …` (tests/procs.py start_seed's pattern).

KIND: honest | other-weights | smaller | truncate | canned | sometimes (tests/cheaters.py).
`--threads N` sets ONNX Runtime's intra-op threads of every model it loads (0: ORT's default), so an
honest seed with other thread settings is `--kind honest --threads 1`. `--honest-share F`: the share
of asks a `sometimes` seed answers honestly (default 0.5).

`start_cheat_seed(home, trackers, kind, *extra)` starts one from a test, as procs.start_seed does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cheaters import CHEAT_KINDS, cheat_model
from .procs import Proc

ROOT = Path(__file__).resolve().parent.parent
READY = r"seeding as (\w+) on (tcp://\S+)"  # = tests/procs.py start_seed's pattern


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cheat_seed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=CHEAT_KINDS)
    parser.add_argument("--honest-share", type=float, default=0.5, help="share of honest answers (sometimes)")
    parser.add_argument("--model", type=Path, default=None, help="the honest model (default: the demo model)")
    parser.add_argument("--tracker", action="append", default=[], help="tracker URL (repeatable)")
    parser.add_argument("--bind", default="tcp://127.0.0.1:0")
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    parser.add_argument("--max-concurrency", type=int, default=1)
    parser.add_argument("--forwarding", default=None, help="the model group's routing policy (default: tree+lb)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.honest_share <= 1.0:
        parser.error("--honest-share must be within 0..1")

    from gtorrent_cli.common import settings

    from gtorrent.errors import GtorrentError
    from gtorrent.node import SeedEvents, run_seed
    from gtorrent.paths import NODE_LOCK, lock_home
    from gtorrent.runtime import LanguageModel

    try:
        node = settings(args.tracker or None)
        lock_home(
            node.home, NODE_LOCK, "seed"
        ).release()  # refuse a busy home before loading, as `gtorrent seed`
        honest = LanguageModel.load(args.model, cache_dir=node.home / "cache", intra_op_threads=args.threads)
        model = cheat_model(args.kind, honest, args.honest_share, intra_op_threads=args.threads)
        say(f"loaded {model.name} ({model.model_id[:12]}) for a cheat seed of kind {args.kind}")

        def ready(seed: Any) -> None:
            trackers = ", ".join(t.address for t in seed.announcer.trackers)
            say(
                f"seeding as {seed.identity.peer_id} on {seed.server.endpoint} to {trackers} · "
                f"up to {args.max_concurrency} at once · cheat kind {args.kind} · Ctrl-C to stop"
            )

        def announced(errors: dict[str, str]) -> None:
            for url, message in errors.items():
                say(f"warning: announce to {url} failed: {message}")

        events = SeedEvents(
            tracker_started=lambda url: say(f"no tracker answered at {url}: started one in this process"),
            ready=ready,
            announced=announced,
            stopping=lambda: say("stopping: telling the trackers…"),
        )
        counters = run_seed(
            node, model, bind=args.bind, name=None, max_concurrency=args.max_concurrency, events=events,
            forwarding=args.forwarding,
        )
    except GtorrentError as exc:
        say(f"error: {exc.message}")
        if exc.hint:
            say(f"hint: {exc.hint}")
        return 1
    say(
        f"seed stopped ({counters.get('received', 0)} requests, {counters.get('dropped', 0)} dropped; "
        f"{model.honest_asks} of {model.asks} answered honestly)"
    )
    return 0


class CheatProc(Proc):
    """tests/procs.py's Proc running `python -m tests.cheat_seed` instead of `gtorrent`."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None) -> None:
        import os
        import queue
        import subprocess
        import threading

        full_env = {k: v for k, v in os.environ.items() if k != "GTORRENT_TRACKERS"}
        full_env.update(
            {"GTORRENT_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
        )
        self.args = ["cheat_seed", *args]
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.cheat_seed", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()


def start_cheat_seed(home: Path, trackers: list[str], kind: str, *extra: str) -> tuple[CheatProc, str]:
    """Start a cheating seed process of `kind`; (the process, its peer id) once it is serving."""
    args = ["--kind", kind, *extra]
    for url in trackers:
        args += ["--tracker", url]
    proc = CheatProc(args, home)
    match = proc.wait_for(READY, timeout_s=60)
    return proc, match.group(1)


if __name__ == "__main__":
    sys.exit(main())
