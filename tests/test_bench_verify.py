"""scripts/bench_verify.py: its summaries on fixed inputs (what a run, a detection and a false positive
are), and its tiniest real run (one honest seed, one cheater, one fresh verifier for one epoch)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_verify.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_verify", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_verify"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_epochs_until_untrusted_follow_the_shipped_rule(bench: ModuleType) -> None:
    Judged = bench.Judged
    # R from 0.5: one epoch at C = 0 puts it below 0.3 at once
    assert bench.untrusted_at([Judged(0, "s", 10, 0.0)], first_epoch=10) == 1
    # honest first (R 0.8), then two bad epochs: the window punishment needs both (R 0.32, then 0.128)
    history = [Judged(0, "s", 10, 1.0), Judged(0, "s", 11, 0.0), Judged(0, "s", 12, 0.0)]
    assert bench.untrusted_at(history, first_epoch=10) == 3
    # counted from the verifier's first epoch: an epoch with no verdict still passes
    assert bench.untrusted_at([Judged(0, "s", 12, 0.0)], first_epoch=10) == 3
    assert bench.untrusted_at([Judged(0, "s", e, 1.0) for e in range(10, 13)], first_epoch=10) is None
    assert bench.untrusted_at([], first_epoch=10) is None


def test_a_caught_seed_trusted_again_is_counted(bench: ModuleType) -> None:
    Judged = bench.Judged
    observed = bench.Observed(first_epoch={0: 10, 1: 20})
    # run 0: caught (R 0.2), then one honest-looking epoch lifts it to 0.58: trusted again; then 0 again
    # run 1: caught and kept down
    observed.verdicts = [Judged(0, "s", 10, 0.0), Judged(0, "s", 11, 1.0), Judged(0, "s", 12, 0.0),
                         Judged(1, "s", 20, 0.0), Judged(1, "s", 21, 0.0), Judged(1, "other", 20, 0.0)]
    assert bench.relapses(observed, ["s"]) == (3, 1)
    assert bench.relapses(observed, ["nobody"]) == (0, 0)


def test_detection_false_positives_and_the_report(bench: ModuleType, tmp_path: Path) -> None:
    observed = bench.Observed(first_epoch={0: 100, 1: 200})
    verdicts = [(0, "cheat", 100, 0.0), (1, "cheat", 201, 0.1), (0, "honest", 100, 1.0), (0, "honest", 101, 0.95),
                (1, "honest", 200, 0.35)]
    observed.verdicts = [bench.Judged(*v) for v in verdicts]
    observed.challenges = [
        bench.Challenged(0, "honest", 100, True, 0.2, 1.0, None, 140),
        bench.Challenged(0, "honest", 100, False, 0.1, 0.97, None, 150),
        bench.Challenged(1, "honest", 200, False, None, None, "no route", None),
        bench.Challenged(0, "cheat", 100, True, 0.01, 0.0, None, 130),
    ]
    # run 0: caught in its first epoch; run 1: caught in its second (no verdict in the first)
    assert bench.detection(observed, ["cheat"]) == [1, 2]
    # a seed no run caught counts as a miss in every run
    assert bench.detection(observed, ["ghost"]) == [None, None]
    found = bench.describe_epochs([1, 2, None, 4])
    assert found["within"] == 2 and found["share"] == 0.5 and found["counts"] == {"1": 1, "2": 1, "4": 1, "never": 1}
    fp = bench.false_positives(observed, ["honest"])
    # three honest seed-epochs; one below tau, none untrusted after it (0.4 * 0.5 + 0.5 * 0.35 = 0.375)
    assert fp == {"seed_epochs": 3, "below_tau": 1, "untrusted": 0, "challenges": 2, "sampled": 1, "failed": 1}
    assert bench.lower_bound(100, 100) == pytest.approx(0.05 ** (1 / 100))
    assert 0.0 < bench.lower_bound(9, 10) < 0.9 and bench.lower_bound(0, 0) == 0.0
    assert bench.cpu_ratio(1.0, 10, 20.0, 10) == pytest.approx(0.05) and bench.cpu_ratio(1.0, 0, 1.0, 1) is None
    assert bench.answer_lengths(observed, {"honest"}) == [140, 150]
    cost = {"verifier_cpu_s": 1.0, "challenges": 4, "seed_cpu_s": 2.0, "answers": 2, "generate_cpu_s": 1.0,
            "score_cpu_s": 0.1, "generated": 2}
    text = bench.report(observed, {"honest": ["honest"], "other-weights": ["cheat"]}, cost, ["note: x"])
    assert text.splitlines()[0] == "note: x"
    assert "other-weights" in text and "false positives over 3 honest seed-epochs" in text
    assert "verifier per challenge / seed process per answer: 25.0%" in text
    saved = tmp_path / "saved.json"  # --report prints the same figures from what --json saved
    saved.write_text(json.dumps({"groups": {"honest": ["honest"], "other-weights": ["cheat"]}, "cost": cost,
                                 "notes": ["note: x"], "first_epoch": {"0": 100, "1": 200},
                                 "challenges": [c.__dict__ for c in observed.challenges],
                                 "verdicts": [v.__dict__ for v in observed.verdicts]}))
    assert bench.report(*bench.load_observed(saved)) == text


def test_the_modelled_detection_is_the_rule_enumerated(bench: ModuleType) -> None:
    """A seed honest on half its answers, 3 challenges an epoch and no heavier first epoch: it escapes
    an epoch with probability 1/8; after one escaped epoch (R = 0.8) the paper's rule needs two caught
    epochs in a row, so P(untrusted within 3) = 7/8 + 1/8 x (7/8)^2 = 0.970703125. A first epoch of 9
    challenges (probation 3) makes the first escape 1/512."""
    assert bench.modelled_within(0.5, 3, 1) == pytest.approx(7 / 8 + (1 / 8) * (7 / 8) ** 2, abs=1e-12)
    first = 1 - 0.5**9
    assert bench.modelled_within(0.5, 3, 3) == pytest.approx(first + (1 - first) * (7 / 8) ** 2, abs=1e-12)
    assert bench.modelled_within(1.0, 3, 3) == 1.0 and bench.modelled_within(0.0, 3, 3) == 0.0


def test_bad_arguments_are_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--kinds", "other-weights,lazy"])
    quick = bench.parse_args(["--quick", "--honest-threads", ""])
    assert quick.runs == 3 and quick.honest == 1 and quick.honest_threads == [] and quick.kinds == list(bench.ALL_KINDS)


@pytest.mark.timeout(240)
def test_tiniest_real_run(tmp_path: Path) -> None:
    out = tmp_path / "observed.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--runs", "1", "--epochs-per-run", "1", "--epoch", "4",
         "--kinds", "other-weights", "--honest-threads", "", "--relays", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=220, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "other-weights" in text and "false positives over" in text and "cost (CPU): verifier" in text
    observed = json.loads(out.read_text())
    (honest,), (cheat,) = observed["groups"]["honest"], observed["groups"]["other-weights"]
    verdicts = {v["seed"]: v["credibility"] for v in observed["verdicts"]}
    assert verdicts[honest] > 0.9 and verdicts[cheat] < 0.3  # the one epoch judged both
    assert observed["cost"]["challenges"] >= 2 and observed["cost"]["verifier_cpu_s"] > 0
