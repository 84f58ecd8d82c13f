"""scripts/sim_anonymity.py --quick: the anonymity simulation runs on the real tracker table and planner
and its figures are sane (issue 11, item 5). The full run's figures are in the README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sim_anonymity.py"
F_VALUES = [0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, object]]:
    out = tmp_path_factory.mktemp("sim") / "figures.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


@pytest.mark.timeout(120)
def test_the_table_has_a_row_per_fraction(quick_run: tuple[str, dict[str, object]]) -> None:
    text, result = quick_run
    base, guards, sybils = result["base"], result["guards"], result["sybils"]
    assert isinstance(base, list) and isinstance(guards, list) and isinstance(sybils, list)
    assert [row["f"] for row in base] == F_VALUES == [row["f"] for row in guards]
    assert len(sybils) == 5  # 3 sizes, then the largest listed too briefly, and all in one /16
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == (1 + 7) + (1 + 5) + (1 + 7)  # three tables, each with its header
    assert "0.9290" in text and "0.8807" in text  # the artifact's values sit beside ours


@pytest.mark.timeout(120)
def test_entropy_confidentiality_and_identification_are_sane(quick_run: tuple[str, dict[str, object]]) -> None:
    base = quick_run[1]["base"]
    assert isinstance(base, list)
    for key in ("entropy_artifact_model_l3", "entropy_artifact_model_l4", "entropy_gtorrent_model_l3",
                "entropy_gtorrent_model_l4"):
        values = [row[key] for row in base]
        assert all(0.0 <= v <= 1.0 for v in values), (key, values)
        assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False)), (key, values)
    for row in base:
        assert row["confidentiality"] == 1.0  # no relay ever holds a clove in the clear
        # only a malicious last relay compromises a path in gtorrent's model: never worse than position-blind
        assert row["entropy_gtorrent_model_l3"] >= row["entropy_artifact_model_l3"]
        # (a) one path's first and last implies (b) some first and some last, which implies (c) some first
        assert 0.0 <= row["identified_a"] <= row["identified_b"] <= row["identified_c"] <= 1.0
    at_10 = base[F_VALUES.index(0.1)]
    assert abs(at_10["identified_c"] - at_10["identified_c_formula"]) < 0.12  # 1 - (1 - f)^4 = 0.344


@pytest.mark.timeout(120)
def test_ground_ids_get_their_share_and_the_rules_bite(quick_run: tuple[str, dict[str, object]]) -> None:
    sybils = quick_run[1]["sybils"]
    assert isinstance(sybils, list)
    *spread, fresh, one_network = sybils
    for case in spread:
        assert case["ground_in_lowest_ids"] == case["sybils"]  # they would have filled a lowest-ids answer
        share, fair = case["sybil"]["hop_share"], case["random"]["hop_share"]
        assert abs(share - fair) <= 0.5 * case["f"] + 0.005, case
        assert abs(case["listing_share"] - case["f"]) <= 0.5 * case["f"] + 0.002, case
    assert fresh["sybil"]["hop_share"] == 0.0 and fresh["random"]["hop_share"] > 0  # listed under 30 min
    # one /16: at most one of them per path, so none owns a path or is first and last of one
    assert one_network["sybil"]["owned_paths"] == 0.0 and one_network["sybil"]["identified_a"] == 0.0


@pytest.mark.timeout(120)
def test_guards_cap_exposure_over_many_asks(quick_run: tuple[str, dict[str, object]]) -> None:
    guards = quick_run[1]["guards"]
    assert isinstance(guards, list)
    at_10 = guards[F_VALUES.index(0.1)]
    assert at_10["c_guards"] < at_10["c_plain"]
    assert at_10["c_plain"] > 0.95  # 400 fresh first hops: identified almost surely
    assert at_10["c_guards"] < 0.75  # 4 guards: about 1 - 0.9^4 = 0.34
