"""Asking the swarm: find seeds of a model through the trackers, pick one, stream its answer.

The choice weighs the local store's reputation of each seed against the load in its record; seeds
that failed recently are avoided (and forgiven after a success, see reputation.py). When a seed
fails, times out or dies mid-answer, the ask restarts on another seed, from the beginning: the caller
is told (`on_restart`) before any text of the new attempt, so two partial answers are never mixed
silently. Every outcome is written to the local store.

This issue's mode is direct (CurveZMQ straight to the seed, with a throwaway client key so the seed
cannot link a peer's asks by key). Private multipath asks build on the same result type.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .discovery import discover
from .errors import GtorrentError, UsageError
from .identity import short_id
from .protocol import PeerRecord, ProtocolError, decode, encode
from .reputation import choice_key
from .store import Store
from .transport import Connection, Context, PeerTimeout, TransportError

MAX_ATTEMPTS = 3


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


@dataclass(frozen=True)
class AskTimeouts:
    accept_s: float = 5.0  # the seed acknowledges a request
    first_token_s: float = 120.0  # includes waiting in the seed's queue
    between_tokens_s: float = 30.0


@dataclass
class AskResult:
    text: str
    tokens: int
    seed: str  # peer id of the seed that answered
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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0


@dataclass
class AskEvents:
    on_text: Callable[[str], None] | None = None
    on_attempt: Callable[[PeerRecord, int], None] | None = None
    on_restart: Callable[[PeerRecord, str, int], None] | None = None  # (failed seed, reason, tokens lost)


class NoSeedError(GtorrentError):
    default_hint = "serve one with `gtorrent seed MODEL`, or list what is served with `gtorrent peers`"


class SeedFailed(GtorrentError):
    def __init__(self, message: str, outcome: str = "failed") -> None:
        super().__init__(message)
        self.outcome = outcome


def generate_body(request: AskRequest, model_id: str, request_id: str) -> dict[str, object]:
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
    if request.seed is not None:
        body["seed"] = request.seed
    return body


def check_request(request: AskRequest) -> None:
    """Refuse locally what every seed would refuse, before blaming any seed for it."""
    try:
        decode(encode("generate", generate_body(request, "0" * 64, "0" * 16)))
    except ProtocolError as exc:
        raise UsageError(f"the request is not valid: {exc}", hint="shorten the prompt or lower --top-k / --max-tokens") from exc


def resolve_model(seeds: list[PeerRecord], wanted: str | None) -> tuple[str, list[PeerRecord]]:
    """The model id to ask for and the seeds serving it."""
    served = {m.model_id: m.name for record in seeds for m in record.models}
    if not served:
        raise NoSeedError("no seed is in the swarm")
    if wanted is None:
        if len(served) > 1:
            names = ", ".join(f"{name} ({mid[:12]})" for mid, name in sorted(served.items(), key=lambda x: x[1]))
            raise UsageError(f"the swarm serves several models: {names}", hint="choose one with --model NAME|ID")
        model_id = next(iter(served))
    else:
        matches = {mid for mid, name in served.items() if wanted in (mid, name) or (len(wanted) >= 8 and mid.startswith(wanted))}
        if not matches:
            names = ", ".join(sorted(set(served.values())))
            raise NoSeedError(f"no seed serves model {wanted!r} (the swarm serves: {names})")
        if len(matches) > 1:
            raise UsageError(f"{wanted!r} names several models", hint="use the model id (see `gtorrent peers`)")
        model_id = matches.pop()
    return model_id, [r for r in seeds if any(m.model_id == model_id for m in r.models)]


def trusted_seeds(seeds: list[PeerRecord], store: Store, model_id: str) -> list[PeerRecord]:
    """The seeds that may be asked: untrusted ones (reputation below 0.3) get no asks."""
    usable = [s for s in seeds if store.standing(s.peer_id).trusted]
    if not usable:
        raise NoSeedError(
            f"every seed of model {model_id[:12]} is untrusted ({len(seeds)} seen)",
            hint="wait for their reputation to recover, or check them with `gtorrent peers`",
        )
    return usable


def recording(events: AskEvents) -> tuple[Callable[[str], None], list[str]]:
    """An on_text callback for one attempt that forwards to the caller and keeps what it streamed."""
    streamed: list[str] = []

    def on_text(piece: str) -> None:
        streamed.append(piece)
        if events.on_text is not None:
            events.on_text(piece)

    return on_text, streamed


def rank_seeds(seeds: list[PeerRecord], store: Store, now: float) -> list[PeerRecord]:
    keyed = [(choice_key(store.standing(r.peer_id), r.load.get("queue", 0.0), now), secrets.randbits(16), r) for r in seeds]
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [r for _, _, r in keyed]


async def ask_seed(
    ctx: Context,
    seed: PeerRecord,
    model_id: str,
    request: AskRequest,
    timeouts: AskTimeouts,
    on_text: Callable[[str], None] | None,
    started: float,
) -> AskResult:
    """One attempt, straight to `seed` over CurveZMQ with a throwaway key."""
    request_id = secrets.token_hex(8)
    body = generate_body(request, model_id, request_id)
    pieces: list[str] = []
    ttft_s: float | None = None
    kinds = frozenset({"accepted", "token", "done", "error"})
    async with Connection(ctx, seed.endpoint, server_key=seed.curve_key, name=f"seed {short_id(seed.peer_id)}") as conn:
        first = await conn.request("generate", body, kinds, timeouts.accept_s)
        if first.kind == "error":
            if first.get("code") == "bad_request":
                raise UsageError(f"the seed refused the request: {first['message']}")
            raise SeedFailed(f"seed {short_id(seed.peer_id)} refused: {first['message']}")
        if first.kind != "accepted" or first["id"] != request_id:
            raise SeedFailed(f"seed {short_id(seed.peer_id)} answered out of order")
        while True:
            wait_s = timeouts.first_token_s if ttft_s is None else timeouts.between_tokens_s
            message = await conn.recv(wait_s, kinds)
            if message.get("id") != request_id:
                continue
            if message.kind == "token":
                if message["n"] != len(pieces):
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} skipped token {len(pieces)}")
                if ttft_s is None:
                    ttft_s = time.perf_counter() - started
                pieces.append(message["text"])
                if on_text is not None:
                    on_text(message["text"])
            elif message.kind == "done":
                if message["model_id"] != model_id:
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} answered with another model")
                total_s = time.perf_counter() - started
                return AskResult(
                    text="".join(pieces),
                    tokens=message["tokens"],
                    seed=seed.peer_id,
                    model_id=model_id,
                    finish_reason=message["finish_reason"],
                    ttft_s=ttft_s if ttft_s is not None else total_s,
                    total_s=total_s,
                    attempts=1,
                )
            elif message.kind == "error":
                if message.get("code") == "bad_request":  # the request is at fault, not the seed
                    raise UsageError(f"the seed refused the request: {message['message']}")
                raise SeedFailed(f"seed {short_id(seed.peer_id)} failed: {message['message']}")
            else:
                raise SeedFailed(f"seed {short_id(seed.peer_id)} sent {message.kind} mid-answer")


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
    timeouts = timeouts or AskTimeouts()
    check_request(request)
    started = time.perf_counter()
    found = await discover(ctx, trackers, model=request.model, role="seed")
    if not found.records and request.model is not None:
        found = await discover(ctx, trackers, role="seed")  # only to say what the swarm does serve
    store.saw_peers(found.records.values())
    model_id, seeds = resolve_model(list(found.records.values()), request.model)
    ranked = rank_seeds(trusted_seeds(seeds, store, model_id), store, time.time())[:max_attempts]
    failures: list[dict[str, str]] = []
    for attempt, seed in enumerate(ranked, 1):
        if events.on_attempt is not None:
            events.on_attempt(seed, attempt)
        on_text, streamed = recording(events)
        try:
            result = await ask_seed(ctx, seed, model_id, request, timeouts, on_text, time.perf_counter())
        except (TransportError, SeedFailed) as exc:
            outcome = "timeout" if isinstance(exc, PeerTimeout) else getattr(exc, "outcome", "failed")
            store.observe(seed.peer_id, outcome, detail=exc.message)
            failures.append({"seed": seed.peer_id, "reason": exc.message})
            if events.on_restart is not None and attempt < len(ranked):
                events.on_restart(seed, exc.message, len(streamed))
            continue
        store.observe(seed.peer_id, "ok", ttft_s=result.ttft_s, tokens_per_s=result.tokens_per_s)
        result.ttft_s = result.ttft_s + (time.perf_counter() - started - result.total_s)
        result.total_s = time.perf_counter() - started
        result.attempts = attempt
        result.failures = failures
        return result
    reasons = "; ".join(f"{short_id(f['seed'])}: {f['reason']}" for f in failures)
    raise GtorrentError(
        f"the ask failed on {len(failures)} seed(s): {reasons}",
        hint="try again, or check the seeds with `gtorrent peers`",
    )
