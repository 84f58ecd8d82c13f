"""Cheating seeds against the real verifier (issue 8 item 7): each kind is marked untrusted within 3
epochs and gets no further asks; an honest seed in the same swarm stays trusted.

One swarm for the module (real services on loopback, tests/test_private.py's Swarm): a tracker, 12
relays, the honest seed and one seed of each cheat kind (tests/cheaters.py), every one announcing the
demo model's id and signing its transcripts correctly. One Verifier (short epochs, CHALLENGES per
seed and epoch, answers of MIN_TOKENS to MIN_TOKENS + 128 tokens) runs epoch after epoch until every
cheater is untrusted in its store, 3 epochs at most; the tests then read what it found, and a client
whose store holds the verdicts (served by the tracker) asks the swarm.

Why MIN_TOKENS = 48 is enough: the calibrated score (runtime/score.py) is 1 − 10 × the fraction of
tokens an honest seed could not have produced, so one wrong token in ten leaves 0; other weights get
most tokens wrong within the first few, canned text from the first, and a truncated answer fails the
end test whatever its length. The epoch's C is the lowest challenge score (`epoch_credibility`).

The `sometimes` seed (honest_share = 0.5, an independent `secrets` coin per ask, which cannot tell a
challenge from a user's ask) escapes an epoch only if all CHALLENGES = 7 of its challenges draw the
honest side: p = 2^-7 = 1/128. One C = 0 epoch takes R from 0.5 to 0.2 < 0.3 (untrusted); after an
escaped first epoch (R = 0.8) it takes two caught epochs (0.32, then 0.128), after two escaped ones
more than one is left. So it is not untrusted within 3 epochs only on the epoch sequences escaped-
escaped-any and escaped-caught-escaped: p^2 (2 - p) = 255/2097152 = 0.012 % (checked against the
rule in reputation.py below). The verifier runs with probation = 1, so every epoch holds CHALLENGES
(the default heavier first epoch, challenges.challenge_count, only lowers the figure). The other kinds are caught in their first epoch: every answer of theirs
scores 0. That is this module's chance of a spurious failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from gtorrent.asker import AskRequest, ask_direct
from gtorrent.garlic import transcript
from gtorrent.identity import Identity, verify_signature
from gtorrent.private import ask_private
from gtorrent.runtime import GenerationParams, GenerationResult, LanguageModel, SamplingParams
from gtorrent.runtime.score import FINISH_REASONS
from gtorrent.seed import SeedService
from gtorrent.store import Store
from gtorrent.transport import new_context
from gtorrent.verifier import VerdictResult, Verifier, VerifierSettings, epoch_of

from .cheat_seed import CheatProc, start_cheat_seed
from .cheaters import CANNED_TEXT, CHEAT_KINDS, CheatModel, cheat_model
from .procs import start_tracker
from .test_private import PROMPT, Swarm

CHEATS = tuple(kind for kind in CHEAT_KINDS if kind != "honest")
EPOCH_S = 3.0
CHALLENGES = 7
MIN_TOKENS = 48
MAX_EPOCHS = 3  # the bound


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(None)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", CHEAT_KINDS)
def test_every_kind_gives_a_well_formed_answer_under_the_honest_id(demo: LanguageModel, kind: str) -> None:
    """What the seed signs must be well formed: the ids decode to the text, streamed id-before-text as
    the runtime streams, with a finish reason a whole answer has; only the content lies."""
    model = cheat_model(kind, demo, honest_share=0.5)
    assert (model.model_id, model.name, model.context_length) == (
        demo.model_id,
        demo.name,
        demo.context_length,
    )
    if kind == "smaller":  # tests/models/llama-small: the demo's architecture and tokenizer, fewer weights
        assert model.other is not None and model.other.has_cache
        assert model.other.config["architectures"] == demo.config["architectures"] == ["LlamaForCausalLM"]
        assert model.other.tokenizer.to_str() == demo.tokenizer.to_str()
        assert (
            model.other.files.onnx_path.stat().st_size
            < demo.files.onnx_path.with_suffix(".onnx_data").stat().st_size / 4
        )
    honest = demo.generate(PROMPT, GenerationParams(max_tokens=30))
    for sampling in (SamplingParams(), SamplingParams(temperature=0.9, top_p=0.95)):
        result, ids, pieces = _streamed(model, GenerationParams(max_tokens=30, sampling=sampling, seed=5))
        assert result.token_ids == ids and "".join(piece for _, piece in pieces) == result.text
        for n, (seen, _) in enumerate(pieces):  # each piece's ids came before it
            assert demo.decode(ids[:seen]).startswith("".join(piece for _, piece in pieces[: n + 1]))
        assert demo.decode(ids) == result.text and result.finish_reason in FINISH_REASONS
        assert all(0 <= token < demo.tokenizer.get_vocab_size() for token in ids)
        assert result.finish_reason != "length" or len(ids) == 30
    greedy = model.generate(PROMPT, GenerationParams(max_tokens=30))
    if kind == "honest":
        assert greedy.token_ids == honest.token_ids
    elif kind == "truncate":
        assert greedy.token_ids == honest.token_ids[:10] and greedy.finish_reason == "eos"
    elif kind == "canned":  # whole when it fits (an "eos"), cut at max_tokens otherwise (a "length")
        assert CANNED_TEXT.startswith(greedy.text) and greedy.finish_reason == "length"
        whole = model.generate(PROMPT, GenerationParams(max_tokens=64))
        assert whole.text == CANNED_TEXT and whole.finish_reason == "eos"
    elif kind != "sometimes":
        assert greedy.token_ids != honest.token_ids
    if kind == "sometimes":
        coins = iter([0.1, 0.9])  # below the share: honest; above: other weights
        model.coin = lambda: next(coins)
        assert model.generate(PROMPT, GenerationParams(max_tokens=30)).token_ids == honest.token_ids
        assert model.generate(PROMPT, GenerationParams(max_tokens=30)).token_ids != honest.token_ids


def _streamed(
    model: CheatModel, params: GenerationParams
) -> tuple[GenerationResult, list[int], list[tuple[int, str]]]:
    """Generate, recording the ids (`on_token`) and each text piece with how many ids preceded it."""
    ids: list[int] = []
    pieces: list[tuple[int, str]] = []
    result = model.generate(
        PROMPT, params, on_token=ids.append, on_text=lambda piece: pieces.append((len(ids), piece))
    )
    return result, ids, pieces


@dataclass
class Verified:
    swarm: Swarm
    honest: SeedService
    cheats: dict[str, SeedService]
    models: dict[str, CheatModel]
    store: Store
    verdicts: list[VerdictResult] = field(default_factory=list)
    states: list[dict[str, str]] = field(default_factory=list)  # after each epoch: kind -> trust state
    seconds: float = 0.0

    def kind_of(self, peer_id: str) -> str:
        if peer_id == self.honest.identity.peer_id:
            return "honest"
        return next(kind for kind, seed in self.cheats.items() if seed.identity.peer_id == peer_id)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def verified(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Verified]:
    """The swarm with every cheat kind, after the verifier's epochs (see the module doc)."""
    swarm = Swarm()
    await swarm.start(relays=12)
    cheats: dict[str, SeedService] = {}
    models: dict[str, CheatModel] = {}
    for kind in CHEATS:
        models[kind] = cheat_model(kind, swarm.model, honest_share=0.5)
        seed = SeedService(Identity.generate(), models[kind], trackers=[swarm.url])  # type: ignore[arg-type]
        seed.bind("tcp://127.0.0.1:0")
        swarm.tasks.append(asyncio.create_task(seed.serve()))
        await seed.announce()
        swarm.seeds.append(seed)
        cheats[kind] = seed
    home = tmp_path_factory.mktemp("verifier")
    store = Store.open(home)
    done = Verified(swarm, swarm.seeds[0], cheats, models, store)
    # its own context, as a verifier process has; all CHALLENGES x 6 asks go out within the short epoch's
    # first half at once, each with a socket per relay it greets and per path: past ZeroMQ's default
    # 1023 sockets per context (a real 60 s epoch spreads them over 30 s)
    verifier_ctx = new_context()
    verifier_ctx.set(zmq.MAX_SOCKETS, 8192)
    verifier = Verifier(
        Identity.generate(),
        swarm.model,
        verifier_ctx,
        [swarm.url],
        store,
        home,
        VerifierSettings(epoch_s=EPOCH_S, challenges=CHALLENGES, probation=1, min_tokens=MIN_TOKENS),
    )
    verifier.bind()
    started = time.monotonic()
    last = -1
    try:
        for _ in range(MAX_EPOCHS):
            # one epoch at a time, each a new epoch number (two runs in one epoch would share its number)
            await asyncio.sleep(max(0.0, (last + 1) * EPOCH_S - time.time()))
            last = epoch_of(time.time(), EPOCH_S)
            await verifier.run(asyncio.Event(), max_epochs=1)
            done.states.append(
                {
                    kind: store.standing(seed.identity.peer_id).state
                    for kind, seed in {"honest": done.honest, **cheats}.items()
                }
            )
            if all(done.states[-1][kind] == "untrusted" for kind in CHEATS):
                break
    finally:
        verifier.close()
        verifier_ctx.destroy(linger=0)
    done.verdicts = list(verifier.verdicts)
    done.seconds = time.monotonic() - started
    print(f"verification: {len(done.states)} epoch(s) in {done.seconds:.1f} s; states {done.states}")
    for outcome in done.verdicts:  # shown with -s: how far apart the kinds score at MIN_TOKENS
        scores = [
            f"{r.score.calibrated:.2f}/{r.score.paper:.2f}" for r in outcome.results if r.score is not None
        ]
        kind = done.kind_of(outcome.verdict.seed)
        print(
            f"  epoch {outcome.verdict.epoch} {kind}: C {outcome.verdict.credibility:.2f}; calibrated/paper {scores}"
        )
    yield done
    store.close()
    await swarm.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", CHEATS)
def test_a_cheater_is_untrusted_within_3_epochs_on_scored_signed_answers(
    verified: Verified, kind: str
) -> None:
    peer_id = verified.cheats[kind].identity.peer_id
    assert len(verified.states) <= MAX_EPOCHS
    assert verified.states[-1][kind] == "untrusted", verified.states
    mine = [v for v in verified.verdicts if v.verdict.seed == peer_id]
    assert mine and min(v.verdict.credibility for v in mine) < 0.3
    results = [r for outcome in mine for r in outcome.results]
    # caught by scoring what it signed, not by failing: its answers were whole, signed and scorable (a
    # route failure under load is not its doing and is not counted, verifier.py)
    assert all(r.error is None or not r.error.startswith("unscorable") for r in results), [
        r.error for r in results
    ]
    assert all(r.answer.mode == "private" and r.answer.signature for r in results if r.answer is not None)
    caught = [r for r in results if r.score is not None and r.score.calibrated < 0.3]
    assert caught
    if kind == "truncate":  # the text is the honest model's: the end claim is what gives it away
        assert any(not r.score.end_ok for r in caught if r.score is not None)
    if kind == "canned":
        assert all(r.answer.text == CANNED_TEXT for r in results if r.answer is not None)


@pytest.mark.timeout(300)
def test_the_honest_seed_stays_trusted(verified: Verified) -> None:
    assert all(states["honest"] == "trusted" for states in verified.states), verified.states
    mine = [v for v in verified.verdicts if v.verdict.seed == verified.honest.identity.peer_id]
    assert len(mine) == len(verified.states)
    assert all(v.verdict.credibility >= 0.9 for v in mine), [v.verdict.credibility for v in mine]
    assert sum(v.verdict.challenges for v in mine) >= len(mine) * (CHALLENGES - 1)  # all scored, or nearly


@pytest.mark.timeout(300)
@pytest.mark.asyncio(loop_scope="module")
async def test_after_the_verdicts_every_ask_goes_to_the_honest_seed(
    verified: Verified, tmp_path: Path
) -> None:
    swarm = verified.swarm
    store = Store.open(tmp_path)  # a client's own store: it learns the verdicts from the tracker
    asked_before = {kind: model.asks for kind, model in verified.models.items()}
    honest = verified.honest.identity.peer_id
    for n in range(6):
        request = AskRequest(f"{PROMPT} {n}", max_tokens=8)
        result = await ask_direct(swarm.ctx, [swarm.url], request, store)
        assert result.seed == honest, verified.kind_of(result.seed)
    assert all(
        store.standing(seed.identity.peer_id).state == "untrusted" for seed in verified.cheats.values()
    )
    result = await ask_private(swarm.ctx, [swarm.url], AskRequest(PROMPT, max_tokens=8), store)
    assert result.seed == honest and result.mode == "private"
    assert {kind: model.asks for kind, model in verified.models.items()} == asked_before  # not one ask
    store.close()


@pytest.mark.timeout(120)
async def test_the_cheat_seed_process_serves_canned_text_signed(
    tmp_path: Path, ctx: zmq.asyncio.Context
) -> None:
    """`python -m tests.cheat_seed` (the entry scripts and swarm tests start) serves like `gtorrent
    seed`: announced under the demo model's id and name, a direct ask answered and signed."""
    tracker, url = start_tracker(tmp_path / "tracker")
    seed = None
    try:
        seed, peer_id = start_cheat_seed(tmp_path / "seed", [url], "canned")
        store = Store.open(tmp_path)
        demo = LanguageModel.load(None)
        result = await ask_direct(ctx, [url], AskRequest(PROMPT, model="gtorrent-demo", max_tokens=64), store)
        assert result.seed == peer_id and result.model_id == demo.model_id
        assert result.text == CANNED_TEXT and result.finish_reason == "eos"
        assert demo.decode(result.token_ids) == CANNED_TEXT
        signed = transcript(
            result.request_bytes, result.model_id, result.text, result.token_ids, result.finish_reason
        )
        assert verify_signature(result.signing_key, result.signature, signed)
        store.close()
        assert seed.terminate() == 0
        assert any("0 of 1 answered honestly" in line for line in [*seed.seen, *_rest(seed)])
    finally:
        if seed is not None:
            seed.kill()
        tracker.kill()


def _rest(proc: CheatProc) -> list[str]:
    """The lines a finished process printed after those already read."""
    lines = []
    while (line := proc.lines.get(timeout=5)) is not None:
        lines.append(line)
    return lines


@pytest.mark.timeout(10)
def test_escape_probability_of_the_sometimes_seed_is_as_documented() -> None:
    """The module doc's figure, from the reputation rule itself (reputation.py) over every epoch
    sequence of caught (C = 0) and escaped (C = 1) epochs."""
    from itertools import product

    from gtorrent.reputation import state_of, verification_reputation

    escape = 2.0**-CHALLENGES
    total = 0.0
    for sequence in product((0.0, 1.0), repeat=MAX_EPOCHS):
        untrusted = any(
            state_of(verification_reputation(sequence[: n + 1])) == "untrusted" for n in range(MAX_EPOCHS)
        )
        if not untrusted:
            total += escape ** sum(sequence) * (1 - escape) ** (MAX_EPOCHS - sum(sequence))
    assert abs(total - escape**2 * (2 - escape)) < 1e-15
    assert CHALLENGES != 7 or (abs(total - 255 / 2097152) < 1e-15 and f"{total:.3%}" == "0.012%")
