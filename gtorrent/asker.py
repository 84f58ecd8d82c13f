"""Asking the swarm: find seeds of a model through the trackers, pick one, stream its answer.

The choice goes by tiers of the local store's standing (reputation.choice_key: trusted seeds, then
unverified ones, then those backing off after recent failures, forgiven after a success; untrusted
seeds never), and within a tier weighs reliability against the load in each record. A model name is
resolved to the model id the most trusted seeds serve (`resolve_model`), so a record squatting on a
name cannot take its asks.

`run_attempts` is the one retry loop of every ask, direct or private: when a seed fails, times out or
dies mid-answer, the ask restarts from the beginning, on another seed when that seed was at fault; the
caller is told (`on_restart`) before any text of the new attempt, so two partial answers are never
mixed silently. Every seed's outcome is written to the local store; a seed that failed is not asked
again in the same ask. Answer text is bounded (`answer_budget`): more than --max-tokens can explain is
the seed's fault, and so are more token ids than --max-tokens.

Every answer, direct or private, is signed (`check_answer`): the seed's signature over the transcript
v2 (garlic.transcript) of the request bytes, the model id, the text and token ids as received, their
count and the finish reason must verify under the signing key of the seed's record, and the `done`
count must be the number of ids received; otherwise the seed is at fault (SeedFailed) and the ask is
retried elsewhere. An answer is never accepted without a valid signature; the result keeps what a
verifier needs to re-check it (`AskResult.request_bytes`, `.token_ids`, `.signature`, `.signing_key`).

Forwarded answers (issue 9): the seed asked (the entry) may pass the request to another seed of its
model group, whose signature the answer then carries, with `signer` naming it. That signature is
accepted only when the signer is in this ask's own listing of the model's seeds (`Signers`: the records
the ask already fetched; same peer id, that record's signing key, not stopped, announcing the model id)
and not untrusted in the local reputation view; anything else is the entry's failure, as if it had
signed badly itself. The asker never asks a tracker about a signer it does not know: that query would
tell the tracker which seed served this ask, linking a private ask's circuits to its target. Local
reliability outcomes stay with the entry (it chose the target and relayed the answer); the answer's
quality is the signer's (`AskResult.signer`, `.signing_key`: what verifier.py scores and credits).

An entry judges its group members by the trackers' listing as it last read it (every few seconds), an
asker by its own listing and reputation view at the ask: the two can differ (a verdict that landed
since, a verifier one trusts and the other does not). So a refused signer is not yet the entry's
failure: the entry is asked once more with forwarding declined (`"forward": false` in the request, which
seeds honour by serving it themselves), and only an answer that still names another signer is
(`SignerRefused`, `run_attempts`).

This module's own mode is direct (CurveZMQ straight to the seed, with a throwaway client key so the
seed cannot link a peer's asks by key); private.py supplies the private attempt.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .discovery import Discovery, discover
from .errors import GtorrentError, UsageError
from .garlic import direct_request_bytes, transcript
from .identity import short_id, unb64, verify_signature
from .protocol import MAX_PROMPT_CHARS, PeerRecord, ProtocolError, decode, encode
from .reputation import PeerStanding, choice_key
from .routing import candidate_records
from .store import Store
from .transport import Connection, Context, PeerTimeout, TransportError

MAX_ATTEMPTS = 3
CONTESTED_ATTEMPTS = 2  # per model id, when several ids claim the name asked for
MAX_CHARS_PER_TOKEN = 256  # answer characters one token may account for (real tokens: a few to a few dozen)
ANSWER_SLACK_CHARS = 4096
MAX_PROMPT_TOKENS_FIELD = 1 << 24  # the `cached` and `prompt_tokens` fields' range (protocol `done`)
# the error code of an entry whose group member failed after the first token (seed.FORWARD_FAILED): the
# answer stopped, which the entry could also have done by falling silent, so it is taken as that (a
# verifier counts it as silence): otherwise a target could frame every entry that forwards to it
FORWARD_FAILED = "forward_failed"


@dataclass(frozen=True)
class AskRequest:
    prompt: str
    model: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False
    # a conversation, (role, content) turns, in place of `prompt` (then empty) and rendered by the model's
    # chat template (`chat` true); empty: the prompt (protocol `generate.messages`)
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AskTimeouts:
    accept_s: float = 5.0  # the seed acknowledges a request
    first_token_s: float = 120.0  # includes waiting in the seed's queue
    between_tokens_s: float = 30.0


@dataclass
class AskResult:
    text: str
    tokens: int
    seed: str  # peer id of the seed that was asked and relayed the answer (the entry)
    model_id: str
    finish_reason: str
    ttft_s: float
    total_s: float
    attempts: int
    failures: list[dict[str, str]] = field(default_factory=list)
    mode: str = "direct"
    privacy: dict[str, object] | None = None  # private asks: {paths, hops, k, degraded}
    path_setup_s: float | None = None
    route: list[list[str]] = field(default_factory=list)  # private asks: relay peer ids per path
    # the signed transcript, for anyone to re-check (garlic.transcript over request_bytes, model_id, text,
    # token_ids, finish_reason; Ed25519 under signing_key, whose fingerprint is `signer`)
    token_ids: list[int] = field(default_factory=list)
    signature: bytes = field(default=b"", repr=False)
    request_bytes: bytes = field(default=b"", repr=False)
    signing_key: bytes = field(default=b"", repr=False)
    # peer id of the seed that generated and signed the answer: `seed` itself, or the listed seed it
    # forwarded the request to (module docstring); verification and reputation credit this one
    signer: str = ""
    cached: int | None = None  # prompt tokens the signer took from its prefix cache (None: not said)
    prompt_tokens: int | None = None  # the prompt's tokens (None: not said)

    def __post_init__(self) -> None:
        if not self.signer:
            self.signer = self.seed

    @property
    def entry(self) -> str:
        """The seed the asker chose and talked to (over its circuits, for a private ask)."""
        return self.seed

    @property
    def forwarded(self) -> bool:
        return self.signer != self.seed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class AskEvents:
    on_text: Callable[[str], None] | None = None
    on_attempt: Callable[[PeerRecord, int], None] | None = None
    on_restart: Callable[[PeerRecord, str, int], None] | None = None  # (failed seed, reason, pieces lost)
    on_model: Callable[[ModelChoice], None] | None = None  # the model id chosen, and rival claims
    # private asks, before any text of an attempt: (seed, {paths, hops, k, degraded}, relay ids per path)
    on_route: Callable[[PeerRecord, dict[str, object], list[list[str]]], None] | None = None


class NoSeedError(GtorrentError):
    default_hint = "serve one with `gtorrent seed MODEL`, or list what is served with `gtorrent peers`"


class UnknownModelError(NoSeedError):
    """The model asked for is a name or id no seed in the swarm announces (`resolve_model`)."""


class SeedFailed(GtorrentError):
    """The seed is at fault for an attempt. `reached`: False when no path or connection got to the
    seed at all (it may simply be down). `answered`: False when nothing of the seed's came back (a
    private ask's silence or breaks before any chunk: relays dropping the request on enough paths look
    the same), True when the seed sent something (an error, a bad chunk, a bad end of answer). `code`:
    the error code the seed itself sent, if it sent one (e.g. "busy"). `stopped`: the seed's answer
    stopped or every path to it broke, and nothing the seed sealed says it failed: relays on every path
    could cause the same (a destroy may come from any relay, and relays can stop forwarding at one cell
    count), so a verifier treats it as silence, never as the seed's proven failure (verifier.py)."""

    def __init__(self, message: str, outcome: str = "failed", *, reached: bool = True, answered: bool = True,
                 code: str | None = None, stopped: bool = False) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.reached = reached
        self.answered = answered
        self.code = code
        self.stopped = stopped


class SignerRefused(SeedFailed):
    """The entry relayed an answer whose signer this ask does not accept (`Signers.refusal`), in an
    attempt that allowed forwarding: the entry may have judged its group member by an older listing, so
    it is asked once more with forwarding declined before anything counts against it (`run_attempts`)."""


class RequestRefused(UsageError):
    """The seed refused the request as malformed (`bad_request`): the request, not the seed, is taken to
    be at fault (the ask stops). A verifier, whose requests fit the reference model, counts it as the
    seed's refusal (verifier.py)."""

    default_hint = "change what the seed's message names (a prompt over the model's context, in tokens: shorten it)"


class AttemptsFailed(GtorrentError):
    """Every attempt of an ask failed; `errors` are the attempts' own errors, in order (SeedFailed or
    RouteFailed), so a caller can tell the seed's faults from the route's."""

    def __init__(self, message: str, hint: str, errors: list[GtorrentError]) -> None:
        super().__init__(message, hint=hint)
        self.errors = errors


FINISH_REASONS = frozenset({"eos", "length", "context"})  # how a whole answer ends (runtime.model)
SAMPLING_SEED_LIMIT = 1 << 63  # the `seed` field's range


def generate_body(request: AskRequest, model_id: str, request_id: str, forward: bool = True) -> dict[str, object]:
    """The `generate` body of an ask. Every sampled ask carries a sampling seed (the user's, else a
    random one): a seed's sampled answer is then a function of the request, which a verifier can replay
    exactly (runtime/score.py), and challenges carry one like every user ask. `forward=False`: the seed
    is to serve the request itself, not pass it to its group (SignerRefused)."""
    body: dict[str, object] = {
        "id": request_id,
        "model": model_id,
        "prompt": request.prompt,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_k": request.top_k,
        "top_p": request.top_p,
        "chat": request.chat,
    }
    if request.messages:
        body["messages"] = [{"role": role, "content": content} for role, content in request.messages]
    if request.seed is not None:
        body["seed"] = request.seed
    elif request.temperature > 0:
        body["seed"] = secrets.randbelow(SAMPLING_SEED_LIMIT)
    if not forward:
        body["forward"] = False
    return body


def check_request(request: AskRequest) -> None:
    """Refuse locally what every seed would refuse, before blaming any seed for it."""
    texts = [("the prompt", request.prompt), ("the model", request.model or "")]
    texts += [(f"message {index}", content) for index, (_, content) in enumerate(request.messages)]
    for what, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # a lone surrogate (e.g. from undecodable bytes in argv) has no UTF-8 form: no seed can read it
            raise UsageError(
                f"{what} is not valid text: character {exc.start} is a lone surrogate "
                f"({text[exc.start]!a})",
                hint=f"remove that character from {what}, or pass the text as UTF-8",
            ) from None
    # the one bound a user meets: named in its own words
    for what, size in (("the prompt", len(request.prompt)),
                       ("the conversation", sum(len(content) for _, content in request.messages))):
        if size > MAX_PROMPT_CHARS:
            raise UsageError(
                f"the request is not valid: {what} is {size} characters; an ask carries at most {MAX_PROMPT_CHARS}",
                hint=f"shorten {what} (the model's context length, in tokens, bounds prompt + answer too)",
            )
    try:
        decode(encode("generate", generate_body(request, "0" * 64, "0" * 16)))
    except ProtocolError as exc:
        raise UsageError(f"the request is not valid: {exc}", hint="see `gtorrent ask --help` for each flag's range") from exc


def answer_budget(max_tokens: int) -> int:
    """The most answer text (characters, plus one per piece) a seed may send for `max_tokens` tokens.

    Generous (no tokenizer has tokens anywhere near this long); what it bounds is an asker's memory
    against a seed that streams without end.
    """
    return ANSWER_SLACK_CHARS + MAX_CHARS_PER_TOKEN * max_tokens


@dataclass(frozen=True)
class ModelChoice:
    """The model id an ask goes to, and the other ids that claimed the same name (or, without a name
    given, the other models the swarm serves)."""

    model_id: str
    name: str
    seeds: list[PeerRecord]  # the seeds that announce model_id
    rivals: list[tuple[str, str, int]] = field(default_factory=list)  # (model id, name, trusted seeds)
    wanted: str | None = None
    # the rival ids' seeds, best-supported first: where an ask goes when every seed of model_id failed
    alternatives: list[tuple[str, list[PeerRecord]]] = field(default_factory=list)
    # every seed record the ask's listing held, by peer id: the only signers a forwarded answer may
    # name (`Signers`), whatever their standing; never extended by a lookup about a signer
    listed: dict[str, PeerRecord] = field(default_factory=dict)


def _support(seeds: list[PeerRecord], standing: Callable[[str], PeerStanding]) -> tuple[int, float, int]:
    """How much trust backs a model id: (eligible machines that have answered this peer before, summed
    reputation of the verified trusted machines, the eligible machines' number).

    Proven machines come first: a record costs nothing to make, so fresh records (no history)
    outnumber real seeds whenever someone bothers; seeds this peer has seen answer do not. Then only
    verified trust counts: an unverified record adds nothing to the sum (its R is only the initial
    0.5), so a crowd of fresh identities cannot outweigh one seed a verifier has judged honest
    (reputation.py's tiers, for the choice of a model id). Counted per machine, not per record: records
    that share an endpoint or keys conflict (routing.candidate_records) and only the best-standing one
    counts, so copies of one machine under fresh peer ids add nothing."""
    standings = {r.peer_id: s for r in seeds if (s := standing(r.peer_id)).eligible}
    kept = candidate_records(
        [r for r in seeds if r.peer_id in standings], target=None, exclude=set(), rng=secrets.SystemRandom(),
        # of conflicting records the one with more answers seen counts, then the better reputation (< 1)
        seniority=lambda r: -(standings[r.peer_id].asks_ok + standings[r.peer_id].reputation / 2),
    )
    proven = sum(1 for r in kept if standings[r.peer_id].asks_ok > 0)
    verified = sum(standings[r.peer_id].reputation for r in kept if standings[r.peer_id].state == "trusted")
    return (proven, verified, len(kept))


def resolve_model(seeds: list[PeerRecord], wanted: str | None, standing: Callable[[str], PeerStanding]) -> ModelChoice:
    """The model id to ask for and the seeds serving it.

    Names and ids are claims a record makes, so anyone can announce a popular name with another id
    (squatting) or a lookalike id prefix. Among the ids that match, the one backed by the most trust
    wins (`_support`): first the seeds this peer has seen answer, then the summed reputation of the
    trusted seeds serving it, then their number. So one squatting record cannot make a name, or an ask
    without one, fail or go elsewhere, and many fresh ones cannot outvote seeds that answered before;
    the caller is told which id was chosen and which others claimed the name, and the rivals' seeds
    are kept as `alternatives` for when every seed of the chosen id fails.
    """
    by_id: dict[str, list[PeerRecord]] = {}
    names: dict[str, Counter[str]] = {}
    for record in seeds:
        for info in record.models:
            if record not in by_id.setdefault(info.model_id, []):
                by_id[info.model_id].append(record)
            names.setdefault(info.model_id, Counter())[info.name] += 1
    if not by_id:
        raise NoSeedError("no seed is in the swarm")
    if wanted is None:
        matches = set(by_id)
    else:
        matches = {mid for mid in by_id if mid == wanted or (len(wanted) >= 8 and mid.startswith(wanted))}
        if not matches:
            matches = {mid for mid in by_id if wanted in names[mid]}
        if not matches:
            served = ", ".join(sorted({name for counter in names.values() for name in counter}))
            raise UnknownModelError(f"no seed serves model {wanted!r} (the swarm serves: {served})")
    support = {mid: _support(by_id[mid], standing) for mid in matches}
    ranked = sorted(matches, key=lambda mid: (-support[mid][0], -support[mid][1], -support[mid][2], mid))
    chosen = ranked[0]

    def name_of(mid: str) -> str:
        if wanted is not None and wanted in names[mid]:
            return wanted
        return names[mid].most_common(1)[0][0]

    rivals = [(mid, name_of(mid), support[mid][2]) for mid in ranked[1:]]
    alternatives = [(mid, by_id[mid]) for mid in ranked[1:] if support[mid][2] > 0]
    listed = {record.peer_id: record for record in seeds}
    return ModelChoice(chosen, name_of(chosen), by_id[chosen], rivals, wanted, alternatives, listed)


def trusted_seeds(seeds: list[PeerRecord], store: Store, model_id: str) -> list[PeerRecord]:
    """The seeds that may be asked: untrusted ones (reputation below 0.3) get no asks."""
    usable = [s for s in seeds if store.standing(s.peer_id).eligible]
    if not usable:
        raise NoSeedError(
            f"every seed of model {model_id[:12]} is untrusted ({len(seeds)} seen)",
            hint="wait for their reputation to recover, or check them with `gtorrent peers`",
        )
    return usable


def rank_seeds(seeds: list[PeerRecord], store: Store, now: float) -> list[PeerRecord]:
    keyed = [(choice_key(store.standing(r.peer_id), r.load.get("queue", 0.0), now), secrets.randbits(16), r) for r in seeds]
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [r for _, _, r in keyed]


def ingest_verdicts(store: Store, found: Discovery) -> int:
    """Keep the verified verdicts the trackers served (store.add_verdicts) before seeds are ranked, and,
    where the user named no verifiers (the store trusts any), trust those more than half of the reached
    trackers admit (`Discovery.admitted`, discovery.admitted_by_majority; None: more than half admit any
    verifier), the set node.TrustSet shows (docs/PROTOCOL.md §12, "Whom a client trusts"): one lying
    tracker's own verifiers then neither count nor are stored. The store keeps only trusted verifiers'
    verdicts, and the proofs of equivocation go in first, so an equivocator's verdicts are dropped, never
    counted. Returns how many verdicts were new."""
    if store.trusted_verifiers is None and found.admitted is not None:
        store.trusted_verifiers = set(found.admitted)
    if found.equivocations:
        store.add_equivocations(found.equivocations)
    return store.add_verdicts(found.verdicts) if found.verdicts else 0


async def find_seeds(
    ctx: Context, trackers: list[str], request: AskRequest, store: Store, events: AskEvents
) -> tuple[ModelChoice, list[PeerRecord]]:
    """Ask the trackers for seeds of the requested model; return the model chosen and its seeds, best first."""
    found = await discover(ctx, trackers, model=request.model, role="seed", verdicts=True)
    if not found.records and request.model is not None:
        found = await discover(ctx, trackers, role="seed")  # only to say what the swarm does serve
    store.saw_peers(found.records.values())
    ingest_verdicts(store, found)
    choice = resolve_model(list(found.records.values()), request.model, store.standing)
    now = time.time()
    alternatives = [
        (mid, rank_seeds([s for s in seeds if store.standing(s.peer_id).eligible], store, now))
        for mid, seeds in choice.alternatives
    ]
    choice = replace(choice, alternatives=[(mid, seeds) for mid, seeds in alternatives if seeds])
    if events.on_model is not None:
        events.on_model(choice)
    return choice, rank_seeds(trusted_seeds(choice.seeds, store, choice.model_id), store, now)


def seed_lister(ctx: Context, trackers: list[str]) -> Refresh:
    """A `refresh` for `run_attempts`: the peer ids of the seeds of a model id listed now."""

    async def listed(model_id: str) -> set[str] | None:
        try:
            found = await discover(ctx, trackers, model=model_id, role="seed")
        except GtorrentError:
            return None  # no tracker answered: keep the seeds known so far
        return set(found.records)

    return listed


# ---------------------------------------------------------------------- the attempt loop


class RouteFailed(GtorrentError):
    """An attempt failed on the way to the seed, not at the seed (private asks: relays broke).

    Nothing is held against the seed, which may be asked again on a fresh route; `suspects` are the
    peers to leave out of that route."""

    def __init__(self, message: str, suspects: set[str] | None = None) -> None:
        super().__init__(message)
        self.suspects = suspects or set()


class AnswerSink:
    """One attempt's answer text and token ids: bounded, kept, and the text forwarded to the caller as
    it arrives."""

    def __init__(
        self,
        seed: PeerRecord,
        max_chars: int,
        on_text: Callable[[str], None] | None,
        max_ids: int | None = None,  # token ids the answer may have (--max-tokens)
    ) -> None:
        self.seed, self.max_chars, self.on_text, self.max_ids = seed, max_chars, on_text, max_ids
        self.pieces: list[str] = []
        self.token_ids: list[int] = []
        self.used = 0

    def add(self, piece: str, ids: list[int] | None = None) -> None:
        self.used += len(piece) + 1  # +1: a flood of empty pieces costs too
        if self.used > self.max_chars:
            raise SeedFailed(f"seed {short_id(self.seed.peer_id)} sent more answer than --max-tokens allows "
                             f"({self.max_chars} characters)")
        if ids:
            self.token_ids.extend(ids)
            if self.max_ids is not None and len(self.token_ids) > self.max_ids:
                raise SeedFailed(
                    f"seed {short_id(self.seed.peer_id)} sent more tokens than --max-tokens allows "
                    f"({self.max_ids})"
                )
        self.pieces.append(piece)
        if self.on_text is not None:
            self.on_text(piece)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class Signers:
    """Who besides the entry may have signed an answer: the seeds of this ask's own listing.

    `records`: the seed records the ask fetched before its first attempt (ModelChoice.listed), by peer
    id. `standing`: the local reputation view; a listed signer it calls untrusted is refused (None: any
    listed seed, as a verifier judges every seed of its model whatever its standing). Deliberately no
    way to look a signer up: a tracker asked about the signer of a private ask would learn which seed
    served it (module docstring)."""

    records: Mapping[str, PeerRecord] = field(default_factory=dict)
    standing: Callable[[str], PeerStanding] | None = None
    declined: bool = False  # the request declined forwarding: no other signer at all (`declining`)

    def declining(self) -> Signers:
        """These signers for an attempt whose request declined forwarding: none but the entry."""
        return replace(self, declined=True)

    def refusal(self, signer_id: str, model_id: str) -> str | None:
        """Why `signer_id` may not sign an answer of `model_id` relayed by another seed (None: it may)."""
        if self.declined:
            return "although the request declined forwarding"
        record = self.records.get(signer_id)
        if record is None or record.peer_id != signer_id:
            return "not a seed this ask listed"
        if record.stopped:
            return "a seed that has stopped"
        if not any(info.model_id == model_id for info in record.models):
            return "not a listed seed of this model"
        if self.standing is not None and not self.standing(signer_id).eligible:
            return "an untrusted seed"
        return None


class CheckedAnswer(NamedTuple):
    tokens: int
    finish_reason: str
    signature: bytes
    signer: PeerRecord  # whose key the signature verified under: the entry, or the seed it forwarded to
    cached: int | None  # the `done`'s own word (not signed): prompt tokens from the prefix cache
    prompt_tokens: int | None


def _token_count(done: dict[str, object], name: str) -> int | None:
    value = done.get(name)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_PROMPT_TOKENS_FIELD:
        raise ValueError(name)
    return value


def check_answer(
    seed: PeerRecord,
    request_bytes: bytes,
    model_id: str,
    sink: AnswerSink,
    done: dict[str, object],
    signature: object,
    signers: Signers | None = None,
) -> CheckedAnswer:
    """Check a finished answer as received (`sink`) against the seed's `done` and signature. Raises
    SeedFailed, naming `seed` (the entry, which relayed it), when that seed is at fault: another model
    id, a count other than the ids received, a missing, malformed or wrong signature (transcript v2:
    a v1 signature, or one over other text, ids, count or finish reason, does not verify).

    A `done` whose `signer` names another peer (a forwarded answer) must be signed under the key of
    that peer's record in `signers` (this ask's own listing), and `signers.refusal` must find nothing
    against it; otherwise the answer is refused (SignerRefused, which the entry answers once more with
    forwarding declined; with `signers.declined`, SeedFailed): it chose the target and relayed the
    signature, so an entry cannot pass its own bad answers off under a throwaway key, nor name a
    listed seed for an answer it signed itself (the signature would not verify under that seed's key)."""
    who = f"seed {short_id(seed.peer_id)}"
    tokens, finish_reason = done.get("tokens"), done.get("finish_reason")
    if type(tokens) is not int or not isinstance(finish_reason, str) or not isinstance(signature, str):
        raise SeedFailed(f"{who} sent a malformed or unsigned end of answer")
    signer_id = done.get("signer", seed.peer_id)
    try:
        cached, prompt_tokens = _token_count(done, "cached"), _token_count(done, "prompt_tokens")
    except ValueError as exc:
        raise SeedFailed(f"{who} sent a malformed end of answer ({exc})") from None
    if not isinstance(signer_id, str) or not 0 < len(signer_id) <= 64 or (
            cached is not None and prompt_tokens is not None and cached > prompt_tokens):
        raise SeedFailed(f"{who} sent a malformed end of answer")
    if done.get("model_id") != model_id:
        raise SeedFailed(f"{who} answered with another model")
    if tokens != len(sink.token_ids):
        raise SeedFailed(f"{who} claims {tokens} tokens but sent {len(sink.token_ids)} token ids")
    # an answer ends at end-of-sequence, at --max-tokens, or at the model's context: anything else (a
    # made-up reason, or "length" short of the limit) is an answer cut short and passed off as whole
    if finish_reason not in FINISH_REASONS:
        raise SeedFailed(f"{who} ended its answer for no reason a whole answer has ({finish_reason[:32]!r})")
    if finish_reason == "length" and sink.max_ids is not None and tokens != sink.max_ids:
        raise SeedFailed(f"{who} says it reached the length limit after {tokens} of {sink.max_ids} tokens")
    signer = seed
    if signer_id != seed.peer_id:
        # the signer is judged only against this ask's own listing: looking it up at a tracker would
        # tell the tracker which seed served the ask (for a private ask, its circuits' real target)
        signers = signers or Signers()
        refusal = signers.refusal(signer_id, model_id)
        if refusal is not None:
            refused = SeedFailed if signers.declined else SignerRefused
            raise refused(f"{who} relayed an answer signed by {short_id(signer_id)}, {refusal}")
        signer = signers.records[signer_id]
    try:
        signature_bytes = unb64(signature)
        signed = transcript(request_bytes, model_id, sink.text, sink.token_ids, finish_reason)
    except ValueError as exc:  # bad base64, or a field the transcript cannot hold
        raise SeedFailed(f"{who}'s answer cannot be checked ({exc})") from exc
    if not verify_signature(signer.signing_key, signature_bytes, signed):
        if signer is seed:
            raise SeedFailed(f"{who}'s transcript signature does not verify")
        raise SeedFailed(f"{who} relayed an answer whose signature does not verify under the key of "
                         f"seed {short_id(signer.peer_id)}, which it names as the signer")
    return CheckedAnswer(tokens, finish_reason, signature_bytes, signer, cached, prompt_tokens)


def signers_of(choice: ModelChoice, store: Store) -> Signers:
    """The signers an ask of `choice` accepts: its listing, under the store's reputation view."""
    return Signers(choice.listed, store.standing)


def answer_result(seed: PeerRecord, model_id: str, sink: AnswerSink, request_bytes: bytes, checked: CheckedAnswer,
                  ttft_s: float | None, total_s: float) -> AskResult:
    """The AskResult of an answer `check_answer` accepted (a direct one; private.py adds its fields)."""
    return AskResult(
        text=sink.text,
        tokens=checked.tokens,
        seed=seed.peer_id,
        model_id=model_id,
        finish_reason=checked.finish_reason,
        ttft_s=ttft_s if ttft_s is not None else total_s,
        total_s=total_s,
        attempts=1,
        token_ids=list(sink.token_ids),
        signature=checked.signature,
        request_bytes=request_bytes,
        signing_key=checked.signer.signing_key,
        signer=checked.signer.peer_id,
        cached=checked.cached,
        prompt_tokens=checked.prompt_tokens,
    )


# (seed, model id, sink, forward): forward False declines the seed's group forwarding (SignerRefused)
Attempt = Callable[[PeerRecord, str, AnswerSink, bool], Awaitable[AskResult]]
Refresh = Callable[[str], Awaitable["set[str] | None"]]  # model id -> peer ids of its seeds listed now


async def run_attempts(
    ranked: list[PeerRecord],
    attempt: Attempt,
    store: Store,
    events: AskEvents,
    *,
    request: AskRequest,
    started: float,
    model_id: str,
    alternatives: list[tuple[str, list[PeerRecord]]] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    refresh: Refresh | None = None,
    what: str = "ask",
) -> AskResult:
    """Try seeds in rank order until one answers; the one retry loop of direct and private asks.

    An attempt raises SeedFailed when the seed is at fault (written to the store; that seed is not
    asked again in this ask) or RouteFailed when the way to it is (the seed may be asked again). A
    SignerRefused, the first from a seed, is not yet its fault: the seed is asked again at once with
    forwarding declined, an attempt more than `max_attempts` (module docstring). Before
    a retry `refresh` lists the seeds of a model still announced, so a seed that said `stopped` is not
    retried. `on_restart` comes before anything of the next attempt.

    `alternatives` are other model ids that claimed the same name (resolve_model), best first. When
    there are some, the chosen id gets CONTESTED_ATTEMPTS attempts and then the next id gets as many:
    fresh records squatting on a name can win the choice, but not every attempt of the ask.
    """
    groups = [(model_id, ranked), *[(mid, seeds) for mid, seeds in alternatives or []]][:2]
    per_group = max_attempts if len(groups) == 1 else min(CONTESTED_ATTEMPTS, max_attempts)
    failed: set[str] = set()
    failures: list[dict[str, str]] = []
    errors: list[GtorrentError] = []
    declined: set[str] = set()  # seeds re-asked with forwarding declined after a refused signer
    number = 0
    restart: tuple[PeerRecord, str, int] | None = None  # said just before the next attempt, if any comes
    for group, (current_id, seeds) in enumerate(groups):
        listed = await refresh(current_id) if refresh is not None and group > 0 else None
        tries = 0
        while tries < per_group:
            remaining = [s for s in seeds if s.peer_id not in failed and (listed is None or s.peer_id in listed)]
            if not remaining:
                break
            seed = remaining[0]  # rank order; a seed not at fault (route failure) stays first, asked again
            forward = seed.peer_id not in declined
            number += 1
            if restart is not None and events.on_restart is not None:
                events.on_restart(*restart)
            if events.on_attempt is not None:
                events.on_attempt(seed, number)
            sink = AnswerSink(seed, answer_budget(request.max_tokens), events.on_text, request.max_tokens)
            try:
                result = await attempt(seed, current_id, sink, forward)
            except SeedFailed as exc:
                reason = exc.message
                if isinstance(exc, SignerRefused) and forward:
                    declined.add(seed.peer_id)  # asked again at once, serving itself: nothing against it yet
                    reason += "; asking it to serve the ask itself"
                else:
                    tries += 1
                    store.observe(seed.peer_id, exc.outcome, detail=exc.message)
                    failed.add(seed.peer_id)
                errors.append(exc)
            except RouteFailed as exc:
                tries += 1
                reason = exc.message
                errors.append(exc)
            else:
                store.observe(seed.peer_id, "ok", ttft_s=result.ttft_s, tokens_per_s=result.tokens_per_s)
                result.ttft_s += time.perf_counter() - started - result.total_s
                result.total_s = time.perf_counter() - started
                result.attempts = number
                result.failures = failures
                return result
            failures.append({"seed": seed.peer_id, "reason": reason, "model_id": current_id})
            restart = (seed, reason, len(sink.pieces))
            if refresh is not None:
                listed = await refresh(current_id)
    reasons = "; ".join(f"{short_id(f['seed'])}: {f['reason']}" for f in failures)
    raise AttemptsFailed(
        f"the {what} failed after {len(failures)} attempt(s): {reasons}",
        "try again, or check the seeds with `gtorrent peers`" if what == "ask"
        else "try again, use --direct, or check relays and seeds with `gtorrent peers`",
        errors,
    )


async def ask_seed(
    ctx: Context,
    seed: PeerRecord,
    model_id: str,
    request: AskRequest,
    timeouts: AskTimeouts,
    sink: AnswerSink,
    started: float,
    signers: Signers | None = None,
    forward: bool = True,
) -> AskResult:
    """One attempt, straight to `seed` over CurveZMQ with a throwaway key. Every failure is the seed's,
    a forwarded answer's included (`signers`: who besides `seed` may sign, check_answer; `forward`
    False: the request declines forwarding, and no other signer is accepted)."""
    request_id = secrets.token_hex(8)
    body = generate_body(request, model_id, request_id, forward)
    if not forward:
        signers = (signers or Signers()).declining()
    # the transcript's request bytes: what the seed will decode from the frames sent, canonically encoded
    request_bytes = direct_request_bytes(decode(encode("generate", body)).body)
    messages = 0
    ttft_s: float | None = None
    kinds = frozenset({"accepted", "token", "done", "error"})
    try:
        async with Connection(ctx, seed.endpoint, server_key=seed.curve_key, name=f"seed {short_id(seed.peer_id)}") as conn:
            first = await conn.request("generate", body, kinds, timeouts.accept_s)
            if first.kind == "error":
                if first.get("code") == "bad_request":
                    raise RequestRefused(f"the seed refused the request: {first['message']}")
                raise SeedFailed(f"seed {short_id(seed.peer_id)} refused: {first['message']}")
            if first.kind != "accepted" or first["id"] != request_id:
                raise SeedFailed(f"seed {short_id(seed.peer_id)} answered out of order")
            while True:
                wait_s = timeouts.first_token_s if ttft_s is None else timeouts.between_tokens_s
                message = await conn.recv(wait_s, kinds)
                if message.get("id") != request_id:
                    continue
                if message.kind == "token":
                    if message["n"] != messages:
                        raise SeedFailed(f"seed {short_id(seed.peer_id)} skipped token {messages}")
                    messages += 1
                    if ttft_s is None:
                        ttft_s = time.perf_counter() - started
                    sink.add(message["text"], message["ids"])
                elif message.kind == "done":
                    checked = check_answer(seed, request_bytes, model_id, sink, message.body, message.get("signature"),
                                           signers)
                    return answer_result(seed, model_id, sink, request_bytes, checked, ttft_s,
                                         time.perf_counter() - started)
                elif message.kind == "error":
                    if message.get("code") == "bad_request":  # the request is at fault, not the seed
                        raise RequestRefused(f"the seed refused the request: {message['message']}")
                    if message.get("code") == FORWARD_FAILED:  # its group member broke off: as if stopped
                        raise SeedFailed(f"seed {short_id(seed.peer_id)} failed: {message['message']}",
                                         code=FORWARD_FAILED, stopped=True)
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} failed: {message['message']}")
                else:
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} sent {message.kind} mid-answer")
    except TransportError as exc:
        raise SeedFailed(exc.message, "timeout" if isinstance(exc, PeerTimeout) else "failed") from exc


async def ask_direct(
    ctx: Context,
    trackers: list[str],
    request: AskRequest,
    store: Store,
    events: AskEvents | None = None,
    timeouts: AskTimeouts | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> AskResult:
    events = events or AskEvents()
    ask_timeouts = timeouts or AskTimeouts()
    check_request(request)
    started = time.perf_counter()
    choice, ranked = await find_seeds(ctx, trackers, request, store, events)
    signers = signers_of(choice, store)

    async def attempt(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        return await ask_seed(ctx, seed, model_id, request, ask_timeouts, sink, time.perf_counter(), signers, forward)

    return await run_attempts(
        ranked, attempt, store, events, request=request, started=started, model_id=choice.model_id,
        alternatives=choice.alternatives, max_attempts=max_attempts, refresh=seed_lister(ctx, trackers),
    )
