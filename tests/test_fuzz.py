"""A short run of scripts/fuzz.py against real tracker, seed and relay processes: every socket type
takes its share of malformed, oversized and never-ending input without crashing, hanging or growing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_short_fuzz_run_finds_no_crash_hang_or_growth(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("GTORRENT_TRACKERS", None)
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--frames", "2000", "--seconds", "25", "--seed", "11"],
        capture_output=True, text=True, timeout=170, env=env, cwd=ROOT,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    lines = re.findall(r"^(tracker bootstrap|tracker CurveZMQ|seed|relay)\s+frames\s+(\d+)\s+crashes 0\s+hangs 0\s+unbounded 0", report, re.M)
    assert [name for name, _ in lines] == ["tracker bootstrap", "tracker CurveZMQ", "seed", "relay"], report
    assert all(int(sent) >= 2000 for _, sent in lines), report
