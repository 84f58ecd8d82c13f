#!/usr/bin/env python3
"""Benchmark of verification on a real swarm (issue 8): detection speed, false positives, separation, cost.

Real processes on 127.0.0.1, short epochs: one tracker (admitting any verifier), honest seeds (`gtorrent
seed`, and `python -m tests.cheat_seed --kind honest --threads N` for other ONNX Runtime thread settings),
`--per-kind` seeds of each cheat kind (`python -m tests.cheat_seed --kind KIND`; a kind whose process
does not start is skipped with a note), `--relays` relays, and one `gtorrent verify --json` at a time.

What a run is: one fresh verifier (new home, new identity, empty store) verifying the swarm for
`--epochs-per-run` epochs (`gtorrent verify --epochs N`), read as a fresh client trusting that verifier
alone would read it. A run starts every seed from nothing (reputation 0.5, unverified, the full
challenge rate), so runs are independent draws of "how many epochs until this seed is untrusted",
counted from the first epoch the verifier runs (its first "epoch" event: 1 = untrusted after its first
verdict; an epoch without a verdict for the seed still counts). Within a run the verifier behaves as it
does in the swarm: a seed it marked untrusted gets a third of the challenges from then on. Runs are
sequential; seeds and tracker live for the whole bench. A `sometimes` seed answers honestly on half of
the asks (tests/cheat_seed.py's default --honest-share).

Printed, side by side:
- per cheat kind, per seed-run: epochs until untrusted (distribution; "never" = still trusted after the
  run's epochs), the share within 3 epochs with its 95 % lower confidence bound (Clopper-Pearson; only
  runs enough to show the ≥ 99 % target when that bound says so);
- false positives: honest seed-epochs with C below the paper's tau = 0.4, and those after which a fresh
  client would hold the seed untrusted (target 0 of both), with sampled-challenge counts;
- separation, per kind: each challenge's paper credibility (1/PPL, top-50) and calibrated score, and
  each epoch's C (the verdict's, calibrated: the one that feeds reputation), min / median / max;
- cost: the verifier's CPU per challenge (utime + stime of the verifier process from its first epoch
  event to its exit: planning prompts, onion paths and S-IDA, scoring, signing, tracker traffic) over
  (a) an honest `gtorrent seed` process's CPU per answer (its CPU from ready to the end over the
  challenges it answered: generation, onion layers, transcript signing, and relaying for others'
  circuits, as seeds are relays too) and (b) the CPU of generating answers of the same lengths with the
  same model in this process (generation alone). Both from /proc/PID/stat (all threads). Two parts of
  the verifier's cost are measured alone in this process too: scoring an answer, planning a challenge.

The demo model is tiny (generation of a 160-token answer takes ~0.2 s), so fixed per-challenge costs
weigh far more here than against a real model's generation.

Defaults: 17 runs of 3 epochs of 12 s over 3 honest seeds, 1 honest seed with 1 intra-op thread and 1 seed
per cheat kind: 17 seed-runs per kind and 204 honest seed-epochs, about 12 minutes on 2 cores. --quick:
3 runs of 8 s epochs, 1 + 1 honest seeds: about 2 minutes.

Usage: python scripts/bench_verify.py [--quick] [--runs 17] [--epochs-per-run 3] [--epoch 12]
           [--challenges 3] [--honest 3] [--honest-threads 1] [--kinds K,K] [--per-kind 1] [--relays 2]
           [--json FILE] [--report FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GTORRENT = str(Path(sys.executable).parent / "gtorrent")
CHEAT_ENTRY = [sys.executable, "-m", "tests.cheat_seed"]
ALL_KINDS = ("other-weights", "smaller", "truncate", "canned", "sometimes")
HORIZON = 3  # the target: untrusted within this many epochs
TAU = 0.4  # the paper's abnormal-epoch threshold (gtorrent.reputation.TAU)
READY = {"tracker": "tracker (tcp://\\S+)", "seed": "seeding as (\\w+) on (tcp://\\S+)", "relay": "relaying as (\\w+)"}


# ---------------------------------------------------------------------- pure summaries (tested)


@dataclass(frozen=True)
class Challenged:
    run: int
    seed: str
    epoch: int
    greedy: bool
    paper: float | None
    calibrated: float | None
    error: str | None
    tokens: int | None = None  # the answer's length (None: no answer)
    seed_failed: bool = False  # the seed was reached and failed it: counted as 0 (gtorrent/verifier.py)


@dataclass(frozen=True)
class Judged:
    run: int
    seed: str
    epoch: int
    credibility: float


@dataclass
class Observed:
    """What the runs produced: per run its first epoch, every challenge and verdict event."""

    first_epoch: dict[int, int] = field(default_factory=dict)
    challenges: list[Challenged] = field(default_factory=list)
    verdicts: list[Judged] = field(default_factory=list)


def reputation_after(credibilities: Sequence[float]) -> float:
    """The shipped rule (gtorrent.reputation): R after these epochs' consensus C, oldest first."""
    from gtorrent.reputation import verification_reputation

    return verification_reputation(list(credibilities))


def untrusted_at(verdicts: Iterable[Judged], first_epoch: int) -> int | None:
    """Epochs (1 = the run's first) until a fresh client trusting this run's verifier holds the seed
    untrusted; None: never within the run. Epochs without a verdict still count as time passing."""
    from gtorrent.reputation import UNTRUSTED_BELOW

    seen: list[float] = []
    for verdict in sorted(verdicts, key=lambda v: v.epoch):
        seen.append(verdict.credibility)
        if reputation_after(seen) < UNTRUSTED_BELOW:
            return verdict.epoch - first_epoch + 1
    return None


def per_seed_run(observed: Observed) -> dict[tuple[int, str], list[Judged]]:
    out: dict[tuple[int, str], list[Judged]] = {}
    for verdict in observed.verdicts:
        out.setdefault((verdict.run, verdict.seed), []).append(verdict)
    return out


def detection(observed: Observed, seeds: Sequence[str]) -> list[int | None]:
    """Epochs until untrusted for each (run, seed) of these seeds; a seed with no verdict in a run is a
    miss (None) too: it was never caught there."""
    runs = per_seed_run(observed)
    return [untrusted_at(runs.get((run, seed), []), first) for run, first in sorted(observed.first_epoch.items())
            for seed in seeds]


def relapses(observed: Observed, seeds: Sequence[str]) -> tuple[int, int]:
    """After a seed is first held untrusted in a run: (its later epochs with a verdict, those after which a
    fresh client holds it trusted again). A cheater that is trusted again gets asks again."""
    from gtorrent.reputation import UNTRUSTED_BELOW

    later = trusted_again = 0
    for (_, seed), verdicts in per_seed_run(observed).items():
        if seed not in seeds:
            continue
        seen: list[float] = []
        caught = False
        for verdict in sorted(verdicts, key=lambda v: v.epoch):
            seen.append(verdict.credibility)
            trusted = reputation_after(seen) >= UNTRUSTED_BELOW
            if caught:
                later += 1
                trusted_again += trusted
            caught = caught or not trusted
    return later, trusted_again


def lower_bound(successes: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower bound of a success share (exact for successes == trials)."""
    if trials == 0:
        return 0.0
    if successes == trials:
        return float((1 - confidence) ** (1 / trials))
    low, high = 0.0, successes / trials  # bisection on the binomial tail P(X >= successes | p) = 1 - confidence
    for _ in range(60):
        mid = (low + high) / 2
        tail = sum(math.comb(trials, i) * mid**i * (1 - mid) ** (trials - i) for i in range(successes, trials + 1))
        low, high = (mid, high) if tail < 1 - confidence else (low, mid)
    return low


def catch_rate(observed: Observed, seeds: Sequence[str]) -> tuple[int, int]:
    """(challenges of these seeds counted in C that scored below tau, all counted): per-challenge catches."""
    counted = [c for c in observed.challenges if c.seed in seeds and c.calibrated is not None]
    return sum(1 for c in counted if c.calibrated is not None and c.calibrated < TAU), len(counted)


def modelled_within(catch: float, challenges: int, probation: int, horizon: int = HORIZON) -> float:
    """P(untrusted within `horizon` epochs) for a seed each of whose challenges is caught (scores 0)
    with probability `catch`, independently, under the shipped rule and schedule: the verifier's first
    epoch of a seed holds challenges x probation (challenges.challenge_count), later ones `challenges`
    while it is trusted; an epoch's C is 0 when any challenge was caught, else 1 (the epoch's lowest
    score; measured C's are 0 or 1 but for rare partial scores). Exact enumeration of the 2^horizon
    epoch outcomes."""
    from gtorrent.reputation import UNTRUSTED_BELOW

    def caught(n: int) -> float:
        return 1.0 - (1.0 - catch) ** n

    def walk(history: list[float], probability: float) -> float:
        if reputation_after(history) < UNTRUSTED_BELOW:
            return probability if history else 0.0
        if len(history) == horizon:
            return 0.0
        n = challenges * (probation if not history else 1)
        q = caught(n)
        return walk([*history, 0.0], probability * q) + walk([*history, 1.0], probability * (1 - q))

    return walk([], 1.0)


def describe_epochs(values: Sequence[int | None], horizon: int = HORIZON) -> dict[str, Any]:
    within = sum(1 for v in values if v is not None and v <= horizon)
    counts: dict[str, int] = {}
    for value in values:
        key = "never" if value is None else str(value)
        counts[key] = counts.get(key, 0) + 1
    order = sorted((k for k in counts if k != "never"), key=int) + (["never"] if "never" in counts else [])
    return {"runs": len(values), "within": within, "share": within / len(values) if values else 0.0,
            "lower_bound": lower_bound(within, len(values)), "counts": {k: counts[k] for k in order}}


def false_positives(observed: Observed, honest: Sequence[str]) -> dict[str, int]:
    """Honest seed-epochs, those with C < tau, and those after which a fresh client holds the seed untrusted."""
    from gtorrent.reputation import UNTRUSTED_BELOW

    runs = per_seed_run(observed)
    epochs = below_tau = untrusted = 0
    for (_, seed), verdicts in runs.items():
        if seed not in honest:
            continue
        seen: list[float] = []
        for verdict in sorted(verdicts, key=lambda v: v.epoch):
            seen.append(verdict.credibility)
            epochs += 1
            below_tau += verdict.credibility < TAU
            untrusted += reputation_after(seen) < UNTRUSTED_BELOW
    scored = [c for c in observed.challenges if c.seed in honest and c.calibrated is not None]
    return {"seed_epochs": epochs, "below_tau": below_tau, "untrusted": untrusted, "challenges": len(scored),
            "sampled": sum(1 for c in scored if not c.greedy), "failed": sum(1 for c in observed.challenges
                                                                             if c.seed in honest and c.error)}


def spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def separation(observed: Observed, seeds: Sequence[str]) -> dict[str, Any]:
    scored = [c for c in observed.challenges if c.seed in seeds and c.calibrated is not None]
    return {
        "paper": [c.paper for c in scored if c.paper is not None],
        "calibrated": [c.calibrated for c in scored if c.calibrated is not None],
        "epoch_c": [v.credibility for v in observed.verdicts if v.seed in seeds],
        "failed": sum(1 for c in observed.challenges if c.seed in seeds and c.error and not c.seed_failed),
        "seed_failed": sum(1 for c in observed.challenges if c.seed in seeds and c.seed_failed),
    }


def cpu_ratio(verifier_cpu_s: float, challenges: int, seed_cpu_s: float, answers: int) -> float | None:
    """(verifier CPU per challenge) / (seed CPU per answer); None when either count is 0."""
    if challenges == 0 or answers == 0 or seed_cpu_s <= 0:
        return None
    return (verifier_cpu_s / challenges) / (seed_cpu_s / answers)


def report(observed: Observed, groups: dict[str, list[str]], cost: dict[str, float], notes: Sequence[str]) -> str:
    """The printed figures (groups: label -> seed peer ids; labels starting "honest" are honest)."""
    lines = [*notes]
    honest = [seed for label, ids in groups.items() if label.startswith("honest") for seed in ids]
    runs = len(observed.first_epoch)
    lines.append(f"runs: {runs} fresh verifiers; epochs until untrusted per seed-run (target: <= {HORIZON} in >= 99 %)")
    lines.append("  (trusted again: of the epochs after it was first untrusted in a run, those after which a fresh")
    lines.append("  client holds it trusted again)")
    lines.append(f"  {'kind':16} {'seed-runs':>9} {'<= 3':>6} {'share':>7} {'95% low':>8} {'trusted again':>14}   "
                 "epochs: count")
    for label, ids in groups.items():
        if label.startswith("honest"):
            continue
        found = describe_epochs(detection(observed, ids))
        counts = ", ".join(f"{k}: {v}" for k, v in found["counts"].items())
        later, again = relapses(observed, ids)
        lines.append(f"  {label:16} {found['runs']:9d} {found['within']:6d} {found['share']:7.1%} "
                     f"{found['lower_bound']:8.1%} {f'{again} of {later}':>14}   {counts}")
    from gtorrent.challenges import PROBATION_FACTOR

    challenges = int(cost.get("challenges_per_epoch", 3))
    probation = int(cost.get("probation", PROBATION_FACTOR))
    lines.append(f"modelled from the measured per-challenge catch rate (independent challenges, {challenges} per epoch, "
                 f"x{probation} in the verifier's first epoch of a seed): P(untrusted within {HORIZON} epochs)")
    lines.append(f"  {'kind':16} {'caught/counted':>15} {'rate':>7} {'95% low':>8} {'P(<= 3)':>9} {'at the low rate':>16}")
    for label, ids in groups.items():
        if label.startswith("honest"):
            continue
        hits, scored = catch_rate(observed, ids)
        if not scored:
            continue
        low = lower_bound(hits, scored)  # of the catch rate
        lines.append(f"  {label:16} {f'{hits}/{scored}':>15} {hits / scored:7.1%} {low:8.1%} "
                     f"{modelled_within(hits / scored, challenges, probation):9.2%} "
                     f"{modelled_within(low, challenges, probation):16.2%}")
    fp = false_positives(observed, honest)
    lines.append(f"false positives over {fp['seed_epochs']} honest seed-epochs ({fp['challenges']} scored challenges, "
                 f"{fp['sampled']} sampled, {fp['failed']} failed): C < tau {TAU}: {fp['below_tau']}; "
                 f"untrusted after the epoch: {fp['untrusted']} (target 0)")
    lines.append("separation (min / median / max); counted: challenges in C (in brackets: failed by the seed, "
                 "scored 0); lost: failed on the route, not counted")
    lines.append(f"  {'kind':16} {'paper 1/PPL per challenge':>27} {'calibrated per challenge':>27} "
                 f"{'epoch C (verdicts)':>27} {'counted':>11} {'lost':>5}")
    for label, ids in groups.items():
        sep = separation(observed, ids)
        counted = f"{len(sep['calibrated'])} ({sep['seed_failed']})"
        lines.append(f"  {label:16} {spread(sep['paper']):>27} {spread(sep['calibrated']):>27} "
                     f"{spread(sep['epoch_c']):>27} {counted:>11} {sep['failed']:5d}")
    ratio_seed = cpu_ratio(cost["verifier_cpu_s"], int(cost["challenges"]), cost["seed_cpu_s"], int(cost["answers"]))
    ratio_gen = cpu_ratio(cost["verifier_cpu_s"], int(cost["challenges"]), cost["generate_cpu_s"],
                          int(cost["generated"]))
    per_challenge = _per(cost["verifier_cpu_s"], cost["challenges"])
    per_answer = _per(cost["seed_cpu_s"], cost["answers"])
    per_generation = _per(cost["generate_cpu_s"], cost["generated"])
    per_score = _per(cost.get("score_cpu_s", 0.0), cost["generated"])
    per_plan = _per(cost.get("plan_cpu_s", 0.0), cost["generated"])
    lines.append(f"cost (CPU): verifier {per_challenge * 1000:.0f} ms per challenge ({int(cost['challenges'])} challenges; "
                 f"scoring alone {per_score * 1000:.0f} ms, planning the prompt alone {per_plan * 1000:.0f} ms); "
                 f"honest seed process {per_answer * 1000:.0f} ms per answer ({int(cost['answers'])} answers); "
                 f"generation alone {per_generation * 1000:.0f} ms per answer")
    lines.append("  verifier per challenge / seed process per answer: " + _share(ratio_seed)
                 + "; / generation alone: " + _share(ratio_gen)
                 + "; scoring alone / generation alone: " + _share(cpu_ratio(cost.get("score_cpu_s", 0.0),
                                                                             int(cost["generated"]), cost["generate_cpu_s"],
                                                                             int(cost["generated"])))
                 + " (target <= 5 %)")
    return "\n".join(lines)


def _per(total: float, count: float) -> float:
    return total / count if count else float("nan")


def _share(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1%}"


# ---------------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc (a zombie keeps its totals until reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class Proc:
    """A process whose stderr lines and stdout JSON events are read by threads; waits have deadlines."""

    def __init__(self, argv: list[str], home: Path, label: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("GTORRENT_TRACKERS", "GTORRENT_VERIFIERS")}
        env.update({"GTORRENT_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
        self.label = label
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[str] = []  # stderr lines read by wait_for
        self.tail: collections.deque[str] = collections.deque(maxlen=20)  # the last stderr lines, read or not
        threading.Thread(target=self._pump_err, daemon=True).start()
        threading.Thread(target=self._pump_out, daemon=True).start()

    def _pump_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.tail.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _pump_out(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def wait_for(self, pattern: str, timeout_s: float) -> list[str] | None:
        """The groups of the first stderr line matching `pattern`; None when the process exits first."""
        import re

        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.label} did not print {pattern!r} in {timeout_s} s: {self.seen[-5:]}") from None
            if line is None:
                return None
            self.seen.append(line)
            if match := regex.search(line):
                return list(match.groups())

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@dataclass
class Swarm:
    base: Path
    procs: list[Proc] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    seed_procs: dict[str, Proc] = field(default_factory=dict)  # peer id -> process
    notes: list[str] = field(default_factory=list)
    url: str = ""

    def start(self, argv: list[str], name: str) -> Proc:
        proc = Proc(argv, self.base / name, name)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_swarm(swarm: Swarm, args: argparse.Namespace) -> None:
    """Start the tracker, seeds and relays into `swarm` (the caller stops them, also after a failure)."""
    tracker = swarm.start([GTORRENT, "tracker", "--bind", "tcp://127.0.0.1:0"], "tracker")
    ready = tracker.wait_for(READY["tracker"], 30)
    if ready is None:
        raise RuntimeError(f"the tracker did not start: {tracker.seen}")
    swarm.url = ready[0]
    starting: list[tuple[str, Proc]] = []
    for n in range(args.honest):
        starting.append(("honest", swarm.start([GTORRENT, "seed", "--tracker", swarm.url], f"honest{n}")))
    for threads in args.honest_threads:
        label = f"honest-threads{threads}"
        starting.append((label, swarm.start([*CHEAT_ENTRY, "--kind", "honest", "--threads", str(threads),
                                             "--tracker", swarm.url], label)))
    for kind in args.kinds:
        for n in range(args.per_kind):
            starting.append((kind, swarm.start([*CHEAT_ENTRY, "--kind", kind, "--tracker", swarm.url], f"{kind}{n}")))
    relays = [swarm.start([GTORRENT, "relay", "--tracker", swarm.url], f"relay{n}") for n in range(args.relays)]
    for label, proc in starting:  # started together, awaited in turn: the model loads overlap
        found = proc.wait_for(READY["seed"], 120)
        if found is None:
            reason = next((line.strip() for line in reversed(proc.seen) if line.strip()), f"exit {proc.popen.wait()}")
            swarm.notes.append(f"note: {label} skipped: its seed did not start ({reason})")
            continue
        swarm.groups.setdefault(label, []).append(found[0])
        swarm.seed_procs[found[0]] = proc
    for relay in relays:
        if relay.wait_for(READY["relay"], 60) is None:
            raise RuntimeError(f"a relay did not start: {relay.seen}")


def one_run(swarm: Swarm, run: int, args: argparse.Namespace, observed: Observed) -> tuple[float, int]:
    """One fresh verifier for `args.epochs_per_run` epochs; returns (its CPU after start-up, challenges)."""
    verifier = swarm.start([GTORRENT, "verify", "--tracker", swarm.url, "--epoch", f"{args.epoch:g}",
                            "--challenges", str(args.challenges), "--epochs", str(args.epochs_per_run),
                            "--allow-one-hop", "--json"], f"verifier{run}")
    deadline = time.monotonic() + 120 + args.epoch * (args.epochs_per_run + 3)
    started_cpu: float | None = None
    challenges = 0
    while True:
        try:
            event = verifier.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            verifier.stop()
            raise TimeoutError(f"verifier run {run} did not finish in time: {''.join(verifier.tail)}") from None
        if event is None:
            break
        kind = event["event"]
        if kind == "epoch":
            if started_cpu is None:
                started_cpu = cpu_seconds(verifier.popen.pid)
                observed.first_epoch[run] = event["epoch"]
        elif kind == "challenge":
            challenges += 1
            observed.challenges.append(Challenged(run, event["seed"], event["epoch"], bool(event["greedy"]),
                                                  event.get("paper"), event.get("calibrated"), event.get("error"),
                                                  event.get("tokens"), bool(event.get("seed_failed"))))
        elif kind == "verdict":
            from gtorrent.protocol import Verdict

            verdict = Verdict.from_wire(event["verdict"])  # whatever the wire form of C, the float it means
            observed.verdicts.append(Judged(run, verdict.seed, verdict.epoch, verdict.credibility))
    # stdout closed: the verifier is exiting; read its totals while it is a zombie, then reap it
    until = time.monotonic() + 30
    while process_state(verifier.popen.pid) not in ("Z", "gone") and time.monotonic() < until:
        time.sleep(0.05)  # polling /proc for the exit: there is no event to wait on without reaping it
    ended_cpu = cpu_seconds(verifier.popen.pid) if process_state(verifier.popen.pid) == "Z" else None
    code = verifier.popen.wait(timeout=30)
    if code != 0 or started_cpu is None or ended_cpu is None:
        raise RuntimeError(f"verifier run {run} failed (exit {code}): {''.join(verifier.tail)}")
    return ended_cpu - started_cpu, challenges


def generation_cpu(lengths: Sequence[int], threads: int = 0) -> tuple[float, float, float]:
    """CPU seconds (this process, all threads) to generate greedy answers of these lengths with the demo
    model, to score them (runtime.score, one batched pass each), and to plan as many challenges (the
    verifier's own `plan`: prompts drawn from the vocabulary and extended by the model): the cost of the
    answers alone, without a seed's serving and relaying, and two parts of the verifier's."""
    import random

    from gtorrent.challenges import vocabulary_words
    from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams
    from gtorrent.runtime.score import score_answer
    from gtorrent.verifier import Verifier, VerifierSettings

    model = LanguageModel.load(None, intra_op_threads=threads)

    class Planner:  # what Verifier.plan reads, without a network
        settings = VerifierSettings()
        words = vocabulary_words([model.tokenizer.decode([i]) for i in range(model.tokenizer.get_vocab_size())])
        rng = random.Random(7)
        _extend = Verifier._extend

        def __init__(self) -> None:
            self.model = model

    planner: Any = Planner()
    generating = scoring = 0.0
    for n, length in enumerate(lengths):
        prompt = model.encode(f"The statement number {n} is")
        started = time.process_time()
        answer = model.generate(prompt, GenerationParams(max_tokens=length))
        generating += time.process_time() - started
        started = time.process_time()
        score_answer(model, prompt, answer.token_ids, SamplingParams(), finish_reason=answer.finish_reason,
                     max_tokens=length)
        scoring += time.process_time() - started
    started = time.process_time()
    Verifier.plan(planner, len(lengths))
    planning = time.process_time() - started
    return generating, scoring, planning


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes: 3 runs, 1 honest seed, 1 seed per kind")
    parser.add_argument("--runs", type=int, default=17, help="fresh verifiers, one after another")
    parser.add_argument("--epochs-per-run", type=int, default=3, help="epochs each verifier runs (>= 3)")
    parser.add_argument("--epoch", type=float, default=12.0, help="epoch length, seconds")
    parser.add_argument("--challenges", type=int, default=3, help="challenges per seed and epoch (users' default 3)")
    parser.add_argument("--honest", type=int, default=3, help="honest `gtorrent seed` processes")
    parser.add_argument("--honest-threads", default="1", help="comma-separated intra-op thread counts of further "
                        "honest seeds (tests.cheat_seed --kind honest --threads N); empty: none")
    parser.add_argument("--kinds", default=",".join(ALL_KINDS), help="cheat kinds, comma-separated")
    parser.add_argument("--per-kind", type=int, default=1, help="seeds per cheat kind")
    parser.add_argument("--relays", type=int, default=2, help="`gtorrent relay` processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw observations here")
    parser.add_argument("--report", type=Path, default=None, metavar="FILE",
                        help="print the figures again from a FILE --json wrote (no processes)")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.honest, args.per_kind, args.epoch = min(args.runs, 3), min(args.honest, 1), 1, min(args.epoch, 8.0)
    args.honest_threads = [int(t) for t in args.honest_threads.split(",") if t.strip()]
    args.kinds = [k for k in args.kinds.split(",") if k.strip()]
    if unknown := set(args.kinds) - set(ALL_KINDS):
        parser.error(f"unknown cheat kinds {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
    if args.runs < 1 or args.epochs_per_run < 1 or args.epoch < 0.5 or args.honest + len(args.honest_threads) < 1:
        parser.error("need at least 1 run of 1 epoch of 0.5 s or more, and one honest seed")
    return args


def load_observed(path: Path) -> tuple[Observed, dict[str, list[str]], dict[str, float], list[str]]:
    """What `--json` saved: the observations, seed groups, cost and notes."""
    doc = json.loads(path.read_text())
    observed = Observed({int(run): int(epoch) for run, epoch in doc["first_epoch"].items()},
                        [Challenged(**c) for c in doc["challenges"]], [Judged(**v) for v in doc["verdicts"]])
    return observed, doc["groups"], doc["cost"], list(doc.get("notes", []))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        print(report(*load_observed(args.report)))
        return 0
    began = time.monotonic()
    observed = Observed()
    verifier_cpu, challenges = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as folder:
        swarm = Swarm(Path(folder))
        try:
            start_swarm(swarm, args)
            honest_ids = swarm.groups.get("honest", [])
            seed_cpu_start = {peer: cpu_seconds(swarm.seed_procs[peer].popen.pid) for peer in honest_ids}
            for run in range(args.runs):
                spent, sent = one_run(swarm, run, args, observed)
                verifier_cpu += spent
                challenges += sent
                print(f"run {run + 1}/{args.runs}: {sent} challenges, verifier CPU {spent:.1f} s", file=sys.stderr, flush=True)
            seed_cpu = sum(cpu_seconds(swarm.seed_procs[peer].popen.pid) - seed_cpu_start[peer] for peer in honest_ids)
        finally:
            swarm.stop()
    answered = [c for c in observed.challenges if c.seed in set(honest_ids) and c.calibrated is not None]
    lengths = answer_lengths(observed, set(honest_ids))
    generating, scoring, planning = generation_cpu(lengths)
    cost = {"verifier_cpu_s": verifier_cpu, "challenges": challenges, "seed_cpu_s": seed_cpu,
            "answers": len(answered), "generate_cpu_s": generating, "score_cpu_s": scoring, "plan_cpu_s": planning,
            "generated": len(lengths), "challenges_per_epoch": args.challenges, "probation": probation_factor()}
    notes = [*swarm.notes]
    if args.quick:
        notes.append("--quick: fewer runs and seeds than the full bench (false positives over fewer than 200 "
                     "honest seed-epochs)")
    notes.append(f"swarm: {sum(len(v) for v in swarm.groups.values())} seeds ({', '.join(f'{k} x{len(v)}' for k, v in swarm.groups.items())}), "
                 f"{args.relays} relays; epoch {args.epoch:g} s, {args.challenges} challenges per seed and epoch, "
                 f"{args.epochs_per_run} epochs per run")
    print(report(observed, swarm.groups, cost, notes))
    print(f"wall time {time.monotonic() - began:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({"groups": swarm.groups, "cost": cost, "notes": notes,
                                         "first_epoch": observed.first_epoch,
                                         "challenges": [c.__dict__ for c in observed.challenges],
                                         "verdicts": [v.__dict__ for v in observed.verdicts]}, indent=1))
    return 0


def probation_factor() -> int:
    from gtorrent.challenges import PROBATION_FACTOR

    return PROBATION_FACTOR


def answer_lengths(observed: Observed, honest: set[str], most: int = 20) -> list[int]:
    """Lengths of honest answers to generate again for the 'generation alone' figure: up to `most` of
    them, spread over the runs (every k-th), so the figure is per answer of the lengths challenged."""
    lengths = [c.tokens for c in observed.challenges if c.seed in honest and c.tokens]
    step = max(1, math.ceil(len(lengths) / most))
    return [int(n) for n in lengths[::step]]


if __name__ == "__main__":
    sys.exit(main())
