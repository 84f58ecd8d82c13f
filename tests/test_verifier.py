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

from gtorrent.challenges import challenge_count, draw_prompt, plan_challenges, vocabulary_words
from gtorrent.discovery import discover
from gtorrent.identity import Identity
from gtorrent.protocol import Verdict
from gtorrent.runtime import LanguageModel
from gtorrent.store import Store
from gtorrent.verifier import Verifier, VerifierEvents, VerifierSettings, epoch_of, recheck

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
    assert challenge_count("unverified", 3) == 3 and challenge_count("trusted", 3) == 3
    assert challenge_count("untrusted", 3) == 1 and challenge_count("untrusted", 9) == 3


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
    settings = VerifierSettings(epoch_s=2.0, challenges=5, min_tokens=128)
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


async def test_an_untrusted_seed_is_still_challenged_at_a_lower_rate(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.start(relays=12)
    seed = swarm.seeds[0].identity.peer_id
    home = tmp_path / "verifier"
    home.mkdir()
    store = Store.open(home)
    # another verifier found it lying last epoch: it is untrusted here, yet still challenged (once in 3)
    earlier = Verdict.sign(Identity.generate(), seed=seed, model_id=swarm.model.model_id,
                           epoch=epoch_of(time.time(), 2.0) - 1, credibility=0.0, challenges=3, evidence="0" * 64)
    store.add_verdicts([earlier])
    assert store.standing(seed).state == "untrusted"
    verifier = Verifier(Identity.generate(), swarm.model, swarm.ctx, [swarm.url], store, home,
                        VerifierSettings(epoch_s=2.0, challenges=3, min_tokens=64))
    verifier.bind()
    try:
        await verifier.run(asyncio.Event(), max_epochs=1)
    finally:
        verifier.close()
    [result] = verifier.verdicts
    assert result.verdict.challenges == 1 and result.verdict.credibility >= 0.9  # answered honestly: earns back
    assert result.results[0].challenge.sampling.greedy  # the one challenge of an epoch is the greedy one
    store.close()


@pytest.mark.timeout(120)
def test_gtorrent_verify_prints_a_verdict_per_seed_and_json_events(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    swarm = Swarm()
    try:
        asyncio.run_coroutine_threadsafe(swarm.start(relays=12), loop).result(60)
        done = cli("verify", "--tracker", swarm.url, "--epoch", "2", "--challenges", "2", "--epochs", "1", "--json")
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
