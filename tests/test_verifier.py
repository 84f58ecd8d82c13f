"""The verifier node (issue 8 item 2): hidden challenges over private paths, scored against the
reference, signed verdicts, evidence files that anyone with the model can re-check.

The swarm is real services on real sockets (tests/test_private.py's Swarm): a tracker, 12 relays, an
honest seed and a seed serving other weights under the honest model's id (tests/cheaters.py)."""

from __future__ import annotations

import asyncio
import json
import random
import stat
import threading
import time
from pathlib import Path

import pytest

from gtorrent.asker import AskTimeouts
from gtorrent.challenges import challenge_count, draw_prompt, plan_challenges, vocabulary_words
from gtorrent.discovery import discover
from gtorrent.errors import UsageError
from gtorrent.guards import swarm_key
from gtorrent.identity import Identity, b64, unb64
from gtorrent.protocol import Verdict
from gtorrent.runtime import LanguageModel
from gtorrent.seed import Responder, SeedService
from gtorrent.store import Store
from gtorrent.verifier import (
    ChallengeResult,
    Verifier,
    VerifierEvents,
    VerifierSettings,
    epoch_of,
    first_epoch,
    recheck,
    seed_failure,
    send_times,
)

from .cheaters import OtherWeightsSeed
from .test_private import Swarm


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(None)


def demo_words(model: LanguageModel) -> list[str]:
    return vocabulary_words([model.tokenizer.decode([i]) for i in range(model.tokenizer.get_vocab_size())])


def test_challenge_prompts_are_not_from_a_short_list(demo: LanguageModel) -> None:
    words = demo_words(demo)
    assert len(words) > 150  # the demo model's 1,024-token vocabulary still gives about 190 words
    rng = random.Random(7)
    prompts = [draw_prompt(words, rng) for _ in range(1000)]
    assert len(set(prompts)) >= 990  # without the model's continuation, from the words alone
    # with the reference continuing each opening, prompts read as the model's own text and differ more
    extended = [draw_prompt(words, rng, lambda text, n, seed: demo.generate(text, _sampled(n, seed)).text)
                for _ in range(20)]
    assert len(set(extended)) == 20 and all(p.strip() for p in extended)


def _sampled(tokens: int, seed: int):  # type: ignore[no-untyped-def]
    from gtorrent.runtime import GenerationParams, SamplingParams

    return GenerationParams(max_tokens=tokens, sampling=SamplingParams(temperature=1.0), seed=seed)


def test_an_epoch_plan_has_a_greedy_challenge_long_answers_and_random_times(demo: LanguageModel) -> None:
    words = demo_words(demo)
    greedy_counts, sampled = [], 0
    for trial in range(300):
        rng = random.Random(trial)
        plans = plan_challenges(3, 60.0, words, rng, context_length=512, prompt_tokens=lambda p: len(demo.encode(p)),
                                send_within=0.5)
        assert len(plans) == 3
        greedy_counts.append(sum(p.sampling.greedy for p in plans))
        sampled += sum(not p.sampling.greedy for p in plans)
        assert all(128 <= p.max_tokens <= 256 for p in plans)
        times = [p.send_at_s for p in plans]
        assert times == sorted(times) and all(0.0 <= t <= 30.0 for t in times)
    assert min(greedy_counts) >= 1 and max(greedy_counts) == 3 and sampled > 300  # a mix, never no greedy
    # a short context: the answer fits what is left
    tight = plan_challenges(2, 1.0, words, random.Random(1), context_length=40, prompt_tokens=lambda p: 10)
    assert all(p.max_tokens == 30 for p in tight)
    # a seed not judged yet: a heavy first epoch; trusted: the count; untrusted: the count in a third of
    # the epochs (the draw), none in the others
    assert challenge_count("unverified", 3, 0.9) == 9 and challenge_count("unverified", 3, 0.9, probation=1) == 3
    assert challenge_count("trusted", 3, 0.0) == 3 and challenge_count("trusted", 3, 0.99) == 3
    assert challenge_count("untrusted", 3, 0.2) == 3 and challenge_count("untrusted", 3, 0.5) == 0
    draws = random.Random(5)
    share = sum(challenge_count("untrusted", 3, draws.random()) > 0 for _ in range(3000)) / 3000
    assert 0.3 <= share <= 0.37


def test_epoch_numbers_agree_across_verifiers() -> None:
    assert epoch_of(119.9, 60.0) == 1 and epoch_of(120.0, 60.0) == 2 and epoch_of(time.time(), 2.0) > 0


@pytest.mark.timeout(120)
async def test_an_honest_seed_scores_near_one_and_a_seed_with_other_weights_low(
    swarm: Swarm, tmp_path: Path, cli  # type: ignore[no-untyped-def]
) -> None:
    await swarm.start(relays=12)
    honest = swarm.seeds[0]
    cheat = OtherWeightsSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    cheat.bind("tcp://127.0.0.1:0")
    swarm.tasks.append(asyncio.create_task(cheat.serve()))
    await cheat.announce()
    swarm.seeds.append(cheat)
    assert cheat.record().models[0].model_id == honest.record().models[0].model_id
    home = tmp_path / "verifier"
    home.mkdir()
    store = Store.open(home)
    seen: list[str] = []
    settings = VerifierSettings(epoch_s=2.0, challenges=5, probation=1, min_tokens=128)
    verifier = Verifier(Identity.generate(), swarm.model, swarm.ctx, [swarm.url], store, home, settings,
                        VerifierEvents(challenge=lambda r: seen.append(r.error or "ok")))
    verifier.bind()
    try:
        await verifier.run(asyncio.Event(), max_epochs=1)
    finally:
        verifier.close()
    assert seen == ["ok"] * 10, seen
    by_seed = {result.verdict.seed: result for result in verifier.verdicts}
    good, bad = by_seed[honest.identity.peer_id], by_seed[cheat.identity.peer_id]
    for result in (good, bad):
        verdict = result.verdict
        assert Verdict.from_wire(json.loads(json.dumps(verdict.to_wire()))) == verdict  # signed, checks anywhere
        assert verdict.verifier == verifier.identity.peer_id and verdict.model_id == swarm.model.model_id
        assert verdict.challenges == 5 and len(result.results) == 5
        assert any(r.challenge.sampling.greedy for r in result.results)
        assert all(r.answer is not None and r.answer.mode == "private" for r in result.results)
        assert store.verdicts(verdict.seed) == [verdict]
    assert good.verdict.credibility >= 0.9
    assert bad.verdict.credibility <= 0.3  # below the paper's trust threshold in one epoch
    assert good.evidence_path is None  # nothing low: nothing kept
    # the verdicts went to the tracker, which serves them with the seeds (docs/PROTOCOL.md §12)
    assert good.submitted == {} and bad.submitted == {}
    served = await discover(swarm.ctx, [swarm.url], model=swarm.model.model_id, role="seed", verdicts=True)
    assert {v.seed: v for v in served.verdicts} == {honest.identity.peer_id: good.verdict, cheat.identity.peer_id: bad.verdict}
    path = bad.evidence_path
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    # anyone with the model re-scores the evidence and agrees; a tampered file does not
    checked = recheck(path, swarm.model)
    assert checked.agrees and checked.credibility is not None
    assert abs(checked.credibility - bad.verdict.credibility) <= 0.05, checked
    done = cli("verify", "--recheck", str(path))
    assert done.code == 0 and "agree" in done.out and "disagree" not in done.out, done
    doc = json.loads(path.read_text())
    doc["evidence"]["challenges"][0]["token_ids"][0] ^= 1
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    assert not recheck(tampered, swarm.model).agrees
    done = cli("verify", "--recheck", str(tampered), "--json")
    assert done.code == 1 and json.loads(done.out.splitlines()[-1])["agrees"] is False, done
    store.close()


class ChallengedEpoch(random.Random):
    """An rng whose first draw (the verifier's untrusted-epoch draw) falls in the challenged third."""

    def __init__(self) -> None:
        super().__init__(11)
        self.first = True

    def random(self) -> float:
        if self.first:
            self.first = False
            return 0.0
        return super().random()


async def test_an_untrusted_seed_is_still_challenged_at_a_lower_rate(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=12)
    seed = swarm.seeds[0].identity.peer_id
    home = tmp_path / "verifier"
    home.mkdir()
    store = Store.open(home)
    # another verifier found it lying last epoch: it is untrusted here, yet still challenged (in a third of
    # the epochs, with the full count: this verifier's draw says this epoch is one of them)
    earlier = Verdict.sign(Identity.generate(), seed=seed, model_id=swarm.model.model_id,
                           epoch=epoch_of(time.time(), 2.0) - 1, credibility=0.0, challenges=3, evidence="0" * 64)
    store.add_verdicts([earlier])
    assert store.standing(seed).state == "untrusted"
    verifier = Verifier(Identity.generate(), swarm.model, swarm.ctx, [swarm.url], store, home,
                        VerifierSettings(epoch_s=2.0, challenges=3, min_tokens=64), rng=ChallengedEpoch())
    verifier.bind()
    try:
        await verifier.run(asyncio.Event(), max_epochs=1)
    finally:
        verifier.close()
    [result] = verifier.verdicts
    assert result.verdict.challenges == 3 and result.verdict.credibility >= 0.9  # answered honestly: earns back
    assert any(r.challenge.sampling.greedy for r in result.results)
    store.close()


@pytest.mark.timeout(120)
def test_gtorrent_verify_prints_a_verdict_per_seed_and_json_events(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    swarm = Swarm()
    try:
        asyncio.run_coroutine_threadsafe(swarm.start(relays=12), loop).result(60)
        done = cli("verify", "--tracker", swarm.url, "--epoch", "2", "--challenges", "2", "--probation", "1", "--epochs", "1",
                   "--json")
        assert done.code == 0, done
        events = [json.loads(line) for line in done.out.splitlines()]
        kinds = [event["event"] for event in events]
        assert kinds[0] == "epoch" and kinds.count("challenge") == 2 and kinds[-1] == "verdict", kinds
        verdict = Verdict.from_wire(events[-1]["verdict"])
        assert verdict.seed == swarm.seeds[0].identity.peer_id and verdict.credibility >= 0.9
        assert events[-1]["submitted"] == {} and events[-1]["evidence_file"] is None
        done = cli("verify", "--tracker", swarm.url, "--epoch", "2", "--challenges", "1", "--epochs", "1")
        assert done.code == 0, done
        assert f"verdict: seed {verdict.seed}" in done.out and "taken by 1 of 1 tracker(s)" in done.out, done
        assert "epoch " in done.err and "challenge to" in done.err and "announce to" not in done.err
    finally:
        asyncio.run_coroutine_threadsafe(swarm.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ------------------------------------------------------------------ timing: no burst at start-up


def test_first_epoch_runs_only_with_half_its_send_window_left() -> None:
    # 60 s epochs, challenges sent within the first 30 s: from 15 s in, the current epoch is too late
    assert first_epoch(600.0, 60.0, 0.5) == 10
    assert first_epoch(615.0, 60.0, 0.5) == 10
    assert first_epoch(615.1, 60.0, 0.5) == 11
    assert first_epoch(659.0, 60.0, 0.5) == 11
    # send times: as planned when the window is ahead, else spread over what is left, never in the past
    assert send_times([0.0, 15.0, 30.0], 600.0, 60.0, 0.5, now=590.0) == [600.0, 615.0, 630.0]
    assert send_times([0.0, 15.0, 30.0], 600.0, 60.0, 0.5, now=610.0) == pytest.approx([610.0, 620.0, 630.0])
    late = send_times([0.0, 1.0, 29.0], 600.0, 60.0, 0.5, now=640.0)
    assert late == [640.0] * 3  # a window already over (an epoch that fell behind): now, not before


async def _run_mid_epoch(demo: LanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, phase: float,
                         epoch_s: float) -> tuple[list[float], float]:
    """Run one epoch of a verifier whose clock reads `phase` of the way into an epoch, with ten challenges
    planned evenly over the send window; returns the clock at each send and at the start."""
    import gtorrent.verifier as verifier_module
    from gtorrent.challenges import Challenge
    from gtorrent.discovery import Discovery
    from gtorrent.protocol import ModelInfo, PeerRecord
    from gtorrent.runtime import SamplingParams
    from gtorrent.transport import new_context
    from gtorrent.verifier import ChallengeResult

    offset = phase * epoch_s - time.time() % epoch_s
    clock = lambda: time.time() + offset  # noqa: E731 - a shifted wall clock: real sleeps, chosen phase
    record = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",),
                             models=(ModelInfo(demo.model_id, demo.name, demo.context_length),), seq=1,
                             expires=time.time() + 60)

    async def listed(*args: object, **kwargs: object) -> Discovery:
        return Discovery(records={record.peer_id: record})

    monkeypatch.setattr(verifier_module, "discover", listed)
    ctx = new_context()
    store = Store.open(tmp_path)
    settings = VerifierSettings(epoch_s=epoch_s, challenges=10, send_within=0.5)
    verifier = Verifier(Identity.generate(), demo, ctx, [], store, tmp_path, settings, clock=clock)
    window = settings.send_within * epoch_s
    plans = [Challenge("p", SamplingParams(), 16, window * i / 10) for i in range(10)]
    sent: list[float] = []

    async def nothing(*args: object, **kwargs: object) -> dict[str, str]:
        return {}

    async def challenge(seed: PeerRecord, epoch: int, planned: Challenge) -> ChallengeResult:
        sent.append(clock())
        return ChallengeResult(seed.peer_id, epoch, planned, None, None, "not sent (test)")

    monkeypatch.setattr(verifier, "plan", lambda count: plans)
    monkeypatch.setattr(verifier, "challenge", challenge)
    monkeypatch.setattr(verifier.announcer, "announce", nothing)
    monkeypatch.setattr(verifier.announcer, "loop", nothing)
    started = clock()
    try:
        await verifier.run(asyncio.Event(), max_epochs=1)
    finally:
        verifier.close()
        store.close()
        ctx.destroy(linger=0)
    return sorted(sent), started


@pytest.mark.timeout(60)
async def test_a_verifier_starting_mid_epoch_sends_no_burst(demo: LanguageModel, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On HEAD the challenges of the starting epoch whose send time was past all went out at once (here
    4 of 10 within milliseconds of the start, right after the verifier announced)."""
    epoch_s = 4.0
    sent, started = await _run_mid_epoch(demo, tmp_path, monkeypatch, phase=0.2, epoch_s=epoch_s)
    assert len(sent) == 10
    window_end = (epoch_of(started, epoch_s)) * epoch_s + 0.5 * epoch_s
    assert sum(1 for at in sent if at - started < 0.1) <= 1, [round(at - started, 3) for at in sent]
    assert all(started - 0.01 <= at <= window_end + 0.5 for at in sent)
    assert min(b - a for a, b in zip(sent, sent[1:], strict=False)) > 0.02  # spread: 0.12 s apart as planned


@pytest.mark.timeout(60)
async def test_a_verifier_starting_late_in_the_send_window_waits_for_the_next_epoch(
    demo: LanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    epoch_s = 2.0
    sent, started = await _run_mid_epoch(demo, tmp_path, monkeypatch, phase=0.4, epoch_s=epoch_s)
    boundary = (epoch_of(started, epoch_s) + 1) * epoch_s
    assert len(sent) == 10 and sent[0] >= boundary - 0.01, (sent[0] - started, boundary - started)
    assert sent[-1] - sent[0] >= 0.5  # as planned over the next epoch's window (0.9 s)


# ------------------------------------------------------------------ failed challenges


def test_which_failures_count_against_the_seed() -> None:
    from gtorrent.asker import AttemptsFailed, RequestRefused, RouteFailed, SeedFailed
    from gtorrent.errors import GtorrentError

    def failed(*errors: GtorrentError) -> AttemptsFailed:
        return AttemptsFailed("the private ask failed", "try again", list(errors))

    route = RouteFailed("2 of 4 paths went silent", {"r1"})
    down = SeedFailed("seed x did not answer on any path (4 got as far as it)", "timeout", reached=False)
    silent = SeedFailed("no answer over the paths to seed x in 60 s", "timeout")
    signature = SeedFailed("seed x's transcript signature does not verify")
    assert seed_failure(failed(route, route)) is None  # the route's fault: not counted
    assert seed_failure(failed(down)) is None  # never reached (down): no verdict rather than a 0
    assert seed_failure(failed(route, silent)) == silent.message
    assert seed_failure(failed(signature)) == signature.message
    assert seed_failure(GtorrentError("no tracker answered")) is None
    # review fix: a seed that switched models since the epoch's listing says so; on HEAD that counted
    # as a 0 on a model it no longer serves (and a seed's R is its worst model's, frozen there)
    switched = SeedFailed("seed x failed: this seed does not serve abab", code="unknown_model")
    assert seed_failure(failed(switched)) is None
    assert seed_failure(failed(switched, signature)) == signature.message
    refused = seed_failure(RequestRefused("the seed refused the request: too long"))
    assert refused is not None and "refused" in refused


@pytest.mark.timeout(60)
async def test_silence_is_sent_again_on_fresh_paths_before_it_counts(demo: LanguageModel, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing back from a seed reached over circuits may be relays dropping the request on enough paths
    of one route: the challenge goes out again (fresh paths) and counts only if the seed fails again.
    "Busy" gets BUSY_RETRIES more tries, and busy on every one is silence too (review fix: on the code
    before it, counted 0 at once, so anyone filling an honest seed's queue for a few seconds framed it)."""
    import gtorrent.verifier as verifier_module
    from gtorrent.asker import AttemptsFailed, RouteFailed, SeedFailed
    from gtorrent.challenges import Challenge
    from gtorrent.errors import GtorrentError
    from gtorrent.protocol import PeerRecord
    from gtorrent.runtime import SamplingParams
    from gtorrent.transport import new_context

    silent = SeedFailed("no answer over the paths to seed x in 60 s", "timeout", answered=False)
    route = RouteFailed("2 of 4 paths went silent while the seed answered on others")
    busy = SeedFailed("seed x failed: the seed's queue is full", code="busy")
    outcomes: list[GtorrentError] = []
    calls: list[int] = []

    async def ask(*args: object, **kwargs: object) -> object:
        calls.append(1)
        raise AttemptsFailed("the private ask failed", "try again", [outcomes.pop(0)])

    monkeypatch.setattr(verifier_module, "ask_private", ask)
    ctx = new_context()
    store = Store.open(tmp_path)
    verifier = Verifier(Identity.generate(), demo, ctx, [], store, tmp_path, VerifierSettings(epoch_s=0.5),
                        rng=random.Random(1))
    seed = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",), seq=1,
                           expires=time.time() + 60)
    planned = Challenge("p", SamplingParams(), 16, 0.0)
    try:
        # one ask_private call per outcome (its AttemptsFailed carries that call's attempts); (the seed's
        # fault, silent: counted only if the seed answers nothing else that epoch, see tally)
        for sequence, fault, quiet in (([silent, route], False, False), ([silent, silent], True, True),
                                       ([busy, busy, busy], True, True), ([busy, route], False, False),
                                       ([route], False, False)):
            outcomes[:], calls[:] = list(sequence), []
            result = await verifier.challenge(seed, 1, planned)
            assert len(calls) == len(sequence) and not outcomes, (sequence, result)
            assert (result.seed_failed, result.silent) == (fault, quiet), (sequence, result)
            assert result.counted is (fault and not quiet) and (result.calibrated == 0.0) is (fault and not quiet)
            assert ("sent 2 times" in (result.error or "")) is (sequence == [silent, silent])
            assert ("sent " in (result.error or "")) is quiet
    finally:
        verifier.close()
        store.close()
        ctx.destroy(linger=0)


def test_silence_counts_only_when_the_seed_answered_nothing_that_epoch(demo: LanguageModel) -> None:
    """Relays dropping requests on enough paths look like a silent seed: a silent challenge counts (as 0)
    only when the seed answered no challenge of the epoch, so a seed that drops every challenge gets
    C = 0 while one dropped by relays now and then is judged on what it answered."""
    from gtorrent.challenges import Challenge
    from gtorrent.runtime import GenerationParams, SamplingParams
    from gtorrent.verifier import score_transcript, tally

    planned = Challenge("Once upon a time", SamplingParams(), 16, 0.0)
    answer = demo.generate(planned.prompt, GenerationParams(max_tokens=16))
    request = {"prompt": planned.prompt, "max_tokens": 16, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    score = score_transcript(demo, request, answer.text, list(answer.token_ids), answer.finish_reason)
    assert score.calibrated >= 0.9
    scored = ChallengeResult("s", 1, planned, None, score)
    silent = ChallengeResult("s", 1, planned, None, None, "no answer (sent 2 times)", seed_failed=True, silent=True)
    refused = ChallengeResult("s", 1, planned, None, None, "seed s failed: internal", seed_failed=True)
    route = ChallengeResult("s", 1, planned, None, None, "2 of 4 paths went silent")
    assert tally([scored, silent, route]) == (pytest.approx(score.calibrated), [scored])
    assert tally([silent, silent, route]) == (0.0, [silent, silent])
    assert tally([silent, refused]) == (0.0, [refused])
    assert tally([scored, refused]) == (0.0, [scored, refused])
    assert tally([route, route]) is None


class SilentSeed(SeedService):
    """Takes every request and never answers it (until the test releases it)."""

    release: asyncio.Event | None = None
    requests = 0

    async def serve_request(self, request: dict[str, object], responder: Responder) -> None:
        self.requests += 1
        if self.release is None:
            self.release = asyncio.Event()
        await self.release.wait()


class RefusingSeed(SeedService):
    """Drops every request it gets with an error of its own (a cheater dropping suspected challenges)."""

    async def serve_request(self, request: dict[str, object], responder: Responder) -> None:
        await responder.error("internal", "generation failed (RuntimeError)")


class BusyOnceSeed(SeedService):
    """Honest, but too busy for the first request it gets."""

    refused = 0

    async def serve_request(self, request: dict[str, object], responder: Responder) -> None:
        if not self.refused:
            self.refused += 1
            await responder.error("busy", "the seed's queue is full")
            return
        await super().serve_request(request, responder)


class OutOfVocabularySeed(SeedService):
    """Signs, correctly, an answer whose first token id is outside the model's vocabulary."""

    async def serve_request(self, request: dict[str, object], responder: Responder) -> None:
        text, sent = responder.text, [False]

        async def spoilt(piece: str, ids: list[int]) -> None:
            if ids and not sent[0]:
                sent[0] = True
                ids = [10**6, *ids[1:]]
            await text(piece, ids)

        responder.text = spoilt  # type: ignore[method-assign]
        await super().serve_request(request, responder)


class BadSignatureSeed(SeedService):
    """Answers honestly but with a transcript signature that does not verify."""

    async def serve_request(self, request: dict[str, object], responder: Responder) -> None:
        done = responder.done

        async def lying(info: dict[str, object]) -> None:
            signature = unb64(str(info["signature"]))
            await done({**info, "signature": b64(bytes([signature[0] ^ 1]) + signature[1:])})

        responder.done = lying  # type: ignore[method-assign]
        await super().serve_request(request, responder)


@pytest.mark.timeout(120)
async def test_challenges_the_seed_fails_count_as_zero_and_a_down_seed_is_not_framed(
    swarm: Swarm, tmp_path: Path
) -> None:
    """On HEAD a failed challenge was neither scored nor counted, so a seed that refused the challenges it
    suspected lost nothing (no verdict at all). Now: refused or badly signed answers count as 0, with
    the reason in the evidence; a seed busy for a moment is asked again; a seed that is down (no path
    reaches it) gets no verdict."""
    await swarm.start(relays=12)
    honest = swarm.seeds[0]
    refusing = RefusingSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    lying = BadSignatureSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    down = SeedService(Identity.generate(), swarm.model, trackers=[swarm.url])
    busy = BusyOnceSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    spoilt = OutOfVocabularySeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    silent = SilentSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    for seed in (refusing, lying, down, busy, spoilt, silent):
        seed.bind("tcp://127.0.0.1:0")
        swarm.tasks.append(asyncio.create_task(seed.serve()))
        await seed.announce()
        swarm.seeds.append(seed)
    down.close()  # listed, but nothing answers at its endpoint
    home = tmp_path / "verifier"
    home.mkdir()
    store = Store.open(home)
    settings = VerifierSettings(epoch_s=2.0, challenges=2, probation=1, min_tokens=32,
                                timeouts=AskTimeouts(accept_s=2.0, first_token_s=8.0, between_tokens_s=8.0))
    seen: list[ChallengeResult] = []
    verifier = Verifier(Identity.generate(), swarm.model, swarm.ctx, [swarm.url], store, home, settings,
                        VerifierEvents(challenge=seen.append))
    verifier.bind()
    try:
        await verifier.run(asyncio.Event(), max_epochs=1)
    finally:
        verifier.close()
        if silent.release is not None:
            silent.release.set()
    by_seed = {result.verdict.seed: result for result in verifier.verdicts}
    assert by_seed[honest.identity.peer_id].verdict.credibility >= 0.9
    # silent: each challenge sent twice, over fresh paths, then counted as 0
    assert silent.requests == 4 and by_seed[silent.identity.peer_id].verdict.credibility == 0.0
    assert all("sent 2 times" in (r.error or "") for r in by_seed[silent.identity.peer_id].results)
    # busy for a moment: the challenge is sent again, answered and scored, not counted as a failure
    assert busy.refused == 1 and by_seed[busy.identity.peer_id].verdict.challenges == 2
    assert by_seed[busy.identity.peer_id].verdict.credibility >= 0.9
    assert down.identity.peer_id not in by_seed  # not reached: no verdict, never a 0
    # fresh first hops for every challenge: the verifier holds no guards (a colluding guard would see all)
    assert store.guards(swarm_key([swarm.url])) == []
    down_results = [r for r in seen if r.seed == down.identity.peer_id]
    assert len(down_results) == 2 and not any(r.counted for r in down_results), down_results
    for cheat, why in ((refusing, "generation failed"), (lying, "signature does not verify")):
        result = by_seed[cheat.identity.peer_id]
        assert result.verdict.credibility == 0.0 and result.verdict.challenges == 2, result
        assert all(r.seed_failed and r.calibrated == 0.0 and why in (r.error or "") for r in result.results)
        path = result.evidence_path
        assert path is not None
        entries = json.loads(path.read_text())["evidence"]["challenges"]
        assert len(entries) == 2 and all(why in e["unanswered"] and "no signed transcript" in e["note"] for e in entries)
        checked = recheck(path, swarm.model)  # re-checks: counted 0 on the verifier's word, and says so
        assert checked.agrees and checked.credibility == 0.0 and checked.unanswered == 2, checked
    # a correctly signed answer that no reference can score (an id outside the vocabulary) scores 0 too,
    # and its transcript is kept: a re-check finds it unscorable as well
    result = by_seed[spoilt.identity.peer_id]
    assert result.verdict.credibility == 0.0 and result.verdict.challenges == 2, result
    assert all(r.seed_failed and r.answer is not None and "outside" in (r.error or "") for r in result.results)
    assert result.evidence_path is not None
    entries = json.loads(result.evidence_path.read_text())["evidence"]["challenges"]
    assert len(entries) == 2 and all("unscorable" in e and e["signature"] for e in entries)
    checked = recheck(result.evidence_path, swarm.model)
    assert checked.agrees and checked.credibility == 0.0 and checked.unanswered == 0, checked
    store.close()


# ------------------------------------------------------------------ restarts keep the verifier's word


@pytest.mark.timeout(60)
async def test_a_restarted_verifier_does_not_judge_an_epoch_twice(swarm: Swarm, tmp_path: Path) -> None:
    """A verifier restarted within an epoch it already judged must not sign a second, different verdict
    for it: trackers and clients take two verdicts of one (seed, model, epoch) as an equivocation and drop
    the verifier. On the code before this fix the restarted verifier listed and challenged the seed again."""
    await swarm.start(relays=0)
    seed = swarm.seeds[0].identity.peer_id
    identity = Identity.generate()
    store = Store.open(tmp_path)
    epoch_s = 2.0
    epoch = epoch_of(time.time(), epoch_s)
    mine = Verdict.sign(identity, seed=seed, model_id=swarm.model.model_id, epoch=epoch, credibility=1.0,
                        challenges=3, evidence="0" * 64, epoch_start_ms=round(epoch * epoch_s * 1000),
                        epoch_ms=round(epoch_s * 1000))
    store.add_verdicts([mine])
    listed: dict[str, list[str]] = {}

    def verifier_of(who: Identity) -> Verifier:
        events = VerifierEvents(epoch=lambda number, seeds: listed.setdefault(who.peer_id, [s.peer_id for s in seeds]))
        return Verifier(who, swarm.model, swarm.ctx, [swarm.url], store, tmp_path,
                        VerifierSettings(epoch_s=epoch_s, challenges=1), events)

    restarted, other = verifier_of(identity), verifier_of(Identity.generate())
    try:
        assert await restarted.run_epoch(epoch) == []
        assert listed[identity.peer_id] == []  # not challenged again
        assert store.verdicts(seed) == [mine]
        # another verifier judges that epoch as usual (no relays here: its challenge fails on the route,
        # which counts for nothing)
        assert await other.run_epoch(epoch) == []
        assert listed[other.identity.peer_id] == [seed]
    finally:
        restarted.close()
        other.close()
        store.close()


def test_epoch_lengths_a_verdict_cannot_sign_are_refused() -> None:
    for bad in (8 * 24 * 3600.0, 1.0005):
        with pytest.raises(UsageError, match="whole number of milliseconds up to one week"):
            VerifierSettings(epoch_s=bad)
    assert VerifierSettings(epoch_s=2.5).epoch_s == 2.5


@pytest.mark.timeout(60)
async def test_challenges_in_flight_are_bounded(demo: LanguageModel, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each challenge is a private ask holding a dozen sockets or more; on the code before this bound,
    6 seeds x 7 challenges sent together ran out of the context's 1,023 sockets and the epoch died."""
    from gtorrent.challenges import Challenge
    from gtorrent.protocol import ModelInfo, PeerRecord
    from gtorrent.runtime import SamplingParams
    from gtorrent.transport import new_context

    ctx = new_context()
    store = Store.open(tmp_path)
    settings = VerifierSettings(epoch_s=600.0, challenges=12, max_in_flight=3)
    verifier = Verifier(Identity.generate(), demo, ctx, [], store, tmp_path, settings)
    plans = [Challenge("p", SamplingParams(), 16, 0.0) for _ in range(12)]
    running = peak = 0

    async def challenge(seed: PeerRecord, epoch: int, planned: Challenge) -> ChallengeResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return ChallengeResult(seed.peer_id, epoch, planned, None, None, "not sent (test)")

    monkeypatch.setattr(verifier, "plan", lambda count: plans)
    monkeypatch.setattr(verifier, "challenge", challenge)
    record = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",),
                             models=(ModelInfo(demo.model_id, demo.name, demo.context_length),), seq=1,
                             expires=time.time() + 60)
    now = time.time()
    try:
        assert await verifier.verify_seed(record, epoch_of(now, 600.0), now - 600.0) is None  # window past
    finally:
        verifier.close()
        store.close()
        ctx.destroy(linger=0)
    assert peak == 3


# ------------------------------------------------------------------ stops mid-answer (review fix)


class StallingSeed(SeedService):
    """Sends the first piece of its answer, then nothing more, for its first `stalls` requests (what
    relays on every path that stop forwarding after one cell look like); answers honestly after that."""

    stalls = 1
    requests = 0
    release: asyncio.Event | None = None

    async def serve_request(self, request: dict[str, object], responder: Responder) -> None:
        self.requests += 1
        if self.requests > self.stalls:
            await super().serve_request(request, responder)
            return
        if self.release is None:
            self.release = asyncio.Event()
        await responder.text("Once", [0])
        await self.release.wait()


@pytest.mark.timeout(120)
async def test_an_answer_stopped_mid_way_is_sent_again_and_frames_no_one(swarm: Swarm, tmp_path: Path) -> None:
    """Relays on every path can stop forwarding at one cell count, or send destroys (any relay may, naming
    a later hop): that looks exactly like a seed stopping mid-answer. Review fix: on the code before it
    such a challenge counted as 0 at once, so one stalled challenge made an honest seed's C = 0. Now it
    is sent again on fresh paths like silence, and counts only when the seed answered nothing that
    epoch: a seed that stalls once is judged on its answers; one that stalls on every challenge gets 0."""
    await swarm.start(relays=12)
    once = StallingSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    always = StallingSeed(Identity.generate(), swarm.model, trackers=[swarm.url])
    always.stalls = 10**6
    for seed in (once, always):
        seed.bind("tcp://127.0.0.1:0")
        swarm.tasks.append(asyncio.create_task(seed.serve()))
        await seed.announce()
        swarm.seeds.append(seed)
    home = tmp_path / "verifier"
    home.mkdir()
    store = Store.open(home)
    settings = VerifierSettings(epoch_s=2.0, challenges=2, probation=1, min_tokens=32,
                                timeouts=AskTimeouts(accept_s=2.0, first_token_s=8.0, between_tokens_s=3.0))
    verifier = Verifier(Identity.generate(), swarm.model, swarm.ctx, [swarm.url], store, home, settings)
    verifier.bind()
    try:
        await verifier.run(asyncio.Event(), max_epochs=1)
    finally:
        verifier.close()
        for seed in (once, always):
            if seed.release is not None:
                seed.release.set()
        store.close()
    by_seed = {result.verdict.seed: result for result in verifier.verdicts}
    judged = by_seed[once.identity.peer_id]
    # the stalled challenge went out again, and was answered (a route failure under load may add a send)
    assert once.requests >= 3, once.requests
    assert judged.verdict.credibility >= 0.9 and judged.verdict.challenges == 2, judged
    stalled = by_seed[always.identity.peer_id]
    assert always.requests >= 4, always.requests  # each challenge sent twice, then counted as 0
    assert stalled.verdict.credibility == 0.0 and stalled.verdict.challenges == 2, stalled
    assert all(r.silent and "sent 2 times" in (r.error or "") for r in stalled.results), stalled.results


def test_evidence_of_two_models_of_one_seed_and_epoch_do_not_collide(tmp_path: Path) -> None:
    """Review fix: evidence files were named by epoch, seed and verifier only, so one verifier identity
    judging two models (two `gtorrent verify` processes on one home) of a seed that serves both wrote the
    second epoch's file over an existing name: FileExistsError, and that epoch's verdicts were lost."""
    from gtorrent.verifier import write_evidence

    identity, seed = Identity.generate(), Identity.generate().peer_id
    paths = []
    for model_id in ("ab" * 32, "cd" * 32):
        verdict = Verdict.sign(identity, seed=seed, model_id=model_id, epoch=5, credibility=0.1, challenges=1,
                               evidence="ef" * 32)
        paths.append(write_evidence(tmp_path, verdict, {"model_id": model_id}))
    assert len(set(paths)) == 2
    assert [json.loads(p.read_text())["evidence"]["model_id"] for p in paths] == ["ab" * 32, "cd" * 32]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in paths)


@pytest.mark.timeout(60)
async def test_a_verifier_keeps_its_own_verdicts_whatever_its_trackers_admit(
    demo: LanguageModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review fix: a verifier's store learns whom to trust from its trackers (asker.ingest_verdicts: the
    union of the lists they advertise). Where those lists leave the verifier out (a tracker that admits
    any verifier advertises none), its own verdicts were not stored, so after a restart in the same
    epoch it judged the seeds again and signed a second, different verdict: an equivocation that the
    trackers taking its verdicts punish by dropping it."""
    import gtorrent.verifier as verifier_module
    from gtorrent.asker import AttemptsFailed, SeedFailed
    from gtorrent.protocol import PeerRecord
    from gtorrent.transport import new_context

    async def ask(*args: object, **kwargs: object) -> object:
        raise AttemptsFailed("the private ask failed", "try again",
                             [SeedFailed("seed x's transcript signature does not verify")])

    monkeypatch.setattr(verifier_module, "ask_private", ask)
    ctx = new_context()
    store = Store.open(tmp_path, trusted_verifiers={Identity.generate().peer_id})  # as a tracker's list set it
    identity = Identity.generate()
    settings = VerifierSettings(epoch_s=2.0, challenges=1)
    verifier = Verifier(identity, demo, ctx, [], store, tmp_path, settings, rng=random.Random(3))
    seed = PeerRecord.sign(Identity.generate(), endpoint="tcp://127.0.0.1:9", roles=("seed",), seq=1,
                           expires=time.time() + 60)
    epoch = epoch_of(time.time(), settings.epoch_s)
    try:
        result = await verifier.verify_seed(seed, epoch, time.time())
        assert result is not None and result.verdict.credibility == 0.0
        assert store.verdicts(seed.peer_id, epoch, model_id=demo.model_id) == [result.verdict]
    finally:
        verifier.close()
        store.close()
        ctx.destroy(linger=0)


@pytest.mark.timeout(30)
async def test_the_epoch_listing_takes_seeds_that_join_during_the_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        demo: LanguageModel) -> None:
    """A member that (re)joins mid-epoch becomes a valid signer of forwarded answers before the epoch ends:
    otherwise the honest entry that forwarded a challenge to it would be scored 0 for an "unlisted" signer.
    A seed listed once stays listed (its stop later in the epoch does not remove it), and only the model's
    whole listing is asked for, never a signer."""
    import gtorrent.verifier as verifier_module
    from gtorrent.discovery import Discovery
    from gtorrent.protocol import ModelInfo, PeerRecord
    from gtorrent.transport import new_context

    info = ModelInfo(demo.model_id, demo.name, demo.context_length)

    def record(who: Identity, seq: int, stopped: bool = False, model: ModelInfo = info) -> PeerRecord:
        return PeerRecord.sign(who, endpoint="tcp://127.0.0.1:9", roles=("seed",), models=(model,), seq=seq,
                               expires=time.time() + 60, stopped=stopped)

    first, joiner, other_model = Identity.generate(), Identity.generate(), Identity.generate()
    listings = [{first.peer_id: record(first, 1)},
                {first.peer_id: record(first, 2, stopped=True), joiner.peer_id: record(joiner, 1),
                 other_model.peer_id: record(other_model, 1, model=ModelInfo("ef" * 32, "x", 512))}]
    queries: list[dict[str, object]] = []

    async def listed(*args: object, **kwargs: object) -> Discovery:
        queries.append(kwargs)
        return Discovery(records=listings[min(len(queries) - 1, 1)])

    monkeypatch.setattr(verifier_module, "discover", listed)
    monkeypatch.setattr(verifier_module, "LISTING_REFRESH_MIN_S", 0.05)
    ctx = new_context()
    store = Store.open(tmp_path)
    verifier = Verifier(Identity.generate(), demo, ctx, [], store, tmp_path, VerifierSettings(epoch_s=0.1))
    seen: list[set[str]] = []

    async def challenge_seed(seed: PeerRecord, epoch: int, start: float) -> list[ChallengeResult]:
        listing = verifier.listings[epoch]
        deadline = time.monotonic() + 10
        while joiner.peer_id not in listing:  # the refresh adds it while the epoch runs
            assert time.monotonic() < deadline, "the joiner never entered the epoch's listing"
            await asyncio.sleep(0.01)
        seen.append(set(listing))
        return []

    monkeypatch.setattr(verifier, "challenge_seed", challenge_seed)
    try:
        await verifier.run_epoch(7)
    finally:
        ctx.destroy(linger=0)
    assert seen == [{first.peer_id, joiner.peer_id}]  # the stopped record did not replace the listed one
    assert all(query.get("model") == demo.model_id and "peers" not in query for query in queries)
