"""Forwarded answers on the asker's and the verifier's side (issue 9, docs/PROTOCOL.md §10).

An entry seed may hand a request to another seed of its model group; the answer then carries the
TARGET's signature over the transcript of the original request, and `done` names it as `signer`.
The asker accepts that only when the signer is a seed of its own listing for the model (same record,
its signing key, not stopped, announcing the model id) and not untrusted in its reputation view;
anything else is the entry's failure. The verifier scores such an answer as the signer's, and counts
a challenge answered under an unlisted key as the entry's failure.

Until seeds forward for real (gtorrent/seed.py, group.py), forwarded answers are made here directly:
`forge` makes real seeds sign their transcripts with a second, real identity and name it in `done`,
which is exactly what an asker receives from an entry that relayed that identity's answer.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gtorrent.asker import (
    AnswerSink,
    AskEvents,
    AskRequest,
    AttemptsFailed,
    SeedFailed,
    SignerRefused,
    Signers,
    answer_result,
    ask_direct,
    check_answer,
)
from gtorrent.discovery import announce_all
from gtorrent.garlic import transcript
from gtorrent.identity import Identity, b64, short_id
from gtorrent.private import ask_private
from gtorrent.protocol import ModelInfo, PeerRecord, Verdict
from gtorrent.reputation import PeerStanding
from gtorrent.runtime import LanguageModel
from gtorrent.store import Store
from gtorrent.verifier import (
    ChallengeResult,
    Verifier,
    VerifierSettings,
    epoch_of,
    recheck,
    tally,
)

from .test_private import PROMPT, Swarm

MODEL_ID = "ab" * 32
OTHER_MODEL = "cd" * 32
REQUEST = b'{"model":"m","prompt":"p"}'


def seed_record(identity: Identity, model_id: str = MODEL_ID, *, stopped: bool = False,
                endpoint: str = "tcp://127.0.0.1:9", context_length: int = 1024, name: str = "m") -> PeerRecord:
    return PeerRecord.sign(identity, endpoint=endpoint, roles=("seed",), models=(ModelInfo(model_id, name, context_length),),
                           seq=int(time.time() * 1000), expires=time.time() + 600, stopped=stopped)


def standing(peer_id: str, reputation: float | None) -> PeerStanding:
    """Verified with R = `reputation` (None: unverified)."""
    return PeerStanding(peer_id, 0.5 if reputation is None else reputation, 0, 0, 0, 0.0, None, None,
                        verified=reputation is not None)


def answer(signing: Identity, ids: list[int], **fields: object) -> tuple[AnswerSink, dict[str, object], str]:
    """A finished answer of `ids` signed by `signing` over REQUEST, and its `done` with `fields` added."""
    text = "x" * len(ids)
    sink = AnswerSink(seed_record(signing), 10_000, None, max_ids=64)
    sink.add(text, ids)
    done: dict[str, object] = {"tokens": len(ids), "finish_reason": "eos", "model_id": MODEL_ID, **fields}
    return sink, done, b64(signing.sign(transcript(REQUEST, MODEL_ID, text, ids, "eos")))


# ------------------------------------------------------------------ check_answer (pure)


def test_an_answer_signed_by_a_listed_eligible_seed_is_accepted_as_that_seeds() -> None:
    entry_id, target_id = Identity.generate(), Identity.generate()
    entry, target = seed_record(entry_id), seed_record(target_id)
    for reputation in (None, 0.9):  # unverified or trusted: both may answer
        signers = Signers({target.peer_id: target, entry.peer_id: entry},
                          lambda peer_id, r=reputation: standing(peer_id, r))
        sink, done, signature = answer(target_id, [1, 2, 3], signer=target.peer_id, cached=20, prompt_tokens=31)
        checked = check_answer(entry, REQUEST, MODEL_ID, sink, done, signature, signers)
        assert checked.signer is target and (checked.cached, checked.prompt_tokens) == (20, 31)
        result = answer_result(entry, MODEL_ID, sink, REQUEST, checked, 0.1, 0.2)
        assert result.forwarded and result.entry == result.seed == entry.peer_id
        assert result.signer == target.peer_id and result.signing_key == target.signing_key
        assert (result.cached, result.prompt_tokens) == (20, 31)


def test_an_answer_the_entry_signed_itself_is_not_forwarded() -> None:
    entry_id = Identity.generate()
    entry = seed_record(entry_id)
    for fields in ({}, {"signer": entry.peer_id, "cached": 0, "prompt_tokens": 5}):
        sink, done, signature = answer(entry_id, [4, 5], **fields)
        checked = check_answer(entry, REQUEST, MODEL_ID, sink, done, signature)  # no listing needed
        result = answer_result(entry, MODEL_ID, sink, REQUEST, checked, None, 0.2)
        assert not result.forwarded and result.signer == entry.peer_id and result.signing_key == entry.signing_key
    assert (result.cached, result.prompt_tokens) == (0, 5)


def _refusal_cases() -> Iterator[tuple[str, Any]]:
    """(case, builder) where builder(entry identity, target identity) -> (listing, standing R, signer
    identity that signs, signer id named)."""
    yield "unlisted", lambda e, t: ({}, None, t, t.peer_id)
    yield "untrusted", lambda e, t: ({t.peer_id: seed_record(t)}, 0.1, t, t.peer_id)
    yield "stopped", lambda e, t: ({t.peer_id: seed_record(t, stopped=True)}, None, t, t.peer_id)
    yield "another model", lambda e, t: ({t.peer_id: seed_record(t, OTHER_MODEL)}, None, t, t.peer_id)
    # the listing's key for that peer id is another one: a record under the name is not the signer
    yield "other key", lambda e, t: ({t.peer_id: seed_record(t)}, None, Identity.generate(), t.peer_id)
    # spoofing: the entry names a listed seed for an answer it signed with its own key
    yield "spoofed signer", lambda e, t: ({t.peer_id: seed_record(t)}, None, e, t.peer_id)
    # a record filed under a peer id that is not its own
    yield "misfiled record", lambda e, t: ({t.peer_id: seed_record(e)}, None, t, t.peer_id)


@pytest.mark.parametrize(("case", "build"), list(_refusal_cases()), ids=[c for c, _ in _refusal_cases()])
def test_a_forwarded_answer_from_an_ineligible_signer_is_the_entrys_failure(case: str, build: Any) -> None:
    entry_id, target_id = Identity.generate(), Identity.generate()
    entry = seed_record(entry_id)
    listing, reputation, signing, named = build(entry_id, target_id)
    signers = Signers(listing, lambda peer_id: standing(peer_id, reputation))
    sink, done, signature = answer(signing, [1, 2, 3], signer=named)
    with pytest.raises(SeedFailed) as failed:
        check_answer(entry, REQUEST, MODEL_ID, sink, done, signature, signers)
    # the entry is named (it is the one the asker's store blames, run_attempts), and the signer too
    assert failed.value.message.startswith(f"seed {short_id(entry.peer_id)} ")
    assert short_id(named) in failed.value.message
    assert failed.value.reached and not failed.value.stopped  # a failure only the entry can cause


@pytest.mark.parametrize("fields", [{"signer": 7}, {"signer": ""}, {"cached": -1}, {"prompt_tokens": 1 << 25},
                                    {"cached": True}, {"cached": 9, "prompt_tokens": 8}])
def test_malformed_forwarding_fields_are_the_entrys_failure(fields: dict[str, object]) -> None:
    """The private done chunk is not checked by a protocol schema: check_answer checks these itself."""
    entry_id = Identity.generate()
    entry = seed_record(entry_id)
    sink, done, signature = answer(entry_id, [1], **fields)
    with pytest.raises(SeedFailed, match="malformed"):
        check_answer(entry, REQUEST, MODEL_ID, sink, done, signature)


# ------------------------------------------------------------------ real seeds that relay another key's answer


class Forged(dict[str, Identity]):
    """{seed peer id: identity} (`forge`); `honouring`: seeds that sign themselves when the request
    declines forwarding, as an honest entry serves it itself (the others forge regardless)."""

    honouring: set[str]


def declines_forwarding(request: bytes) -> bool:
    return json.loads(request).get("forward") is False


@pytest.fixture
def forge(monkeypatch: pytest.MonkeyPatch) -> Forged:
    """{seed peer id: identity}: that seed signs every transcript with the identity and names it in
    `done` (what an entry relaying the identity's answer sends), direct and private alike."""
    from gtorrent import seed as seed_module

    forged = Forged()
    forged.honouring = set()
    original_signed = seed_module.Responder.signed

    def signed(self: Any, identity: Identity, model_id: str, finish_reason: str) -> str:
        signer = forged.get(identity.peer_id)
        if signer is None or (identity.peer_id in forged.honouring and declines_forwarding(self.request)):
            return original_signed(self, identity, model_id, finish_reason)
        self.forged_signer = signer.peer_id
        return original_signed(self, signer, model_id, finish_reason)

    monkeypatch.setattr(seed_module.Responder, "signed", signed)
    for responder in (seed_module.DirectResponder, seed_module.PrivateResponder):
        original_done = responder.done

        async def done(self: Any, info: dict[str, Any], original_done: Any = original_done) -> None:
            if getattr(self, "forged_signer", None):
                info = {**info, "signer": self.forged_signer}
            await original_done(self, info)

        monkeypatch.setattr(responder, "done", done)
    return forged


async def list_target(swarm: Swarm, target: Identity) -> PeerRecord:
    """Announce a record for `target` serving the swarm's model (nothing listens at its endpoint)."""
    record = seed_record(target, swarm.model.model_id, name=swarm.model.name, context_length=swarm.model.context_length)
    assert await announce_all(swarm.ctx, [swarm.url], record) == {}
    return record


def entry_first(store: Store, target: Identity) -> None:
    """The target backs off after a failure here, so the asker asks the entry first (still eligible)."""
    store.observe(target.peer_id, "failed", detail="(test) ask the entry first")


def untrust(store: Store, peer_id: str, model_id: str) -> None:
    verifier = Identity.generate()
    store.add_verdicts([Verdict.sign(verifier, seed=peer_id, model_id=model_id, epoch=epoch, credibility=0.1,
                                     challenges=3, evidence="0" * 64) for epoch in range(2)])


@pytest.mark.timeout(90)
async def test_a_direct_ask_accepts_an_answer_a_listed_seed_signed(swarm: Swarm, tmp_path: Path,
                                                                   forge: Forged) -> None:
    await swarm.start(relays=0)
    entry, target = swarm.seeds[0].identity, Identity.generate()
    forge[entry.peer_id] = target
    await list_target(swarm, target)
    store = Store.open(tmp_path)
    entry_first(store, target)
    result = await ask_direct(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=12), store)
    assert result.text == swarm.local(12)
    assert result.forwarded and result.entry == entry.peer_id and result.signer == target.peer_id
    assert result.signing_key == seed_record(target).signing_key  # what a verifier re-checks it under
    # delivery is the entry's: the asker's own outcome goes to it, none to the signer
    assert store.standing(entry.peer_id).asks_ok == 1 and store.standing(target.peer_id).asks_ok == 0
    assert result.cached is None or 0 <= result.cached <= (result.prompt_tokens or 0)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("why", ["unlisted", "untrusted"])
async def test_a_direct_ask_refuses_an_answer_an_ineligible_key_signed(swarm: Swarm, tmp_path: Path, why: str,
                                                                       forge: Forged) -> None:
    """A throwaway key (no record in the listing) or an untrusted seed's: the entry failed the attempt."""
    await swarm.start(relays=0)
    entry, target = swarm.seeds[0].identity, Identity.generate()
    forge[entry.peer_id] = target
    store = Store.open(tmp_path)
    if why == "untrusted":
        await list_target(swarm, target)
        untrust(store, target.peer_id, swarm.model.model_id)
        assert store.standing(target.peer_id).state == "untrusted"
    with pytest.raises(AttemptsFailed) as failed:
        await ask_direct(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store)
    # refused, then asked again with forwarding declined: relaying that signer's answer anyway is the
    # entry's failure
    errors = failed.value.errors
    assert [type(e) for e in errors] == [SignerRefused, SeedFailed], errors
    assert all(short_id(target.peer_id) in e.message for e in errors)
    assert "declined forwarding" in errors[1].message
    assert store.standing(entry.peer_id).asks_failed == 1  # the entry's failure, in the asker's store
    assert store.standing(target.peer_id).asks_failed == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["direct", "private"])
async def test_an_entry_whose_group_still_trusts_a_seed_the_asker_does_not_serves_the_ask_itself(
        swarm: Swarm, tmp_path: Path, forge: Forged, mode: str) -> None:
    """The trust race: a verdict the asker has and the entry's group has not read yet. The entry forwards
    to the seed the asker now calls untrusted; the asker asks the entry again with forwarding declined
    and gets the entry's own answer, with nothing against either seed (the entry forwarded in good
    faith; the refused answer was never checked, so it says nothing of the target either)."""
    await swarm.start(relays=12 if mode == "private" else 0)
    entry, target = swarm.seeds[0].identity, Identity.generate()
    forge[entry.peer_id] = target
    forge.honouring.add(entry.peer_id)
    await list_target(swarm, target)
    store = Store.open(tmp_path)
    untrust(store, target.peer_id, swarm.model.model_id)
    ask = ask_direct if mode == "direct" else ask_private
    restarts: list[str] = []
    events = AskEvents(on_restart=lambda seed, reason, pieces: restarts.append(reason))
    result = await ask(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=12), store, events)
    assert result.text == swarm.local(12)
    assert not result.forwarded and result.signer == entry.peer_id and result.attempts == 2
    assert len(result.failures) == 1
    reason = result.failures[0]["reason"]
    assert reason.endswith("an untrusted seed; asking it to serve the ask itself") and restarts == [reason]
    assert store.standing(entry.peer_id).asks_failed == 0 and store.standing(entry.peer_id).asks_ok == 1
    assert store.standing(target.peer_id).asks_failed == 0


@pytest.mark.timeout(90)
async def test_a_private_ask_accepts_an_answer_a_listed_seed_signed(swarm: Swarm, tmp_path: Path,
                                                                    forge: Forged) -> None:
    await swarm.start(relays=12)
    entry, target = swarm.seeds[0].identity, Identity.generate()
    forge[entry.peer_id] = target
    await list_target(swarm, target)
    store = Store.open(tmp_path)
    entry_first(store, target)
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=12), store)
    assert result.mode == "private" and result.text == swarm.local(12)
    assert result.forwarded and result.entry == entry.peer_id and result.signer == target.peer_id
    assert result.signing_key == seed_record(target).signing_key


@pytest.mark.timeout(90)
async def test_a_private_ask_refuses_an_answer_a_throwaway_key_signed(swarm: Swarm, tmp_path: Path,
                                                                      forge: Forged) -> None:
    await swarm.start(relays=12)
    entry, throwaway = swarm.seeds[0].identity, Identity.generate()
    forge[entry.peer_id] = throwaway
    store = Store.open(tmp_path)
    with pytest.raises(AttemptsFailed) as failed:
        await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store)
    assert [type(e) for e in failed.value.errors] == [SignerRefused, SeedFailed]
    assert "not a seed this ask listed" in failed.value.errors[0].message
    assert "declined forwarding" in failed.value.errors[1].message
    assert store.standing(entry.peer_id).asks_failed == 1


# ------------------------------------------------------------------ the verifier


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(None)


def test_a_forwarded_challenge_counts_for_its_signer_and_neither_for_nor_against_the_entry(demo: LanguageModel) -> None:
    from gtorrent.challenges import Challenge
    from gtorrent.runtime import GenerationParams, SamplingParams
    from gtorrent.verifier import score_transcript

    planned = Challenge("Once upon a time", SamplingParams(), 16, 0.0)
    generated = demo.generate(planned.prompt, GenerationParams(max_tokens=16))
    request = {"prompt": planned.prompt, "max_tokens": 16, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    score = score_transcript(demo, request, generated.text, list(generated.token_ids), generated.finish_reason)
    forwarded = ChallengeResult("x", 1, planned, None, score, signer="y")
    silent = ChallengeResult("x", 1, planned, None, None, "no answer", seed_failed=True, silent=True)
    refused = ChallengeResult("x", 1, planned, None, None, "seed x failed: internal", seed_failed=True)
    assert forwarded.forwarded and not forwarded.counted
    assert tally([forwarded]) is None  # nothing of the entry's own
    assert tally([forwarded, silent]) is None  # it answered (by forwarding): its silences are not a C = 0
    assert tally([forwarded, refused]) == (0.0, [refused])  # its own failure still counts
    credited = forwarded.credited()
    assert (credited.seed, credited.signer, credited.sent_to, credited.counted) == ("y", None, "x", True)
    assert tally([credited]) == (pytest.approx(score.calibrated), [credited])
    own = ChallengeResult("y", 1, planned, None, score)
    assert own.credited() is own


@pytest.mark.timeout(120)
async def test_the_verifier_credits_a_listed_signer_and_fails_the_entry_for_an_unlisted_one(
    swarm: Swarm, tmp_path: Path, forge: Forged, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One epoch over two seeds of the model: X relays answers signed by Y (a listed seed): the scores
    are Y's, in Y's verdict and evidence (with the signer and the seed the challenge went to), and X
    gets no verdict. Then X relays answers signed by a throwaway key: X's challenges fail, C = 0."""
    await swarm.start(relays=12)
    entry, target = swarm.seeds[0].identity, Identity.generate()
    target_record = await list_target(swarm, target)
    forge[entry.peer_id] = target
    home = tmp_path / "verifier"
    home.mkdir()
    store = Store.open(home)
    settings = VerifierSettings(epoch_s=600.0, challenges=2, probation=1, min_tokens=16, evidence_below=1.1)
    verifier = Verifier(Identity.generate(), swarm.model, swarm.ctx, [swarm.url], store, home, settings)
    verifier.bind()
    original = verifier.challenge_seed
    sent_to: list[str] = []

    async def only_the_entry(seed: PeerRecord, epoch: int, epoch_start: float) -> list[ChallengeResult]:
        sent_to.append(seed.peer_id)  # the target has no service behind its record: it is sent nothing
        return [] if seed.peer_id == target.peer_id else await original(seed, epoch, epoch_start)

    monkeypatch.setattr(verifier, "challenge_seed", only_the_entry)
    epoch = epoch_of(time.time(), settings.epoch_s) - 1  # its send window is past: challenges go out at once
    try:
        verdicts = await verifier.run_epoch(epoch)
        assert sorted(sent_to) == sorted([entry.peer_id, target.peer_id])
        assert [v.verdict.seed for v in verdicts] == [target.peer_id]  # none for the entry
        judged = verdicts[0]
        # the greedy ones (at least one per epoch): a forwarded sampled challenge counts for nobody
        # (ChallengeResult.credited: the entry could have picked the worst of several samples)
        assert judged.verdict.challenges == len(judged.results) >= 1
        assert all(result.challenge.sampling.greedy for result in judged.results)
        assert judged.verdict.credibility > 0.9  # the demo's own answers
        assert judged.evidence_path is not None
        doc = json.loads(judged.evidence_path.read_bytes())["evidence"]
        assert doc["seed"] == target.peer_id and doc["signing_key"] == b64(target_record.signing_key)
        assert all(item["signer"] == target.peer_id and item["sent_to"] == entry.peer_id for item in doc["challenges"])
        checked = recheck(judged.evidence_path, swarm.model)
        assert checked.agrees, checked.problems
        # restarted within the epoch: the target keeps its one verdict (no second one from forwarded
        # answers), and the entry still gets none
        assert await verifier.run_epoch(epoch) == []
        assert len(store.verdicts(target.peer_id, epoch, model_id=swarm.model.model_id)) == 1

        # an unlisted key: the entry's own failure, a challenge scored 0
        forge[entry.peer_id] = Identity.generate()
        verdicts = await verifier.run_epoch(epoch - 1)
        assert [v.verdict.seed for v in verdicts] == [entry.peer_id]
        failed = verdicts[0]
        assert failed.verdict.credibility == 0.0 and failed.verdict.challenges == 2
        assert all(r.seed_failed and "not a seed this ask listed" in (r.error or "") for r in failed.results)
    finally:
        verifier.close()
        store.close()


@pytest.mark.timeout(30)
async def test_recheck_refuses_evidence_whose_answer_another_seed_signed(tmp_path: Path) -> None:
    """`signer` in an evidence entry must be the verdict's seed (a forwarded answer is its signer's)."""
    from gtorrent.verifier import write_evidence

    seed_id, other, verifier_id = Identity.generate(), Identity.generate(), Identity.generate()
    item = {"request": b64(REQUEST), "text": "x", "token_ids": [1], "finish_reason": "eos",
            "signature": b64(seed_id.sign(transcript(REQUEST, MODEL_ID, "x", [1], "eos"))), "signer": other.peer_id,
            "calibrated": 1.0, "paper": 1.0}
    evidence = {"version": 3, "seed": seed_id.peer_id, "signing_key": b64(seed_record(seed_id).signing_key),
                "model_id": MODEL_ID, "epoch": 1, "challenges": [item]}
    from gtorrent.verifier import _digest

    verdict = Verdict.sign(verifier_id, seed=seed_id.peer_id, model_id=MODEL_ID, epoch=1, credibility=1.0,
                           challenges=1, evidence=_digest(evidence))
    path = write_evidence(tmp_path, verdict, evidence)

    class Model:
        model_id = MODEL_ID
        name = "m"

    checked = recheck(path, Model())  # type: ignore[arg-type]
    assert not checked.agrees and any("another seed" in p for p in checked.problems)


# ------------------------------------------------------------------ visibility: `ask --verbose/--json`, `peers`


def forwarded_result(forwarded: bool, cached: int | None = 40, prompt_tokens: int | None = 52) -> Any:
    from gtorrent.asker import AskResult

    entry, target = Identity.generate(), Identity.generate()
    return AskResult(text="answer", tokens=3, seed=entry.peer_id, model_id=MODEL_ID, finish_reason="eos", ttft_s=0.1,
                     total_s=0.2, attempts=1, token_ids=[1, 2, 3], signature=b"s" * 64, request_bytes=REQUEST,
                     signing_key=seed_record(target if forwarded else entry).signing_key,
                     signer=target.peer_id if forwarded else "", cached=cached, prompt_tokens=prompt_tokens)


@pytest.mark.parametrize("forwarded", [True, False])
def test_ask_json_and_verbose_say_who_generated_the_answer_and_what_was_cached(
    cli, monkeypatch: pytest.MonkeyPatch, forwarded: bool  # type: ignore[no-untyped-def]
) -> None:
    """The CLI's rendering of a result (the library result stands in for a swarm: the real asks are
    the tests above and the end-to-end test)."""
    import gtorrent.node

    result = forwarded_result(forwarded)
    monkeypatch.setattr(gtorrent.node, "ask", lambda *args, **kwargs: result)
    shown = cli("ask", "hi", "--json", "--direct", "--tracker", "tcp://127.0.0.1:1")
    assert shown.code == 0, shown
    doc = json.loads(shown.out)
    assert doc["forwarded"] is forwarded and doc["entry"] == doc["seed"] == result.seed
    assert doc["signer"] == (result.signer if forwarded else result.seed)
    assert (doc["cached_tokens"], doc["prompt_tokens"]) == (40, 52)
    assert doc["text"] == "answer" and doc["signature"] == b64(b"s" * 64)  # the fields that were there stay
    verbose = cli("ask", "hi", "--verbose", "--direct", "--tracker", "tcp://127.0.0.1:1")
    assert verbose.code == 0 and verbose.out == "answer\n", verbose
    if forwarded:
        assert (f"forwarded: seed {short_id(result.seed)} passed the ask to seed {short_id(result.signer)}"
                in verbose.err)
    else:
        assert f"not forwarded: seed {short_id(result.seed)} generated the answer" in verbose.err
    assert "cached 40/52 prompt tokens" in verbose.err


def test_ask_says_when_the_seed_did_not_report_its_cache(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import gtorrent.node

    monkeypatch.setattr(gtorrent.node, "ask", lambda *args, **kwargs: forwarded_result(False, None, None))
    doc = json.loads(cli("ask", "hi", "--json", "--direct", "--tracker", "tcp://127.0.0.1:1").out)
    assert doc["cached_tokens"] is None and doc["prompt_tokens"] is None and doc["forwarded"] is False
    assert "cached tokens not reported" in cli("ask", "hi", "-v", "--direct", "--tracker", "tcp://127.0.0.1:1").err


@pytest.mark.timeout(60)
def test_peers_shows_each_seeds_cache_hit_rate_and_dashes_for_bad_values(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A record's load is the seed's own word: a value outside 0..1 shows as "-", as does none."""
    import asyncio

    from gtorrent.transport import new_context

    from .procs import start_tracker

    tracker, url = start_tracker(tmp_path / "tracker")
    values: dict[str, float | None] = {"good": 0.875, "zero": 0.0, "high": 7.0, "absent": None}
    records = {
        name: PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{7710 + i}", roles=("seed",),
                              models=(ModelInfo(MODEL_ID, "m", 1024),), seq=1, expires=time.time() + 600,
                              load={"queue": 0.0, **({} if value is None else {"cache_hit": value})})
        for i, (name, value) in enumerate(values.items())
    }

    async def announce() -> None:
        ctx = new_context()
        try:
            for record in records.values():
                assert await announce_all(ctx, [url], record) == {}
        finally:
            ctx.destroy(linger=0)

    try:
        asyncio.run(announce())
        shown = cli("peers", "--tracker", url)
        assert shown.code == 0, shown
        lines = shown.out.splitlines()
        columns = lines[0].split()
        at = columns.index("CACHE")
        assert columns[at + 1] == "HIT"
        expected = {"good": "88%", "zero": "0%", "high": "-", "absent": "-"}
        for name, record in records.items():
            row = next(line.split() for line in lines if line.startswith(short_id(record.peer_id)))
            assert row[-4] == expected[name], (name, row)  # CACHE HIT, then LAST SEEN ("N s ago")
        rows = {row["peer_id"]: row for row in json.loads(cli("peers", "--json", "--tracker", url).out)}
        assert [rows[r.peer_id]["cache_hit"] for r in records.values()] == [0.875, 0.0, None, None]
    finally:
        tracker.kill()


# ------------------------------------------------------------------ end to end: a private `gtorrent ask` that is forwarded

SHARED = ("You are a helpful assistant for a travel agency. The tools are: search flights, book hotels, "
          "check the weather, convert currencies and translate. Always answer briefly and politely. ")


@pytest.mark.timeout(180)
def test_a_private_ask_whose_entry_forwards_reports_the_signer(cli, tmp_path: Path, gtorrent_home: Path) -> None:  # type: ignore[no-untyped-def]
    """Seeds A and B as real processes (B caches nothing); A has served the shared prefix, so B, the
    entry the asker reaches over a circuit (A is the only other relay: one path of one hop), forwards
    to A. The asker accepts A's signature because its own listing holds A, and says so in --json."""
    import asyncio
    import secrets

    from gtorrent.discovery import discover
    from gtorrent.runtime import GenerationParams
    from gtorrent.transport import Connection, new_context

    from .procs import start_seed, start_tracker

    tracker, url = start_tracker(tmp_path / "tracker")
    procs = [tracker]
    try:
        a, a_id = start_seed(tmp_path / "a", [url])
        procs.append(a)
        b, b_id = start_seed(tmp_path / "b", [url], "--kv-cache-mb", "0")
        procs.append(b)
        b.wait_for(rf"group: {a_id[:8]} joined", 20)

        async def warm() -> str:  # one answer of A's puts the shared prefix in its cache
            ctx = new_context()
            try:
                record = (await discover(ctx, [url], role="seed")).records[a_id]
                model_id = record.models[0].model_id
                body = {"id": secrets.token_hex(4), "model": model_id, "prompt": SHARED + "Is Lisbon warm in May?",
                        "max_tokens": 4, "temperature": 0, "top_k": 0, "top_p": 1}
                async with Connection(ctx, record.endpoint, server_key=record.curve_key) as conn:
                    await conn.send("generate", body)
                    while (await conn.recv(30.0, frozenset({"accepted", "token", "done", "error"}))).kind not in (
                            "done", "error"):
                        pass
                return model_id
            finally:
                ctx.destroy(linger=0)

        asyncio.run(warm())
        model = LanguageModel.load(None)
        deadline = time.monotonic() + 60
        while True:  # B learns A's prefixes within an exchange or two; until then B serves such asks itself
            store = Store.open(gtorrent_home)
            store.observe(a_id, "failed", detail="(test) reach B first")  # A backs off: B is the entry
            store.close()
            prompt = SHARED + f"Question {secrets.token_hex(2)}: and in June?"
            shown = cli("ask", prompt, "-n", "6", "--json", "--allow-one-hop", "--tracker", url)
            assert shown.code == 0, shown
            doc = json.loads(shown.out)
            if doc["forwarded"] or time.monotonic() > deadline:
                break
        assert doc["mode"] == "private" and doc["privacy"]["paths"] == 1
        assert doc["forwarded"] is True and doc["entry"] == doc["seed"] == b_id and doc["signer"] == a_id
        assert 0 < doc["cached_tokens"] < doc["prompt_tokens"]
        assert doc["text"] == model.generate(prompt, GenerationParams(max_tokens=6)).text
        said = f"forwarded: seed {short_id(b_id)} passed the ask to seed {short_id(a_id)}, which signed the answer"
        while True:  # -v says the same (B forwards while A holds the prefix and is not overloaded)
            store = Store.open(gtorrent_home)
            store.observe(a_id, "failed", detail="(test) reach B first")
            store.close()
            verbose = cli("ask", prompt, "-n", "6", "-v", "--allow-one-hop", "--tracker", url)
            assert verbose.code == 0, verbose
            if said in verbose.err or time.monotonic() > deadline:
                break
        assert said in verbose.err and re.search(r"cached [1-9]\d*/\d+ prompt tokens", verbose.err), verbose.err
    finally:
        for proc in reversed(procs):
            proc.kill()
