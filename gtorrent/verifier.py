"""The verifier node: hidden challenges to every seed of one model, scored, as signed verdicts.

Each epoch (number = floor(unix time / epoch_s), so independent verifiers agree on it) the verifier
lists the seeds announcing its reference model's id, plans challenges for each (challenges.py:
generated prompts, users' sampling settings, at least one greedy, send times uniform over the epoch;
untrusted seeds at a lower rate so a fixed seed can earn its way back) and sends each as an ordinary
private ask aimed at that seed (`ask_private(only_seed=...)`: the same S-IDA cloves over onion paths,
the same message shapes as a user's). An answer counts only with the seed's transcript signature
(checked by the asker) and when the reference decodes the signed token ids to the signed text; it is
scored with runtime.score against the reference (sampling parameters and sampling seed read from the
signed request itself), and the epoch's C(T) (`epoch_credibility`) is signed as a `Verdict`, kept in
the verifier's store and handed to every tracker (`discovery.submit_verdict`), which serve it with peer
listings.

Evidence: the verdict's `evidence` digest is the SHA-256 of the canonical JSON evidence document of
that seed and epoch: every scored challenge's signed transcript (request bytes, text, token ids, finish
reason, the seed's signature and key) with the verifier's score. When C or any challenge's score is
below `evidence_below`, the document and the verdict are written to
`<home>/evidence/<epoch>-<seed>.json` (0600), and `recheck` lets anyone holding the model re-score it
and say whether they agree. Challenges that failed (no answer, route failures) are not scored and not
counted; a seed that answers no challenge gets no verdict that epoch (its asks' failures go to the
store as for any ask).

Timing: send times are uniform over the first `send_within` of the epoch; in the epoch the verifier
starts in, those already past go out at once (a burst only at start-up).

Invariants: a verdict is only signed over at least one scored challenge; evidence files are never
overwritten (O_EXCL); the verifier's own store receives every verdict it signs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .asker import AskRequest, AskResult, AskTimeouts
from .challenges import DEFAULT_MIN_TOKENS, Challenge, challenge_count, plan_challenges, vocabulary_words
from .discovery import Announcer, discover, submit_verdict
from .errors import GtorrentError, UsageError
from .garlic import transcript
from .identity import Identity, b64, peer_id_for, short_id, unb64, verify_signature
from .private import ask_private
from .protocol import PeerRecord, ProtocolError, Verdict, canonical
from .runtime import (
    AnswerScore,
    GenerationParams,
    LanguageModel,
    SamplingParams,
    epoch_credibility,
    score_answer,
)
from .store import Store
from .transport import Context, Server

EVIDENCE_VERSION = 1
EVIDENCE_DIR = "evidence"
EVIDENCE_BELOW = 0.5  # a challenge or an epoch scoring below this keeps its transcripts as evidence
RECHECK_TOLERANCE = 0.05  # |C re-scored − C signed| within which a re-check agrees
RECORD_TTL_S = 90.0


class EvidenceError(GtorrentError):
    default_hint = "pass an evidence file written by `gtorrent verify` (under GTORRENT_HOME/evidence)"


@dataclass(frozen=True)
class VerifierSettings:
    epoch_s: float = 60.0  # epoch length, seconds; epoch number = floor(unix time / epoch_s)
    challenges: int = 3  # per trusted or unverified seed and epoch (untrusted: challenges.challenge_count)
    min_tokens: int = DEFAULT_MIN_TOKENS  # answer length asked for, at least (when the context allows)
    evidence_below: float = EVIDENCE_BELOW
    send_within: float = 0.5  # challenges go out within this fraction of the epoch; the rest is for answers
    paths: int = 4  # private-path shape of challenges, as users' defaults
    hops: int = 3
    allow_one_hop: bool = False
    use_guards: bool = True
    timeouts: AskTimeouts = field(default_factory=lambda: AskTimeouts(accept_s=5.0, first_token_s=60.0, between_tokens_s=30.0))

    def __post_init__(self) -> None:
        if not (self.epoch_s > 0 and math.isfinite(self.epoch_s)):
            raise UsageError(f"--epoch must be a positive number of seconds, got {self.epoch_s}", hint="e.g. --epoch 60")
        if not 1 <= self.challenges <= 1000:
            raise UsageError(f"--challenges must be 1 to 1000, got {self.challenges}", hint="e.g. --challenges 3")


@dataclass(frozen=True)
class ChallengeResult:
    seed: str
    epoch: int
    challenge: Challenge
    answer: AskResult | None
    score: AnswerScore | None  # None: no answer to score (see `error`)
    error: str | None = None

    @property
    def calibrated(self) -> float | None:
        return None if self.score is None else self.score.calibrated


@dataclass(frozen=True)
class VerdictResult:
    verdict: Verdict
    results: list[ChallengeResult]
    evidence_path: Path | None  # None: nothing low enough to keep
    submitted: dict[str, str]  # tracker -> error, for the trackers that did not take it


@dataclass
class VerifierEvents:
    epoch: Callable[[int, list[PeerRecord]], None] = lambda epoch, seeds: None
    challenge: Callable[[ChallengeResult], None] = lambda result: None
    verdict: Callable[[VerdictResult], None] = lambda result: None
    announced: Callable[[dict[str, str]], None] = lambda errors: None
    failed: Callable[[int, str], None] = lambda epoch, message: None  # an epoch that could not run (no tracker)


def epoch_of(now: float, epoch_s: float) -> int:
    return int(now // epoch_s)


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


def evidence_document(seed: PeerRecord, model_id: str, epoch: int, results: list[ChallengeResult]) -> dict[str, Any]:
    """The evidence of one seed and epoch: each scored challenge's signed transcript and its score."""
    challenges = []
    for result in results:
        if result.answer is None or result.score is None:
            continue
        answer = result.answer
        challenges.append({
            "request": b64(answer.request_bytes),
            "text": answer.text,
            "token_ids": list(answer.token_ids),
            "finish_reason": answer.finish_reason,
            "signature": b64(answer.signature),
            "calibrated": float(result.score.calibrated),
            "paper": float(result.score.paper),
        })
    return {"version": EVIDENCE_VERSION, "seed": seed.peer_id, "signing_key": b64(seed.signing_key),
            "model_id": model_id, "epoch": epoch, "challenges": challenges}


def write_evidence(home: Path, verdict: Verdict, evidence: dict[str, Any]) -> Path:
    """Write {verdict, evidence} as JSON, 0600, never over an existing file."""
    folder = home / EVIDENCE_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{verdict.epoch}-{verdict.seed[:16]}-{verdict.verifier[:8]}.json"
    data = json.dumps({"verdict": verdict.to_wire(), "evidence": evidence}, indent=1).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _lie(score: AnswerScore) -> AnswerScore:
    """A score for an answer whose signed text is not what its signed token ids decode to: nothing."""
    return replace(score, support_fraction=0.0, calibrated=0.0, end_ok=False, surprisal_excess=0.0, surprisal_spread=0.0)


def score_transcript(model: LanguageModel, request: dict[str, Any], text: str, token_ids: list[int],
                     finish_reason: str) -> AnswerScore:
    """Score one answer to a challenge request (the JSON the seed received) against `model`."""
    sampling = SamplingParams(float(request["temperature"]), int(request["top_k"]), float(request["top_p"]))
    prompt_ids = model.encode(str(request["prompt"]), chat=bool(request.get("chat", False)))
    seed = request.get("seed")
    score = score_answer(model, prompt_ids, token_ids, sampling, finish_reason=finish_reason,
                         seed=seed if type(seed) is int else None, max_tokens=int(request["max_tokens"]))
    return score if model.decode(token_ids) == text else _lie(score)


class Verifier:
    """Challenges the seeds of `model` each epoch and signs verdicts (module docstring)."""

    def __init__(
        self,
        identity: Identity,
        model: LanguageModel,
        ctx: Context,
        trackers: list[str],
        store: Store,
        home: Path,
        settings: VerifierSettings | None = None,
        events: VerifierEvents | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity, self.model, self.ctx, self.trackers = identity, model, ctx, trackers
        self.store, self.home = store, home
        self.settings = settings or VerifierSettings()
        self.events = events or VerifierEvents()
        self.rng = rng or secrets.SystemRandom()  # a seed must not predict prompts, settings or times
        self.clock = clock
        vocab = model.tokenizer.get_vocab_size()
        self.words = vocabulary_words([model.tokenizer.decode([i]) for i in range(vocab)])
        # a record to announce the role: peers and trackers see who verifies (THREAT_MODEL.md)
        self.server = Server(ctx, curve_secret=identity.curve_secret, name="verifier")
        self.announcer = Announcer(ctx, trackers, self.record, RECORD_TTL_S / 3, home=home)
        self.announcer.on_announce = lambda errors: self.events.announced(errors)
        self.verdicts: list[VerdictResult] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def bind(self, url: str = "tcp://127.0.0.1:0", advertise: str | None = None) -> str:
        return self.server.bind(url, advertise)

    def record(self, stopped: bool = False) -> PeerRecord:
        now = time.time()
        return PeerRecord.sign(self.identity, endpoint=self.server.endpoint, roles=("verifier",), seq=int(now * 1000),
                               expires=now + RECORD_TTL_S, stopped=stopped)

    # ----------------------------------------------------------------- challenges

    def _extend(self, opening: str, tokens: int, sample_seed: int) -> str:
        params = GenerationParams(max_tokens=tokens, sampling=SamplingParams(temperature=1.0), seed=sample_seed)
        return self.model.generate(opening, params).text

    def plan(self, count: int) -> list[Challenge]:
        return plan_challenges(
            count, self.settings.epoch_s, self.words, self.rng, context_length=self.model.context_length,
            prompt_tokens=lambda prompt: len(self.model.encode(prompt)), extend=self._extend,
            min_tokens=self.settings.min_tokens, send_within=self.settings.send_within,
        )

    async def challenge(self, seed: PeerRecord, epoch: int, challenge: Challenge) -> ChallengeResult:
        """One private ask aimed at `seed`, scored; failures come back as a result with `error`."""
        sampling = challenge.sampling
        request = AskRequest(challenge.prompt, model=self.model.model_id, max_tokens=challenge.max_tokens,
                             temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        try:
            answer = await ask_private(
                self.ctx, self.trackers, request, self.store, timeouts=self.settings.timeouts,
                paths=self.settings.paths, hops=self.settings.hops, allow_one_hop=self.settings.allow_one_hop,
                use_guards=self.settings.use_guards, only_seed=seed, max_attempts=2,
            )
        except GtorrentError as exc:
            return ChallengeResult(seed.peer_id, epoch, challenge, None, None, exc.message)
        try:
            body = json.loads(answer.request_bytes)
            score = await asyncio.to_thread(
                score_transcript, self.model, body, answer.text, answer.token_ids, answer.finish_reason
            )
        except (GtorrentError, ValueError, KeyError, TypeError) as exc:
            # ids outside the vocabulary and the like: the seed signed an answer no honest seed gives
            message = exc.message if isinstance(exc, GtorrentError) else str(exc)
            return ChallengeResult(seed.peer_id, epoch, challenge, answer, None, f"unscorable answer: {message}")
        return ChallengeResult(seed.peer_id, epoch, challenge, answer, score)

    async def verify_seed(self, seed: PeerRecord, epoch: int, epoch_start: float) -> VerdictResult | None:
        """Challenge one seed over one epoch; sign, keep and submit its verdict (None: nothing scored)."""
        count = challenge_count(self.store.standing(seed.peer_id).state, self.settings.challenges)
        plans = await asyncio.to_thread(self.plan, count)

        async def timed(challenge: Challenge) -> ChallengeResult:
            delay = epoch_start + challenge.send_at_s - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            result = await self.challenge(seed, epoch, challenge)
            self.events.challenge(result)
            return result

        results = list(await asyncio.gather(*(timed(challenge) for challenge in plans)))
        scores = [result.score for result in results if result.score is not None]
        if not scores:
            return None
        credibility = min(max(epoch_credibility(scores), 0.0), 1.0)
        evidence = evidence_document(seed, self.model.model_id, epoch, results)
        verdict = Verdict.sign(self.identity, seed=seed.peer_id, model_id=self.model.model_id, epoch=epoch,
                               credibility=credibility, challenges=len(scores), evidence=_digest(evidence))
        low = credibility < self.settings.evidence_below or any(s.calibrated < self.settings.evidence_below for s in scores)
        path = write_evidence(self.home, verdict, evidence) if low else None
        self.store.add_verdicts([verdict])
        submitted = await self.submit(verdict)
        outcome = VerdictResult(verdict, results, path, submitted)
        self.verdicts.append(outcome)
        self.events.verdict(outcome)
        return outcome

    async def submit(self, verdict: Verdict) -> dict[str, str]:
        """Hand the verdict to every tracker; {tracker: error} for those that did not take it."""
        return await submit_verdict(self.ctx, self.trackers, verdict)

    async def run_epoch(self, epoch: int) -> list[VerdictResult]:
        """List the seeds of the model and challenge each of them over `epoch`."""
        found = await discover(self.ctx, self.trackers, model=self.model.model_id, role="seed")
        seeds = [record for record in found.records.values()
                 if record.peer_id != self.identity.peer_id
                 and any(info.model_id == self.model.model_id for info in record.models)]
        self.store.saw_peers(seeds)
        self.events.epoch(epoch, seeds)
        start = epoch * self.settings.epoch_s
        done = await asyncio.gather(*(self.verify_seed(seed, epoch, start) for seed in seeds))
        return [result for result in done if result is not None]

    async def run(self, stop: asyncio.Event, max_epochs: int | None = None) -> None:
        """Announce, then start an epoch's challenges at every epoch boundary (the current epoch first)
        until `stop` is set or `max_epochs` have started; wait for the epochs under way to finish."""
        await self.announcer.announce()
        announcing = asyncio.create_task(self.announcer.loop())
        started = 0
        try:
            while not stop.is_set() and (max_epochs is None or started < max_epochs):
                epoch = epoch_of(self.clock(), self.settings.epoch_s)
                task = asyncio.create_task(self._epoch_task(epoch))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                started += 1
                next_start = (epoch + 1) * self.settings.epoch_s
                if max_epochs is not None and started >= max_epochs:
                    break
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, next_start - self.clock()))
                except TimeoutError:
                    pass
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=stop.is_set())
        finally:
            announcing.cancel()
            for task in self.tasks:
                task.cancel()

    async def _epoch_task(self, epoch: int) -> None:
        try:
            await self.run_epoch(epoch)
        except GtorrentError as exc:  # no tracker answered, say: this epoch is lost, the next may run
            self.events.failed(epoch, exc.message)

    async def stop(self) -> dict[str, str]:
        return await self.announcer.stop()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.server.close()


# ---------------------------------------------------------------------- re-checking a verdict


@dataclass(frozen=True)
class Recheck:
    verdict: Verdict
    agrees: bool
    credibility: float | None  # C re-scored here (None: the evidence did not check out)
    scores: list[float]  # calibrated, per challenge, re-scored here
    problems: list[str]


def recheck(path: Path, model: LanguageModel) -> Recheck:
    """Re-score an evidence file with `model`: the verdict's signature, the evidence digest, every
    transcript's signature under the seed's key, decode(ids) == text, then C from the signed requests'
    own sampling parameters. Agrees when all of that checks and C is within RECHECK_TOLERANCE."""
    try:
        doc = json.loads(path.read_bytes())
        verdict = Verdict.from_wire(doc["verdict"])
        evidence = doc["evidence"]
    except OSError as exc:
        raise EvidenceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError, ProtocolError) as exc:
        raise EvidenceError(f"{path} is not a gtorrent evidence file ({exc})") from exc
    if not isinstance(evidence, dict):
        raise EvidenceError(f"{path} is not a gtorrent evidence file (no evidence object)")
    problems: list[str] = []
    if verdict.model_id != model.model_id:
        raise UsageError(f"the verdict is about model {verdict.model_id[:12]}, not {model.name} ({model.model_id[:12]})",
                         hint="pass the model the verdict names")
    if _digest(evidence) != verdict.evidence:
        problems.append("the evidence is not what the verdict signed (digest differs)")
    scores: list[AnswerScore] = []
    try:
        seed_key = unb64(str(evidence["signing_key"]))
        if peer_id_for(seed_key) != verdict.seed or evidence["seed"] != verdict.seed:
            problems.append("the evidence names another seed than the verdict")
        for number, item in enumerate(evidence["challenges"], 1):
            request_bytes = unb64(str(item["request"]))
            ids = [int(token) for token in item["token_ids"]]
            signed = transcript(request_bytes, verdict.model_id, str(item["text"]), ids, str(item["finish_reason"]))
            if not verify_signature(seed_key, unb64(str(item["signature"])), signed):
                problems.append(f"challenge {number}: the seed's signature does not verify")
                continue
            request = json.loads(request_bytes)
            scores.append(score_transcript(model, request, str(item["text"]), ids, str(item["finish_reason"])))
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"malformed evidence ({exc})")
    except GtorrentError as exc:
        problems.append(exc.message)
    if problems or not scores:
        if not scores and not problems:
            problems.append("the evidence holds no challenge")
        return Recheck(verdict, False, None, [s.calibrated for s in scores], problems)
    credibility = epoch_credibility(scores)
    agrees = abs(credibility - verdict.credibility) <= RECHECK_TOLERANCE
    if not agrees:
        problems.append(f"C re-scored {credibility:.3f}, the verdict says {verdict.credibility:.3f}")
    return Recheck(verdict, agrees, credibility, [s.calibrated for s in scores], problems)


def describe(verdict: Verdict) -> str:
    return f"seed {short_id(verdict.seed)} epoch {verdict.epoch}: C = {verdict.credibility:.3f} over {verdict.challenges}"


__all__ = [
    "ChallengeResult",
    "EvidenceError",
    "Recheck",
    "Verifier",
    "VerifierEvents",
    "VerifierSettings",
    "VerdictResult",
    "epoch_of",
    "evidence_document",
    "recheck",
    "score_transcript",
]
