"""scripts/bench_forwarding.py: the workload generator's properties, the simulation (deterministic, routing
with the real gtorrent.forwarding code over real prefix caches), and a --quick run of its simulation part.
No timing assertions: the cost model here is fixed, and the smoke run only has to finish and report."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_forwarding.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_forwarding", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_forwarding"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def encode(bench: ModuleType):  # type: ignore[no-untyped-def]
    return bench.demo_encoder()


@pytest.fixture(scope="module")
def cost(bench: ModuleType):  # type: ignore[no-untyped-def]
    """A fixed cost model of the demo model's order of magnitude (no measurement in tests)."""
    return bench.CostModel(
        miss_base_s=0.0, miss_per_token_s=66e-6, hit_base_s=1.2e-3, hit_per_token_s=44e-6, hit_per_cached_s=4e-6,
        decode_base_s=0.6e-3, decode_per_context_s=1.3e-6, kv_bytes_per_token=4096, slowdown=[1.0, 2.2, 3.5, 4.7],
        overhead_s=0.004, ttft_overhead_s=0.002, forward_s=0.003,
    )


def test_workload_is_deterministic_under_its_seed(bench: ModuleType, encode) -> None:  # type: ignore[no-untyped-def]
    one = bench.make_workload(encode, seed=5, requests=50, rate=10.0, prefixes=8)
    again = bench.make_workload(encode, seed=5, requests=50, rate=10.0, prefixes=8)
    other = bench.make_workload(encode, seed=6, requests=50, rate=10.0, prefixes=8)
    assert one == again
    assert [r.prompt for r in one.requests] != [r.prompt for r in other.requests]
    # a longer trace of the same seed shares the prefixes (the paper-scale trace reuses the catalogue)
    assert bench.make_workload(encode, seed=5, requests=80, rate=3.0, prefixes=8).prefixes == one.prefixes


def test_prefixes_are_long_shared_and_fit_the_context(bench: ModuleType, encode) -> None:  # type: ignore[no-untyped-def]
    workload = bench.make_workload(encode, seed=1, requests=200, rate=10.0, prefixes=12)
    low, high = bench.PREFIX_TOKENS
    for prefix in workload.prefixes:
        assert low - 10 <= prefix.tokens <= high, prefix.tokens
        assert prefix.tokens == len(encode(prefix.text))
    # no two prefixes share their first chunk: a hit always means the same prefix
    firsts = {tuple(encode(p.text)[: bench.CHUNK_TOKENS]) for p in workload.prefixes}
    assert len(firsts) == len(workload.prefixes)
    for request in workload.requests:
        prefix_ids = encode(workload.prefixes[request.prefix].text)
        assert list(request.token_ids[: len(prefix_ids) - 1]) == prefix_ids[:-1]  # shared up to the last token
        assert len(request.token_ids) + workload.output_tokens <= bench.CONTEXT_TOKENS
        assert len(request.token_ids) - len(prefix_ids) <= 60  # a short query after it


def test_queries_are_unique(bench: ModuleType, encode) -> None:  # type: ignore[no-untyped-def]
    workload = bench.make_workload(encode, seed=2, requests=300, rate=10.0, prefixes=5)
    prompts = [r.prompt for r in workload.requests]
    assert len(set(prompts)) == len(prompts)
    assert len({r.token_ids for r in workload.requests}) == len(prompts)


def test_popularity_is_zipf(bench: ModuleType, encode) -> None:  # type: ignore[no-untyped-def]
    n, prefixes = 4000, 10
    workload = bench.make_workload(encode, seed=3, requests=n, rate=100.0, prefixes=prefixes)
    counts = Counter(r.prefix for r in workload.requests)
    weights = bench.zipf_weights(prefixes, 1.1)
    assert weights[0] / weights[1] == pytest.approx(2**1.1)
    for rank in range(prefixes):  # within 4 standard deviations of the binomial count
        expected = n * weights[rank]
        assert abs(counts[rank] - expected) <= 4 * (expected * (1 - weights[rank])) ** 0.5, (rank, counts[rank], expected)
    assert counts[0] > counts[1] > counts[4] > counts[9]


def test_arrivals_are_poisson_and_entries_uniform(bench: ModuleType, encode) -> None:  # type: ignore[no-untyped-def]
    rate, n = 20.0, 3000
    workload = bench.make_workload(encode, seed=4, requests=n, rate=rate, prefixes=4)
    arrivals = [r.arrival_s for r in workload.requests]
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals, strict=False)]
    assert all(gap > 0 for gap in gaps)
    mean = statistics.mean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.08)
    assert statistics.stdev(gaps) / mean == pytest.approx(1.0, abs=0.08)  # exponential: CV 1
    entries = Counter(r.entry_of(4) for r in workload.requests)
    assert set(entries) == {0, 1, 2, 3}
    assert all(abs(count - n / 4) < 4 * (n * 3 / 16) ** 0.5 for count in entries.values())


def test_simulation_is_deterministic(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    workload = bench.make_workload(encode, seed=7, requests=150, rate=60.0, prefixes=10)
    for policy in bench.COMPARED:
        first = bench.simulate(workload, policy, cost, seeds=4, cache_bytes=8 << 20, shared_machine=True)
        second = bench.simulate(workload, policy, cost, seeds=4, cache_bytes=8 << 20, shared_machine=True)
        assert first == second
        outcomes, busy = first
        assert [o.index for o in outcomes] == list(range(150))
        assert all(o.ok and o.latency_s > 0 and 0 < o.ttft_s <= o.latency_s for o in outcomes)
        assert 0 < busy <= 1


def test_simulation_routes_with_the_real_code(bench: ModuleType, encode, cost, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import gtorrent.forwarding as forwarding

    workload = bench.make_workload(encode, seed=8, requests=300, rate=40.0, prefixes=10)
    calls: list[str] = []
    real_choose = forwarding.choose

    def spy(policy, digests, members, self_id, *, turn):  # type: ignore[no-untyped-def]
        calls.append(policy)
        return real_choose(policy, digests, members, self_id, turn=turn)

    monkeypatch.setattr(forwarding, "choose", spy)
    results = {}
    for policy in ("off", "rr", "tree"):
        outcomes, _ = bench.simulate(workload, policy, cost, seeds=4, cache_bytes=8 << 20, shared_machine=False)
        results[policy] = bench.summarise(outcomes)
    assert Counter(calls) == {"off": 300, "rr": 300, "tree": 300}  # one routing decision per request
    assert results["off"]["forwarded"] == 0  # "off" serves at the entry
    assert results["rr"]["forwarded"] == pytest.approx(0.75, abs=0.06)  # round robin over 4: 3 in 4 leave
    # the HR-tree policy sends a prefix where it is cached: more of the prompts come from the caches
    assert results["tree"]["hit_rate"] > results["rr"]["hit_rate"] > 0


def test_simulated_caches_evict(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    workload = bench.make_workload(encode, seed=9, requests=300, rate=40.0, prefixes=10)
    roomy, _ = bench.simulate(workload, "tree", cost, seeds=4, cache_bytes=64 << 20, shared_machine=False)
    # room for about one prompt's state per seed: most prefixes are evicted before they come back
    tight, _ = bench.simulate(workload, "tree", cost, seeds=4, cache_bytes=2 << 20, shared_machine=False)
    none, _ = bench.simulate(workload, "tree", cost, seeds=4, cache_bytes=0, shared_machine=False)
    hit = {name: bench.summarise(o)["hit_rate"] for name, o in (("roomy", roomy), ("tight", tight), ("none", none))}
    assert hit["roomy"] > hit["tight"] > hit["none"] == 0


@pytest.mark.timeout(600)
def test_quick_simulation_run(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    report = tmp_path / "report.txt"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--skip-real", "--sim-requests", "300", "--json", str(out),
         "--report", str(report)],
        capture_output=True, text=True, timeout=570,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["simulation"]["results"]) == {"rr", "least-load", "tree", "tree+lb"}
    assert figures["cost"]["miss_per_token_s"] > 0 and figures["cost"]["kv_bytes_per_token"] > 0
    text = report.read_text()
    assert "real run: NOT RUN (--skip-real)" in text
    assert "target tree+lb / rr mean <= 0.40x" in text and "target tree+lb / rr p99  <= 0.50x" in text
    assert "prefill, miss" in text and "slowdown s(k)" in text
    assert "model_simulation" not in figures and "(simulation, 8 seeds, demo model)" in text


@pytest.mark.timeout(600)
def test_quick_simulation_with_another_models_cost(tmp_path: Path) -> None:
    """--sim-model: the paper-scale simulation runs again with that model's cost (measured here), and
    the targets are judged on it; a model that cannot hold the trace is refused."""
    out = tmp_path / "figures.json"
    model = Path(__file__).parent / "models" / "llama-small"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--skip-real", "--sim-requests", "200", "--policies", "rr,tree+lb",
         "--sim-model", str(model), "--json", str(out)],
        capture_output=True, text=True, timeout=570,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["model_simulation"]["results"]) == {"rr", "tree+lb"}
    assert figures["model_cost"]["kv_bytes_per_token"] != figures["cost"]["kv_bytes_per_token"]
    assert figures["targets"]["where"] == "simulation, 8 seeds, llama-small"
    assert "the same at the paper's scale with" in run.stdout or "llama-small" in json.dumps(figures)
    refused = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--skip-real", "--sim-requests", "100",
                              "--sim-model", str(Path(__file__).parent / "models" / "gpt2-tiny")],
                             capture_output=True, text=True, timeout=570)
    assert refused.returncode != 0 and "fewer than the trace's 512" in refused.stderr


def test_probe_calibration_recovers_the_seeds_timings_and_overheads(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    probes = bench.probe_requests(encode, 24, seed=1)
    unique, shared = probes[:24], probes[24:]
    assert all(len(p.token_ids) <= 60 for p in unique[::2]) and all(len(p.token_ids) > 300 for p in unique[1::2])
    assert [p.entry_of(4) for p in unique[:5]] == [0, 1, 2, 3, 0]
    prefixes, asks = bench.HIT_PROBES
    assert len(shared) == prefixes * asks
    for h in range(prefixes):  # one prefix, asked `asks` times in a row at one entry
        group = shared[h * asks:(h + 1) * asks]
        assert len({p.entry_of(4) for p in group}) == 1 and len({p.prompt for p in group}) == asks
        assert len(set(p.token_ids[:300] for p in group)) == 1 and len(group[0].token_ids) > 300
    prompts = {p.index: p for p in probes}
    a, b, d0, d1, overhead, ttft_overhead, hop, tokens = 0.002, 90e-6, 0.0015, 3e-6, 0.012, 0.006, 0.009, 16
    slower, hit_scale = 1.2, 1.5  # a forwarded answer's generation, a hit's prefill over the in-process model
    outcomes = []
    for n, probe in enumerate(probes):
        forwarded = n % 3 == 0
        length = len(probe.token_ids)
        cached = 300 if probe in shared and (n - 24) % asks else 0
        seed_ttft = (cost.prefill_s(length, cached) * hit_scale if cached else a + b * length) * (slower if forwarded else 1)
        seed_total = seed_ttft + (tokens - 1) * (d0 + d1 * (length + tokens / 2)) * (slower if forwarded else 1)
        extra = hop if forwarded else 0.0
        outcomes.append(bench.Outcome(probe.index, 0, 1 if forwarded else 0, True,
                                      latency_s=seed_total + overhead + extra, ttft_s=seed_ttft + ttft_overhead + extra,
                                      cached=cached, tokens=tokens, prompt_tokens=length, seed_ttft_s=seed_ttft,
                                      seed_total_s=seed_total))
    local = [o for o in outcomes if not o.forwarded]
    found = bench.calibrate(cost, local, prompts)  # local ones alone: the fit is exact
    assert found.prefill_per_token_s == pytest.approx(b, rel=1e-6)
    assert found.prefill_base_s == pytest.approx(a, abs=1e-7)
    assert found.decode_per_context_s == pytest.approx(d1, rel=1e-6)
    assert found.decode_base_s == pytest.approx(d0, abs=1e-7)
    assert (found.overhead_s, found.ttft_overhead_s, found.hop_s) == pytest.approx((overhead, ttft_overhead, None))
    assert found.hit_scale == pytest.approx(hit_scale) and found.forwarded_factor == 1.0
    both = bench.calibrate(cost, outcomes, prompts)
    assert both.forwarded_factor == pytest.approx(slower, rel=0.05) and both.hit_scale == pytest.approx(hit_scale, rel=0.25)
    assert both.hop_s == pytest.approx(hop, rel=0.3) and both.overhead_s == pytest.approx(overhead)
    seeds = found.apply(cost, hop_s=0.004)
    assert seeds.prefill_s(300, 0) == pytest.approx(a + b * 300)
    # the hit prefill as the hit probes found it; sharing and the hop as given
    assert seeds.prefill_s(300, 200) == pytest.approx(cost.prefill_s(300, 200) * hit_scale)
    assert (seeds.forward_s, seeds.slowdown, seeds.forwarded_factor) == (0.004, cost.slowdown, 1.0)
    # without hit probes the hit prefill scales like the miss's per-token cost
    misses = bench.calibrate(cost, [o for o in local if not o.cached], prompts)
    assert misses.hit_scale is None
    assert misses.apply(cost, 0.0).prefill_s(300, 200) == pytest.approx(cost.prefill_s(300, 200) * b / cost.miss_per_token_s)
    # too few, or only one length: no calibration
    assert bench.calibrate(cost, outcomes[:3], prompts) is None
    assert bench.calibrate(cost, outcomes[:24:2], prompts) is None


def test_entries_count_their_own_forwards_as_the_seeds_do(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    # a few arrivals per group exchange: with only the members' last states, every entry would send its
    # burst to the member that looked least loaded then (least-load about 2x round robin's mean here);
    # counting its own forwards until the member's next state (group.note_forward, group.routing_view)
    # spreads them, as in the seeds. Simulated time: deterministic, no wall clock involved.
    workload = bench.make_workload(encode, seed=10, requests=600, rate=70.0, prefixes=10)
    mean = {
        policy: bench.summarise(bench.simulate(workload, policy, cost, seeds=4, cache_bytes=8 << 20,
                                               shared_machine=False)[0])["mean_s"]
        for policy in ("rr", "least-load")
    }
    assert mean["least-load"] < 1.3 * mean["rr"], mean


def test_a_shared_machine_slows_forwards_and_loses_the_background_cores(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    """On one machine a forward's generation is slower by the probes' factor (its entry relays on the same
    cores) and the client's and tracker's cores are the seeds' loss; a machine per seed has neither.
    Arrivals far apart: no two requests overlap, so every service time is exact."""
    import os
    from dataclasses import replace

    made = bench.make_workload(encode, seed=11, requests=30, rate=0.5, prefixes=10)
    workload = replace(made, requests=tuple(replace(r, arrival_s=10.0 * r.index) for r in made.requests))
    slow = replace(cost, forwarded_factor=2.0)

    def service(model, shared: bool, background: float = 0.0) -> list[tuple[bool, float]]:  # type: ignore[no-untyped-def]
        outcomes, _ = bench.simulate(workload, "rr", model, seeds=4, cache_bytes=8 << 20, shared_machine=shared,
                                     background_cores=background)
        return [(o.forwarded, o.seed_total_s) for o in outcomes]

    plain, slowed = service(cost, True), service(slow, True)
    assert {f for f, _ in plain} == {True, False}
    for (forwarded, a), (_, b) in zip(plain, slowed, strict=True):
        assert b == pytest.approx(2 * a if forwarded else a)
    assert service(slow, False) == service(cost, False) == plain  # no sharing: no factor
    half = (os.cpu_count() or 1) / 2
    for (_, a), (_, b) in zip(plain, service(cost, True, half), strict=True):
        assert b == pytest.approx(2 * a)  # half the cores gone: each request takes twice as long


def test_alone_keeps_the_requests_that_had_the_machine_to_themselves(bench: ModuleType, encode) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    made = bench.make_workload(encode, seed=12, requests=4, rate=1.0, prefixes=4)
    workload = replace(made, requests=tuple(replace(r, arrival_s=1.0 * r.index) for r in made.requests))
    at = [r.arrival_s for r in workload.requests]

    def outcome(index: int, latency: float, service: float) -> Any:
        return bench.Outcome(index, 0, 0, True, latency_s=latency, seed_total_s=service, tokens=16)

    # 0 and 1 alone (1 generates until just after 2 arrives: 2 waits for it, its time overlapped, so 2 is
    # not alone); 3 unanswered
    gap = at[2] - at[1]
    outcomes = [outcome(0, 0.05, 0.04), outcome(1, gap + 0.03, gap + 0.02), outcome(2, 0.2, 0.05),
                bench.Outcome(3, 0, -1, False, error="busy")]
    assert [o.index for o in bench.alone(outcomes, workload)] == [0, 1]
    assert [o.index for o in bench.alone(outcomes, workload, most=0.2)] == [0, 1, 2]  # 0.03 s of 0.2 s


def test_the_seeds_slowdown_is_recovered_from_a_trace_served_by_processor_sharing(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    """A trace served on one machine by a known s(k): fitting each request's busy shares against its
    alone time over the time it took gives that s(k) back (the validation's sharing comes from this fit
    on the real seeds, not from the worker processes' closed loop)."""
    from dataclasses import replace

    truth = [1.0, 2.4, 3.6, 5.0]
    exact = replace(cost, slowdown=truth, overhead_s=0.0, ttft_overhead_s=0.0, forward_s=0.0)
    workload = bench.make_workload(encode, seed=13, requests=400, rate=14.0, prefixes=12)
    samples = []
    for policy in ("rr", "tree+lb"):
        outcomes, _ = bench.simulate(workload, policy, exact, seeds=4, cache_bytes=8 << 20, shared_machine=True)
        shares = bench.busy_shares(outcomes, workload, exact)
        assert len(shares) == len(outcomes)
        for share, taken, alone in shares:
            assert share.sum() == pytest.approx(1.0) and taken > 0 and alone > 0
        samples += shares
    assert sum(share[3] * taken for share, taken, _ in samples) > 2.0  # the trace reached 4 busy seeds
    found = bench.slowdown_in_seeds(samples, fallback=[1.0, 9.0, 9.0, 9.0])
    assert found == pytest.approx(truth, rel=0.02)
    # the worker processes' s(k) is only the fallback: with no sample, and past the k the traces reached
    assert bench.slowdown_in_seeds([], fallback=[1.0, 9.0]) == [1.0, 9.0]
    two = [s for s in samples if s[0][2:].sum() == 0]  # only requests that never saw 3 seeds busy
    partial = bench.slowdown_in_seeds(two, fallback=[1.0, 9.0, 9.0, 9.0])
    assert partial[1] == pytest.approx(truth[1], rel=0.02)
    assert partial[2:] == pytest.approx([partial[1] * 3 / 2, partial[1] * 4 / 2])  # linear beyond the data


def test_overheads_that_grow_with_the_busy_seeds_are_recovered_from_a_trace(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    """On one machine the client's, entry's and transport's work waits for the cores the seeds generate on:
    a trace simulated with overheads growing by a known share per other seed generating gives that share
    back from the requests that did not wait for their seed; with none, none is found; on machines of their
    own the share changes nothing."""
    from dataclasses import replace

    workload = bench.make_workload(encode, seed=14, requests=400, rate=14.0, prefixes=12)
    slow = replace(cost, overhead_s=0.008, ttft_overhead_s=0.006, forward_s=0.005)

    def fitted(model) -> float:  # type: ignore[no-untyped-def]
        samples = []
        for policy in ("rr", "least-load"):
            outcomes, _ = bench.simulate(workload, policy, model, seeds=4, cache_bytes=8 << 20, shared_machine=True)
            samples += bench.overhead_samples(outcomes, workload, model)
        assert 100 < len(samples) < 800  # those that waited for their seed are left out
        assert any(others > 1.0 for _, others, _ in samples)
        return bench.fit_busy_overhead(samples)

    assert fitted(replace(slow, busy_overhead=0.5)) == pytest.approx(0.5, rel=0.15)
    assert fitted(slow) < 0.05
    assert bench.fit_busy_overhead([]) == 0.0

    def alone(model) -> list[float]:  # type: ignore[no-untyped-def]
        return [o.latency_s for o in bench.simulate(workload, "rr", model, seeds=8, cache_bytes=8 << 20,
                                                    shared_machine=False)[0]]

    assert alone(replace(slow, busy_overhead=0.5)) == alone(slow)


def test_the_contention_of_a_shared_machine_is_recovered_from_its_traces(bench: ModuleType, encode, cost) -> None:  # type: ignore[no-untyped-def]
    """Traces served with hits slower than the cost model says (as the real seeds' are, decoding after a
    hit): Contention.fit gives s(k), the overheads' growth and that hit factor back, and applying it
    reproduces the traces."""
    from dataclasses import replace

    truth = bench.Contention([1.0, 1.6, 2.4, 3.3], busy_overhead=0.4, hit_factor=1.25)
    idle = replace(cost, overhead_s=0.008, ttft_overhead_s=0.006, forward_s=0.005)
    workload = bench.make_workload(encode, seed=15, requests=400, rate=16.0, prefixes=12)
    runs = [bench.simulate(workload, policy, truth.apply(idle), seeds=4, cache_bytes=8 << 20, shared_machine=True)[0]
            for policy in ("rr", "tree+lb")]
    assert sum(o.cached > 0 for run in runs for o in run) > 200
    found = bench.Contention.fit(runs, workload, idle, fallback=[1.0, 9.0, 9.0, 9.0])
    assert found.slowdown == pytest.approx(truth.slowdown, rel=0.05)
    assert found.busy_overhead == pytest.approx(truth.busy_overhead, rel=0.15)
    assert found.hit_factor == pytest.approx(truth.hit_factor, rel=0.03)
    assert bench.Contention.fit([], workload, idle, fallback=[1.0, 2.0]) == bench.Contention([1.0, 2.0], 0.0, 1.0)
    again = bench.simulate(workload, "rr", found.apply(idle), seeds=4, cache_bytes=8 << 20, shared_machine=True)[0]
    assert bench.summarise(again)["mean_s"] == pytest.approx(bench.summarise(runs[0])["mean_s"], rel=0.03)


@pytest.mark.parametrize(("args", "message"), [
    (["--real-rounds", "0"], "--real-rounds must be at least 1"),
    (["--policies", "rr,fastest"], "unknown policies fastest"),
])
def test_bad_flags_are_refused_before_anything_is_measured(args: list[str], message: str) -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
