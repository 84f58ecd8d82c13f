"""The verifier node: hidden challenges to every seed of one model, scored, as signed verdicts.

Each epoch (number = floor(unix time / epoch_s), so independent verifiers agree on it) the verifier
lists the seeds announcing its reference model's id, plans challenges for each (challenges.py:
generated prompts, users' sampling settings, at least one greedy, send times uniform over the epoch;
seeds it has not judged yet on a heavier first epoch; untrusted seeds in a third of the epochs, so a
fixed seed can earn its way back: challenges.challenge_count) and sends each as an ordinary
private ask aimed at that seed (`ask_private(only_seed=...)`: the same S-IDA cloves over onion paths,
the same message shapes as a user's). An answer counts only with the seed's transcript signature
(checked by the asker) and when the reference decodes the signed token ids to the signed text; it is
scored with runtime.score against the reference (sampling parameters and sampling seed read from the
signed request itself), and the epoch's C(T) (`epoch_credibility`) is signed as a `Verdict`, kept in
the verifier's store and handed to every tracker (`discovery.submit_verdict`), which serve it with peer
listings.

Evidence: the verdict's `evidence` digest is the SHA-256 of the canonical JSON evidence document of
that seed and epoch: every scored challenge's signed transcript (request bytes, text, token ids, finish
reason, the seed's signature and key; `signer`, and `sent_to` for a challenge another seed forwarded to
it) with the verifier's score. When C or any challenge's score is
below `evidence_below`, the document and the verdict are written to
`<home>/evidence/<epoch>-<seed>-<model>-<verifier>.json` (0600, ids shortened), and `recheck` lets anyone holding the model re-score it
and say whether they agree.

Failed challenges: who failed decides whether a challenge counts (asker/private blame rules).
- The seed failed it after it was reached (`seed_failure`) in a way only the seed can: it refused (an
  error of its own, or `bad_request` for a request the reference serves), sent a bad chunk, a count
  or finish reason no whole answer has, or a transcript signature that does not verify (a forwarded
  answer's included: one naming a signer that is not a seed of the model in this epoch's listing (read
  at the epoch's start and again every quarter of it, `_refresh_listing`), or
  whose signature does not verify under that seed's listed key, is the seed's own failure, so a seed
  cannot launder its bad answers by signing them with throwaway keys); or it signed
  an answer the reference cannot score at all (token ids outside its vocabulary, say). That counts as a challenge scored 0: otherwise a seed that recognised a
  challenge could drop it and lose nothing.
- The seed forwarded it to another seed of its model group whose signature the answer carries, and
  that signer is a listed seed of the model (`ChallengeResult.signer`): a greedy challenge's answer is
  the signer's (a sampled one counts for nobody: the entry could have drawn several samples from the
  signer and relayed the least likely, `ChallengeResult.credited`). It
  is scored (or counted 0 as unscorable) in the signer's epoch sample (`run_epoch` pools every seed's
  challenges first, then tallies each sample), and it counts neither for nor against the seed it was
  sent to, though it shows that seed answered (`tally`'s silence rule). A seed that forwards every
  challenge gets no verdict of its own (it stays unverified, in the tier below trusted seeds); a
  signer already judged this epoch before a restart gets no second verdict (its share is dropped).
- Nothing of the seed's came back though circuits reached it (silence, or every path broken before
  any chunk), or its answer stopped, or every path broke, mid-answer (`SeedFailed.stopped`): relays
  dropping the request on n - k + 1 paths look the same, and so do relays on every path that stop
  forwarding at one cell count or send a destroy (any relay may, naming a later hop); none of that
  must frame a seed. Nor must a seed that says it is "busy" on every retry (BUSY_RETRIES): anyone can
  fill an honest seed's queue with asks, and a popular one is full at times. A cheater gains nothing
  from stopping mid-answer or saying "busy" that silence would not give it.
  The challenge is sent again over fresh paths (a busy one after a pause); if it is silent again it
  is `silent`, and silent
  challenges count (as 0) only when the seed answered no challenge of the epoch (`tally`): a seed
  that drops the challenges it recognises and answers the others is scored on those, and one that
  drops them all gets C = 0.
- The route failed (RouteFailed: relays broke or dropped cells, suspects left out), no relays or no
  tracker, the seed says it does not serve the model (`unknown_model`: it switched models since the
  epoch's listing; a cheater gains nothing by it, as it cannot tell challenges from users' asks and
  would refuse those too), or the seed was not reached at all (no path got a circuit to it: `SeedFailed.reached` is
  False, e.g. it is down): not counted. A seed reached by no challenge of an epoch gets no verdict
  that epoch rather than a 0, so a seed that is simply down (or unreachable through the relays) is
  never framed; refusing circuits is no escape either, as the seed cannot tell a challenge's circuit
  from a user's before the request, and it then serves no private ask at all.
Where no signed transcript exists, the evidence entry ("unanswered") keeps the request's settings and
the reason, marked as the verifier's word, and `recheck` counts it as 0 and says so; an unscorable
signed answer keeps its transcript.

Timing: send times are uniform over the first `send_within` of the epoch, planned when the epoch's
challenges are drawn and spread over what is left of that part of the epoch (`first_epoch`,
`send_times`): a verifier that starts mid-epoch runs that epoch only when at least half of its send
window is left (its challenges spread over the rest), else it starts at the next boundary; so there is
no burst of challenges right after a verifier announces.

First hops: a first relay sees the address a circuit comes from, and the verifier announces its
endpoint, so a first relay colluding with a seed can flag the verifier's circuits to it (the timing of
a circuit's setup is enough for the seed to pick out the ask that follows). Guards would make that
permanent: the same few relays are the first hop of every challenge for weeks (and all of a guard set
gets a `hello` at the start of every ask), so one colluding guard would let a cheater answer every
challenge honestly for the guard set's lifetime. The verifier therefore uses no guards (`use_guards`
False): each challenge's paths start at fresh relays, so a cheater escapes an epoch only if every one
of its challenges has a colluding first hop (about (1 - (1 - f)^n)^c for a fraction f of relays, n
paths, c challenges), and is caught in the first epoch that does not. Guards protect an asker's
identity, which a verifier's role makes public anyway. Running the challenges from an address other
than the announced endpoint removes the flag altogether (an operator's choice).

Invariants: a verdict is only signed over at least one counted challenge (scored, or failed by the
seed); evidence files are never overwritten (O_EXCL); the verifier's own store receives every verdict
it signs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq

from .asker import AskRequest, AskResult, AskTimeouts, AttemptsFailed, RequestRefused, SeedFailed, Signers
from .challenges import (
    DEFAULT_MIN_TOKENS,
    PROBATION_FACTOR,
    Challenge,
    challenge_count,
    plan_challenges,
    vocabulary_words,
)
from .discovery import Announcer, discover, submit_verdict
from .errors import GtorrentError, UsageError
from .garlic import transcript
from .identity import Identity, b64, peer_id_for, short_id, unb64, verify_signature
from .private import ask_private
from .protocol import MAX_VERDICT_EPOCH_MS, PeerRecord, ProtocolError, Verdict, canonical
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

log = logging.getLogger(__name__)

# 2: entries for challenges the seed failed ("unanswered"); 3: answered entries name their "signer", and
# "sent_to" the seed a forwarded challenge was sent to
EVIDENCE_VERSION = 3
EVIDENCE_DIR = "evidence"
EVIDENCE_BELOW = 0.5  # a challenge or an epoch scoring below this keeps its transcripts as evidence
RECHECK_TOLERANCE = 0.05  # |C re-scored − C signed| within which a re-check agrees
RECORD_TTL_S = 90.0
MAX_EPOCH_S = MAX_VERDICT_EPOCH_MS / 1000  # a verdict's epoch lasts at most a week
BUSY_RETRIES = 2  # a challenge the seed refuses as "busy" is sent again this many times before it counts
BUSY_RETRY_FRACTION = 0.1  # ... each after a random delay of up to this fraction of the epoch
SILENT_RETRIES = 1  # a challenge nothing came back for is sent again on fresh paths this many times
# the model's listing is read again this often while an epoch's challenges run (`_refresh_listing`): a
# quarter of the epoch, within these bounds
LISTING_REFRESH_MIN_S = 5.0
LISTING_REFRESH_MAX_S = 60.0
NO_TRANSCRIPT = "no signed transcript exists: the seed was reached and failed this challenge (the verifier's word)"


class EvidenceError(GtorrentError):
    default_hint = "pass an evidence file written by `gtorrent verify` (under GTORRENT_HOME/evidence)"


@dataclass(frozen=True)
class VerifierSettings:
    epoch_s: float = 60.0  # epoch length, seconds; epoch number = floor(unix time / epoch_s)
    challenges: int = 3  # per trusted seed and epoch (unverified and untrusted: challenges.challenge_count)
    probation: int = PROBATION_FACTOR  # unverified seeds get this many times `challenges`
    min_tokens: int = DEFAULT_MIN_TOKENS  # answer length asked for, at least (when the context allows)
    evidence_below: float = EVIDENCE_BELOW
    send_within: float = 0.5  # challenges go out within this fraction of the epoch; the rest is for answers
    paths: int = 4  # private-path shape of challenges, as users' defaults
    hops: int = 3
    allow_one_hop: bool = False
    # fresh first hops for every challenge, never the asker's guards (module docstring, "First hops")
    use_guards: bool = False
    max_in_flight: int = 16  # challenges under way at once (sockets per process are bounded)
    timeouts: AskTimeouts = field(default_factory=lambda: AskTimeouts(accept_s=5.0, first_token_s=60.0, between_tokens_s=30.0))

    def __post_init__(self) -> None:
        if not (self.epoch_s > 0 and math.isfinite(self.epoch_s)):
            raise UsageError(f"--epoch must be a positive number of seconds, got {self.epoch_s}", hint="e.g. --epoch 60")
        if self.epoch_s > MAX_EPOCH_S or abs(self.epoch_s * 1000 - round(self.epoch_s * 1000)) > 1e-6:
            # verdicts sign the epoch's start and length in whole milliseconds, at most a week
            raise UsageError(f"--epoch must be a whole number of milliseconds up to one week, got {self.epoch_s}",
                             hint="e.g. --epoch 60 or --epoch 2.5")
        if not 1 <= self.probation <= 10:
            raise UsageError(f"probation must be 1 to 10 times the challenges, got {self.probation}")
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
    seed_failed: bool = False  # the seed was reached and failed it (`error` says how)
    silent: bool = False  # ... and nothing of its came back, even over fresh paths (counted only by `tally`)
    # forwarded: the listed seed of the model that generated and signed the answer, when not `seed`. The
    # result is then that seed's (`credited`), and neither counts for nor against `seed`
    signer: str | None = None
    sent_to: str | None = None  # in a result credited to the signer: the seed the challenge was sent to

    @property
    def calibrated(self) -> float | None:
        if self.seed_failed and not self.silent:
            return 0.0
        return None if self.score is None else self.score.calibrated

    @property
    def forwarded(self) -> bool:
        return self.signer is not None and self.signer != self.seed

    @property
    def counted(self) -> bool:
        """Part of the epoch's C whatever the other challenges did: scored, or failed by the seed in a
        way only the seed can (module docstring); a silent failure counts only as `tally` says. A
        forwarded answer counts for its signer when greedy (`credited`), never for the seed it was sent to."""
        return not self.forwarded and (self.score is not None or (self.seed_failed and not self.silent))

    def credited(self) -> ChallengeResult:
        """The result as part of its signer's epoch sample: the signer's own, sent to `seed`. Only a greedy
        challenge's: a sampled one stays with `seed`, counted for nobody. A target signs every sample
        it draws for the request bytes it is given, and the entry can obtain several (a `forward` each,
        or the same bytes as its own direct or private ask) and relay the least likely one, which would
        frame an honest target; a greedy answer is the same every time, so there is nothing to pick."""
        if self.signer is None or self.signer == self.seed or not self.challenge.sampling.greedy:
            return self
        return replace(self, seed=self.signer, signer=None, sent_to=self.seed)


def tally(results: list[ChallengeResult]) -> tuple[float, list[ChallengeResult]] | None:
    """An epoch's C over one seed's challenges and the challenges it rests on; None when none counts.

    Scored challenges give their scores and a failure only the seed can cause scores 0 (C is the
    lowest). A silent one (nothing came back, even over fresh paths) counts, as 0, only when the seed
    answered no challenge of the epoch: relays dropping requests could cause it, but a seed that
    answers some challenges gains nothing by dropping others (it is scored on those it answers), and
    one that drops them all gets C = 0. A challenge the seed forwarded to another listed seed is an
    answer that counts for neither side here (a greedy one is in the signer's sample, `credited`)."""
    counted = [result for result in results if result.counted]
    scores = [result.score for result in counted if result.score is not None]
    if not counted:
        if any(result.forwarded for result in results):
            return None  # it answered, by forwarding: its silent challenges are the relays' as likely
        counted = [result for result in results if result.silent]
        return (0.0, counted) if counted else None
    failed = any(result.score is None for result in counted)
    return (0.0 if failed else min(max(epoch_credibility(scores), 0.0), 1.0)), counted


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


def first_epoch(now: float, epoch_s: float, send_within: float) -> int:
    """The epoch a verifier starting at `now` runs first: the current one when at least half of its send
    window (the first `send_within` of it) is left, else the next (module docstring, "Timing")."""
    epoch = epoch_of(now, epoch_s)
    window_s = send_within * epoch_s
    left_s = epoch * epoch_s + window_s - now
    return epoch if left_s >= window_s / 2 else epoch + 1


def send_times(planned_s: list[float], epoch_start: float, epoch_s: float, send_within: float, now: float) -> list[float]:
    """Unix send times of challenges planned at `planned_s` seconds after the epoch's start (uniform over
    its send window): as planned when the window is all ahead, else scaled over what is left of it, so
    that none is already past and none go out in a burst. Never before `now`."""
    window_s = send_within * epoch_s
    begin = max(epoch_start, now)
    end = max(epoch_start + window_s, begin)
    scale = (end - begin) / window_s if window_s > 0 else 0.0
    return [begin + min(max(at, 0.0), window_s) * scale for at in planned_s]


def seed_failure(exc: GtorrentError) -> str | None:
    """Why a challenge counts as failed by the seed, or None when it does not count (module docstring):
    the seed refused the request as malformed, or some attempt ended in a SeedFailed after the seed was
    reached. Route failures, no relays or trackers, and a seed no path reached do not count."""
    if isinstance(exc, RequestRefused):
        return f"the seed refused a request the reference model serves ({exc.message})"
    if isinstance(exc, AttemptsFailed):
        for error in exc.errors:
            # "unknown_model": the seed no longer serves the model (it switched since the epoch's listing);
            # counting it would freeze a 0 on a model the seed has left (its R is its worst model's)
            if isinstance(error, SeedFailed) and error.reached and error.code != "unknown_model":
                return error.message
    return None


def _busy(exc: GtorrentError) -> bool:
    return isinstance(exc, AttemptsFailed) and any(
        isinstance(error, SeedFailed) and error.code == "busy" for error in exc.errors
    )


def _silent(exc: GtorrentError, *, busy: bool = False) -> bool:
    """The seed was reached but nothing it sealed shows it failed: nothing of its came back, or its
    answer stopped or every path broke mid-answer (`SeedFailed.stopped`), or (with `busy`) it said it was
    busy. It may have dropped the request, or relays on enough paths (on every path, for a stop
    mid-answer) may have dropped or broken it, or other askers may fill its queue (module docstring).
    Not when an attempt holds a failure only the seed can cause."""
    if not isinstance(exc, AttemptsFailed):
        return False
    seeds = [error for error in exc.errors if isinstance(error, SeedFailed) and error.reached]
    return bool(seeds) and all(
        error.stopped or not error.answered or (busy and error.code == "busy") for error in seeds
    )


def _digest(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


def evidence_document(seed: PeerRecord, model_id: str, epoch: int, results: list[ChallengeResult]) -> dict[str, Any]:
    """The evidence of one seed and epoch over its counted challenges (`tally`): each answered
    challenge's signed transcript and its score, and each challenge the seed failed without a
    transcript, with its request's settings and the reason."""
    challenges: list[dict[str, Any]] = []
    for result in results:
        if result.seed_failed and result.answer is None:  # only counted ones are passed (`tally`)
            challenge = result.challenge
            challenges.append({
                "unanswered": result.error or "failed",
                "note": NO_TRANSCRIPT,
                "prompt": challenge.prompt,
                "max_tokens": challenge.max_tokens,
                "temperature": challenge.sampling.temperature,
                "top_k": challenge.sampling.top_k,
                "top_p": challenge.sampling.top_p,
                "calibrated": 0.0,
            })
            continue
        if result.answer is None:
            continue
        answer = result.answer
        entry: dict[str, Any] = {
            "request": b64(answer.request_bytes),
            "text": answer.text,
            "token_ids": list(answer.token_ids),
            "finish_reason": answer.finish_reason,
            "signature": b64(answer.signature),
            "signer": answer.signer,  # the seed whose key signed: this document's seed (`credited`)
        }
        if result.sent_to is not None:
            entry["sent_to"] = result.sent_to  # a forwarded challenge: the seed it was sent to, which relayed it
        if result.score is None:  # signed, but no honest seed gives it (`recheck` finds the same)
            entry |= {"unscorable": result.error or "unscorable", "calibrated": 0.0, "paper": 0.0}
        else:
            entry |= {"calibrated": float(result.score.calibrated), "paper": float(result.score.paper)}
        challenges.append(entry)
    return {"version": EVIDENCE_VERSION, "seed": seed.peer_id, "signing_key": b64(seed.signing_key),
            "model_id": model_id, "epoch": epoch, "challenges": challenges}


def write_evidence(home: Path, verdict: Verdict, evidence: dict[str, Any]) -> Path:
    """Write {verdict, evidence} as JSON, 0600, never over an existing file."""
    folder = home / EVIDENCE_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # one verdict per (verifier, seed, model, epoch): a verifier of two models (two processes, one home)
    # judges a seed serving both twice an epoch, and the second file must not collide with the first
    path = folder / f"{verdict.epoch}-{verdict.seed[:16]}-{verdict.model_id[:12]}-{verdict.verifier[:8]}.json"
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
    messages = request.get("messages")  # a conversation in place of the prompt, as the seed renders it
    if messages is not None:
        prompt_ids = model.encode_messages(messages)
    else:
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
        self.in_flight = asyncio.Semaphore(self.settings.max_in_flight)
        self.listings: dict[int, dict[str, PeerRecord]] = {}  # epoch -> its listing of the model's seeds

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
        """One private ask aimed at `seed`, scored; failures come back as a result with `error`, counted
        (`seed_failed`) when the seed was reached and failed it (module docstring). A "busy" refusal is
        sent again up to BUSY_RETRIES times, after random delays: an honest seed may be busy for a
        moment; busy every time, it counts as silence (`tally`), as anyone can fill a seed's queue."""
        sampling = challenge.sampling
        request = AskRequest(challenge.prompt, model=self.model.model_id, max_tokens=challenge.max_tokens,
                             temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        busy = silent = 0
        # a forwarded answer is accepted when its signer is a seed of the model in this epoch's listing
        # (`run_epoch`), whatever its standing: the verifier judges every seed (module docstring, failed
        # challenges); with no listing for the epoch, only the seed's own signature is
        signers = Signers(self.listings.get(epoch, {}))
        while True:
            try:
                answer = await ask_private(
                    self.ctx, self.trackers, request, self.store, timeouts=self.settings.timeouts,
                    paths=self.settings.paths, hops=self.settings.hops, allow_one_hop=self.settings.allow_one_hop,
                    use_guards=self.settings.use_guards, only_seed=seed, max_attempts=2, signers=signers,
                )
            except zmq.ZMQError as exc:  # this host out of sockets or the like: the seed did nothing
                return ChallengeResult(seed.peer_id, epoch, challenge, None, None, f"not sent: {exc}")
            except GtorrentError as exc:
                if _busy(exc) and busy < BUSY_RETRIES:
                    busy += 1
                    await asyncio.sleep(self.rng.uniform(0.0, BUSY_RETRY_FRACTION * self.settings.epoch_s))
                    continue
                if _silent(exc) and silent < SILENT_RETRIES:
                    silent += 1  # fresh paths (no guards): relays that dropped it are unlikely to again
                    continue
                reason = seed_failure(exc)
                if reason is not None and silent:
                    reason += f" (sent {silent + 1} times, over fresh paths each time)"
                elif reason is not None and busy:
                    reason += f" (sent {busy + 1} times)"
                return ChallengeResult(seed.peer_id, epoch, challenge, None, None, reason or exc.message,
                                       seed_failed=reason is not None,
                                       silent=reason is not None and _silent(exc, busy=True))
            break
        signer = answer.signer if answer.forwarded else None
        try:
            body = json.loads(answer.request_bytes)
            score = await asyncio.to_thread(
                score_transcript, self.model, body, answer.text, answer.token_ids, answer.finish_reason
            )
        except (GtorrentError, ValueError, KeyError, TypeError) as exc:
            # ids outside the vocabulary and the like: the seed signed an answer no honest seed gives, and
            # counting it as nothing would let a cheater escape a challenge it recognised: it scores 0
            message = exc.message if isinstance(exc, GtorrentError) else str(exc)
            return ChallengeResult(seed.peer_id, epoch, challenge, answer, None, f"unscorable answer: {message}",
                                   seed_failed=True, signer=signer)
        return ChallengeResult(seed.peer_id, epoch, challenge, answer, score, signer=signer)

    async def verify_seed(self, seed: PeerRecord, epoch: int, epoch_start: float) -> VerdictResult | None:
        """Challenge one seed over one epoch; sign, keep and submit its verdict (None: nothing counted).
        Called alone, outside `run_epoch`, it has no listing of the epoch: an answer signed by another
        seed is then the seed's failure (`challenge`), as an unlisted signer's always is."""
        return await self.conclude(seed, epoch, epoch_start, await self.challenge_seed(seed, epoch, epoch_start))

    async def challenge_seed(self, seed: PeerRecord, epoch: int, epoch_start: float) -> list[ChallengeResult]:
        """Send one seed its challenges of one epoch, at their planned times; their results."""
        count = challenge_count(self.store.standing(seed.peer_id).state, self.settings.challenges,
                                self.rng.random(), probation=self.settings.probation)
        if count == 0:
            return []  # an untrusted seed's epoch off (challenges.challenge_count)
        plans = await asyncio.to_thread(self.plan, count)
        # planned over the epoch's send window; spread over what is left of it once planned (no burst)
        times = send_times([c.send_at_s for c in plans], epoch_start, self.settings.epoch_s,
                           self.settings.send_within, self.clock())

        async def timed(challenge: Challenge, send_at: float) -> ChallengeResult:
            delay = send_at - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self.in_flight:  # each ask holds a dozen sockets or more: bound them all
                result = await self.challenge(seed, epoch, challenge)
            self.events.challenge(result)
            return result

        return list(await asyncio.gather(*(timed(c, at) for c, at in zip(plans, times, strict=True))))

    async def conclude(self, seed: PeerRecord, epoch: int, epoch_start: float,
                       results: list[ChallengeResult]) -> VerdictResult | None:
        """Sign, keep and submit `seed`'s verdict over its epoch sample `results` (None: nothing counted)."""
        tallied = tally(results)
        if tallied is None:
            return None
        credibility, counted = tallied
        scores = [result.score for result in counted if result.score is not None]
        evidence = evidence_document(seed, self.model.model_id, epoch, counted)
        verdict = Verdict.sign(self.identity, seed=seed.peer_id, model_id=self.model.model_id, epoch=epoch,
                               credibility=credibility, challenges=len(counted), evidence=_digest(evidence),
                               epoch_start_ms=round(epoch_start * 1000),
                               epoch_ms=max(1, round(self.settings.epoch_s * 1000)))
        low = credibility < self.settings.evidence_below or any(s.calibrated < self.settings.evidence_below for s in scores)
        path = write_evidence(self.home, verdict, evidence) if low else None
        # keep our own word whatever the trackers admit (asker.ingest_verdicts may have narrowed the store's
        # trust to verifiers that exclude us): the restart check (`run_epoch`) reads it back, and without
        # it a restart would sign a second, different verdict for this epoch, an equivocation
        if self.store.trusted_verifiers is not None:
            self.store.trusted_verifiers.add(self.identity.peer_id)
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
        # the epoch's listing: the seeds whose signatures a forwarded answer may carry (Signers). Never
        # extended by a lookup about a signer (a tracker would learn which seed served the challenge)
        listing = {record.peer_id: record for record in seeds}
        # a verifier restarted within an epoch it already judged keeps its word: a second, different
        # verdict for one (seed, model, epoch) is an equivocation that trackers and clients punish
        seeds = [record for record in seeds if not any(
            verdict.verifier == self.identity.peer_id
            for verdict in self.store.verdicts(record.peer_id, epoch, model_id=self.model.model_id))]
        self.events.epoch(epoch, seeds)
        start = epoch * self.settings.epoch_s
        self.listings[epoch] = listing
        refresher = asyncio.create_task(self._refresh_listing(listing))
        try:
            sent = await asyncio.gather(*(self.challenge_seed(seed, epoch, start) for seed in seeds))
        finally:
            refresher.cancel()
            self.listings.pop(epoch, None)
        # every result goes to the sample of the seed that generated its answer: a forwarded challenge is
        # its signer's (a listed seed of the model: check_answer refused any other), not its entry's
        # (one judged before a restart gets no second verdict: its share is dropped)
        samples: dict[str, list[ChallengeResult]] = {seed.peer_id: [] for seed in seeds}
        for results in sent:
            for result in results:
                samples[result.seed].append(result)  # a forwarded one counts for nobody there (`tally`)
                credited = result.credited()
                if credited is not result and credited.seed in samples:
                    samples[credited.seed].append(credited)
        done = await asyncio.gather(*(self.conclude(listing[peer_id], epoch, start, results)
                                      for peer_id, results in samples.items()))
        return [result for result in done if result is not None]

    async def _refresh_listing(self, listing: dict[str, PeerRecord]) -> None:
        """Re-read the whole listing of the model every LISTING_REFRESH_S while the epoch's challenges run,
        adding the seeds that joined (or came back) since: a forwarded answer's signer is judged against
        it, and a member that rejoined mid-epoch must not make the honest entry that forwarded to it fail.
        The same query as the epoch's first (never one about a signer); records only ever added or
        replaced by newer ones of the same seed, so a seed listed once in the epoch stays a valid signer."""
        interval = max(LISTING_REFRESH_MIN_S, min(LISTING_REFRESH_MAX_S, self.settings.epoch_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                found = await discover(self.ctx, self.trackers, model=self.model.model_id, role="seed")
            except GtorrentError as exc:
                log.debug("listing refresh failed: %s", exc.message)
                continue
            for record in found.records.values():
                held = listing.get(record.peer_id)
                if record.stopped or not any(info.model_id == self.model.model_id for info in record.models):
                    continue
                if held is None or record.seq > held.seq:
                    listing[record.peer_id] = record

    async def run(self, stop: asyncio.Event, max_epochs: int | None = None) -> None:
        """Announce, then start an epoch's challenges at every epoch boundary (the current epoch first
        when enough of it is left, `first_epoch`) until `stop` is set or `max_epochs` have started; wait
        for the epochs under way to finish."""
        await self.announcer.announce()
        announcing = asyncio.create_task(self.announcer.loop())
        started = 0
        epoch = first_epoch(self.clock(), self.settings.epoch_s, self.settings.send_within)
        try:
            while not stop.is_set() and (max_epochs is None or started < max_epochs):
                wait_s = epoch * self.settings.epoch_s - self.clock()
                if wait_s > 0:  # the first epoch may be the next one (no burst at start-up)
                    try:
                        await asyncio.wait_for(stop.wait(), wait_s)
                    except TimeoutError:
                        pass
                    if stop.is_set():
                        break
                task = asyncio.create_task(self._epoch_task(epoch))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                started += 1
                # the next epoch, or the current one's successor if this loop fell behind
                epoch = max(epoch + 1, epoch_of(self.clock(), self.settings.epoch_s))
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
    unanswered: int = 0  # challenges the verifier says the seed failed: counted 0 on its word (no transcript)


def recheck(path: Path, model: LanguageModel) -> Recheck:
    """Re-score an evidence file with `model`: the verdict's signature, the evidence digest, every
    transcript's signature under the seed's key, decode(ids) == text, then C from the signed requests'
    own sampling parameters. Agrees when all of that checks and C is within RECHECK_TOLERANCE.

    A challenge the seed failed (an "unanswered" entry) has no transcript to check: it counts as 0, as
    it did for the verifier, and `unanswered` says how much of C rests on the verifier's word. A signed
    answer that cannot be scored here either (token ids outside the vocabulary, say) counts as 0."""
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
    unanswered = unscorable = 0
    try:
        seed_key = unb64(str(evidence["signing_key"]))
        if peer_id_for(seed_key) != verdict.seed or evidence["seed"] != verdict.seed:
            problems.append("the evidence names another seed than the verdict")
        for number, item in enumerate(evidence["challenges"], 1):
            if "unanswered" in item:
                unanswered += 1
                continue
            if item.get("signer", verdict.seed) != verdict.seed:  # a forwarded answer is its signer's
                problems.append(f"challenge {number}: signed by another seed than the verdict's")
                continue
            request_bytes = unb64(str(item["request"]))
            ids = [int(token) for token in item["token_ids"]]
            signed = transcript(request_bytes, verdict.model_id, str(item["text"]), ids, str(item["finish_reason"]))
            if not verify_signature(seed_key, unb64(str(item["signature"])), signed):
                problems.append(f"challenge {number}: the seed's signature does not verify")
                continue
            request = json.loads(request_bytes)
            try:
                scores.append(score_transcript(model, request, str(item["text"]), ids, str(item["finish_reason"])))
            except (GtorrentError, ValueError, KeyError, TypeError):
                unscorable += 1  # a signed answer no honest seed gives: 0, as the verifier counted it
    except (ValueError, KeyError, TypeError) as exc:
        problems.append(f"malformed evidence ({exc})")
    except GtorrentError as exc:
        problems.append(exc.message)
    if problems or not (scores or unanswered or unscorable):
        if not problems:
            problems.append("the evidence holds no challenge")
        return Recheck(verdict, False, None, [s.calibrated for s in scores], problems, unanswered)
    credibility = 0.0 if unanswered or unscorable else epoch_credibility(scores)
    agrees = abs(credibility - verdict.credibility) <= RECHECK_TOLERANCE
    if not agrees:
        problems.append(f"C re-scored {credibility:.3f}, the verdict says {verdict.credibility:.3f}")
    return Recheck(verdict, agrees, credibility, [s.calibrated for s in scores], problems, unanswered)


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
    "first_epoch",
    "recheck",
    "score_transcript",
    "seed_failure",
    "send_times",
    "tally",
]
