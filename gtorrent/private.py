"""Private asks: the request reaches the seed split over onion-routed paths; the answer comes back
the same way.

One attempt: plan n disjoint paths of L relays (routing.py), build the n circuits at once, each ending
at the seed (circuit.py), replacing paths that fail to build with fresh ones while relays remain;
tell the caller the route (`on_route`, before any text, so a degraded route is known up front); split
the request with S-IDA (n cloves, any k rebuild it) and send clove j on path j (garlic.py); then read
reply fragments from every path, rebuild each chunk from any k, and stream its text. A path that
breaks is tolerated while k paths live. The final chunk carries the seed's signature over the
transcript, checked against its record. Retries are asker.run_attempts' (the loop direct asks use).

Blame goes to the party that failed, so that a dead seed never burns healthy relays:

- a circuit that fails while extending to hop i blames hop i; when hop i is the seed, the seed is at
  fault if no path reached it at all (SeedFailed: written to the store, not asked again), else the
  relay before it did not extend (it becomes a suspect);
- paths that break mid-answer: if every path breaks, the seed (the one node they share) is at fault;
  if some live on, the broken ones' relays are (the first relay when the link to it broke, the relays
  after it when it reported the break);
- suspects are left out of the rest of this ask only (RouteFailed; the seed may be asked again).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
from dataclasses import dataclass, field

from .asker import (
    AnswerSink,
    AskEvents,
    AskRequest,
    AskResult,
    AskTimeouts,
    RouteFailed,
    SeedFailed,
    check_request,
    find_seeds,
    generate_body,
    run_attempts,
)
from .circuit import CircuitClient, CircuitError
from .discovery import discover
from .errors import GtorrentError, UsageError
from .garlic import ASK_ID_BYTES, REPLY_KEY_BYTES, GarlicError, ReplyAssembler, clove_payloads, transcript
from .identity import b64, short_id, unb64, verify_signature
from .onion import DATA, forward_capacity
from .protocol import PeerRecord
from .routing import DEFAULT_MIN_HOPS, ONE_HOP_HINT, PathPlan, PrivacyError, plan_paths
from .sida import split
from .store import Store
from .transport import Context, TransportError

DEFAULT_PATHS = 4
DEFAULT_HOPS = 3
DEFAULT_K = 3
MAX_PATH_HOPS = 8  # the CLI's --hops limit
BUILD_ROUNDS = 3  # a path that fails to build is replaced at most twice within one attempt
BREAK_SETTLE_S = 1.0  # after too many paths broke: how long to wait to see whether all of them do


@dataclass
class RouteState:
    """What one private ask knows about its relays: all of them, and the suspects to leave out."""

    relays: list[PeerRecord]
    paths: int
    hops: int
    k: int
    strict: bool
    min_hops: int
    rng: random.Random = field(default_factory=secrets.SystemRandom)  # path choice is security-relevant
    suspects: set[str] = field(default_factory=set)

    def plan(self, seed: PeerRecord) -> PathPlan:
        # a seed that failed in this ask is a suspect too: it may also be listed as a relay
        return plan_paths(self.relays, target=seed, exclude=self.suspects, paths=self.paths, hops=self.hops,
                          k=self.k, strict=self.strict, rng=self.rng, min_hops=self.min_hops)


def failed_hop(circuit: CircuitClient, exc: CircuitError) -> int | None:
    """Index in `circuit.route` of the peer that did not answer or failed its proof, when known."""
    return exc.hop if exc.hop is not None and 0 <= exc.hop < len(circuit.route) else None


async def _close_all(circuits: list[CircuitClient]) -> None:
    await asyncio.gather(*(circuit.close() for circuit in circuits), return_exceptions=True)


async def build_paths(
    ctx: Context, plan: PathPlan, seed: PeerRecord, state: RouteState, timeout_s: float
) -> list[CircuitClient]:
    """Build the plan's circuits at once; replace failed paths with fresh ones (up to BUILD_ROUNDS).

    Raises SeedFailed when no path reached the seed and the seed's hop failed; returns the circuits
    built otherwise (fewer than planned when relays ran out), adding each failing relay to the suspects.
    """
    routes = plan.paths
    built: list[CircuitClient] = []
    seed_misses: list[CircuitClient] = []  # circuits that reached the hop before the seed, not the seed
    for round_number in range(BUILD_ROUNDS):
        circuits = [CircuitClient(ctx, [*path, seed]) for path in routes]
        results = await asyncio.gather(*(c.build(timeout_s) for c in circuits), return_exceptions=True)
        unexpected: BaseException | None = None
        for circuit, result in zip(circuits, results, strict=True):
            if not isinstance(result, BaseException):
                built.append(circuit)
                continue
            await circuit.close()
            if not isinstance(result, GtorrentError):
                unexpected = result
                continue
            hop = failed_hop(circuit, result) if isinstance(result, CircuitError) else None
            if hop == len(circuit.route) - 1:
                seed_misses.append(circuit)
            elif hop is not None:
                state.suspects.add(circuit.route[hop])
            else:  # no hop named: any relay of this path may be at fault, the seed is not known to be
                state.suspects.update(circuit.route[:-1])
        if unexpected is not None:
            await _close_all(built)
            raise unexpected
        if not built and seed_misses:
            raise SeedFailed(
                f"seed {short_id(seed.peer_id)} did not answer on any path ({len(seed_misses)} got as far as it)",
                "timeout",
            )
        # the seed answered on other paths: the relay before it did not extend (or lied about it)
        state.suspects.update(circuit.route[-2] for circuit in seed_misses if len(circuit.route) >= 2)
        seed_misses = []
        missing = len(plan.paths) - len(built)
        if missing == 0 or round_number == BUILD_ROUNDS - 1:
            break
        in_use = {peer for circuit in built for peer in circuit.route[:-1]}
        try:
            routes = plan_paths(state.relays, target=seed, exclude=state.suspects | in_use, paths=missing,
                                hops=plan.hops, k=1, strict=True, rng=state.rng, min_hops=plan.hops).paths
        except PrivacyError:
            break  # no fresh relays left: go on with the paths built, if they are enough
    return built


async def _one_attempt(
    ctx: Context,
    seed: PeerRecord,
    model_id: str,
    request: AskRequest,
    state: RouteState,
    timeouts: AskTimeouts,
    events: AskEvents,
    sink: AnswerSink,
) -> AskResult:
    started = time.perf_counter()
    plan = state.plan(seed)
    built = await build_paths(ctx, plan, seed, state, timeouts.accept_s)
    path_setup_s = time.perf_counter() - started
    try:
        if len(built) < plan.k:
            raise RouteFailed(f"only {len(built)} of {len(plan.paths)} paths could be built (need {plan.k})",
                              set(state.suspects))
        used = PathPlan([circuit.hops[:-1] for circuit in built], plan.k, plan.wanted_paths, plan.wanted_hops)
        if events.on_route is not None:  # before the request goes out, so before any answer text
            events.on_route(seed, used.describe(), [circuit.route[:-1] for circuit in built])
        reply_key, ask_id = os.urandom(REPLY_KEY_BYTES), os.urandom(ASK_ID_BYTES)
        body = generate_body(request, model_id, "private")
        del body["id"]
        request_bytes = json.dumps({**body, "reply_key": b64(reply_key)}, separators=(",", ":")).encode("utf-8")
        cloves = split(request_bytes, n=len(built), k=plan.k)
        for circuit, clove in zip(built, cloves, strict=True):
            # cells are filled to the capacity of the longest allowed path, whatever this path's length,
            # so the seed cannot tell how many relays precede it
            for payload in clove_payloads(ask_id, clove.to_bytes(), forward_capacity(MAX_PATH_HOPS + 1)):
                await circuit.send(payload)
        return await _receive(built, used, seed, model_id, request_bytes, reply_key, timeouts, sink, started, path_setup_s)
    finally:
        await _close_all(built)


def _broken_suspects(circuit: CircuitClient, exc: CircuitError | None) -> set[str]:
    """The relays to blame for a path that broke mid-answer (see the module docstring)."""
    relays = circuit.route[:-1]
    if exc is None:
        return set(relays)  # it carried cells no hop should send: any of its relays
    hop = failed_hop(circuit, exc)
    if hop is not None and hop < len(relays):
        return {relays[hop]}
    if isinstance(exc.__cause__, TransportError) or len(relays) == 1:
        return {relays[0]}  # our own link to the first relay broke
    return set(relays[1:])  # the first relay reported a break further on


async def _receive(
    built: list[CircuitClient],
    plan: PathPlan,
    seed: PeerRecord,
    model_id: str,
    request_bytes: bytes,
    reply_key: bytes,
    timeouts: AskTimeouts,
    sink: AnswerSink,
    started: float,
    path_setup_s: float,
) -> AskResult:
    queue: asyncio.Queue[tuple[int, bytes | None, CircuitError | None]] = asyncio.Queue()

    async def read(path: int, circuit: CircuitClient) -> None:
        terminal = len(circuit.onion.hops) - 1
        error: CircuitError | None = None
        try:
            while True:
                origin, command, payload = await circuit.receive(3600.0)
                if origin != terminal or command != DATA:
                    break  # a relay sealing its own cells: drop this path, blame no seed
                queue.put_nowait((path, payload, None))
        except CircuitError as exc:
            error = exc
        queue.put_nowait((path, None, error))

    readers = [asyncio.create_task(read(path, circuit)) for path, circuit in enumerate(built)]
    assembler = ReplyAssembler(reply_key)
    dead: set[int] = set()
    suspects: set[str] = set()
    ttft_s: float | None = None

    async def paths_lost(reason: str) -> RouteFailed | SeedFailed:
        # Paths are node-disjoint: if every one of them breaks, the seed is the failure they share. The
        # others' breaks may trail by a moment (and cells the seed sent before dying may come first).
        deadline = time.monotonic() + BREAK_SETTLE_S
        while len(dead) < len(built) and (remaining := deadline - time.monotonic()) > 0:
            try:
                path, payload, error = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                break
            if payload is None and path not in dead:
                dead.add(path)
                suspects.update(_broken_suspects(built[path], error))
        if len(dead) == len(built):
            return SeedFailed(f"every path to seed {short_id(seed.peer_id)} broke ({reason})")
        return RouteFailed(reason, set(suspects))

    try:
        while True:
            wait_s = timeouts.first_token_s if ttft_s is None else timeouts.between_tokens_s
            try:
                path, payload, error = await asyncio.wait_for(queue.get(), wait_s)
            except TimeoutError:
                raise SeedFailed(f"no answer over the paths to seed {short_id(seed.peer_id)} in {wait_s:g} s", "timeout") from None
            if payload is None:
                if path not in dead:
                    dead.add(path)
                    suspects.update(_broken_suspects(built[path], error))
                if len(built) - len(dead) < plan.k:
                    raise await paths_lost(f"only {len(built) - len(dead)} paths left (need {plan.k})")
                continue
            try:
                chunks = assembler.feed(payload, path)
            except GarlicError as exc:
                raise SeedFailed(f"bad reply from seed {short_id(seed.peer_id)}: {exc}") from exc
            for bad_path in assembler.take_suspects():
                if bad_path not in dead:  # its fragments did not fit the others': one of its relays lied
                    dead.add(bad_path)
                    suspects.update(built[bad_path].route[:-1])
                if len(built) - len(dead) < plan.k:
                    raise RouteFailed(f"only {len(built) - len(dead)} consistent paths left (need {plan.k})", set(suspects))
            for chunk in chunks:
                if "text" in chunk:
                    if ttft_s is None:
                        ttft_s = time.perf_counter() - started
                    sink.add(str(chunk["text"]))
                elif "error" in chunk:
                    if chunk["error"] == "bad_request":
                        raise UsageError(f"the seed refused the request: {chunk.get('message', '')}")
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} failed: {chunk.get('message', chunk['error'])}")
                elif "done" in chunk:
                    text = sink.text
                    try:
                        info = dict(chunk["done"])
                        signature = unb64(str(chunk.get("signature", "")))
                        tokens = int(info["tokens"])
                        finish_reason = str(info["finish_reason"])
                    except (KeyError, TypeError, ValueError) as exc:
                        raise SeedFailed(f"seed {short_id(seed.peer_id)} sent a malformed final chunk") from exc
                    if info.get("model_id") != model_id or not verify_signature(
                        seed.signing_key, signature, transcript(request_bytes, model_id, text)
                    ):
                        raise SeedFailed(f"seed {short_id(seed.peer_id)}'s transcript signature does not verify")
                    total_s = time.perf_counter() - started
                    return AskResult(
                        text=text,
                        tokens=tokens,
                        seed=seed.peer_id,
                        model_id=model_id,
                        finish_reason=finish_reason,
                        ttft_s=ttft_s if ttft_s is not None else total_s,
                        total_s=total_s,
                        attempts=1,
                        mode="private",
                        privacy=plan.describe(),
                        path_setup_s=path_setup_s,
                        route=[circuit.route[:-1] for circuit in built],
                    )
    finally:
        for reader in readers:
            reader.cancel()


async def ask_private(
    ctx: Context,
    trackers: list[str],
    request: AskRequest,
    store: Store,
    events: AskEvents | None = None,
    timeouts: AskTimeouts | None = None,
    *,
    paths: int = DEFAULT_PATHS,
    hops: int = DEFAULT_HOPS,
    k: int = DEFAULT_K,
    strict: bool = False,
    allow_one_hop: bool = False,
    max_attempts: int = 3,
) -> AskResult:
    events = events or AskEvents()
    ask_timeouts = timeouts or AskTimeouts()
    check_request(request)
    if not 1 <= k <= paths:
        raise UsageError(f"--paths must be at least {k} (the S-IDA threshold)", hint=f"use --paths {k} or more")
    min_hops = 1 if allow_one_hop else DEFAULT_MIN_HOPS
    if hops < min_hops:
        raise UsageError(f"--hops {hops}: with one relay per path, that relay sees both you and the seed",
                         hint=f"use --hops {DEFAULT_MIN_HOPS} or more, or {ONE_HOP_HINT}")
    started = time.perf_counter()
    (choice, ranked), relays_found = await asyncio.gather(
        find_seeds(ctx, trackers, request, store, events), discover(ctx, trackers, role="relay")
    )
    store.saw_peers(relays_found.records.values())
    relays = [r for r in relays_found.records.values() if store.standing(r.peer_id).trusted]
    state = RouteState(relays, paths, hops, k, strict, min_hops)

    async def attempt(seed: PeerRecord, sink: AnswerSink) -> AskResult:
        try:
            return await _one_attempt(ctx, seed, choice.model_id, request, state, ask_timeouts, events, sink)
        except SeedFailed:
            state.suspects.add(seed.peer_id)  # it may be listed as a relay too: not on later paths either
            raise
        except RouteFailed as exc:
            state.suspects |= exc.suspects
            raise
        except CircuitError as exc:  # a circuit failure outside building: a route failure
            raise RouteFailed(exc.message) from exc

    async def refresh() -> set[str] | None:
        """Seeds and relays still announced: a peer that said `stopped` is neither asked nor used."""
        try:
            seeds_now, relays_now = await asyncio.gather(
                discover(ctx, trackers, model=choice.model_id, role="seed"), discover(ctx, trackers, role="relay")
            )
        except GtorrentError:
            return None
        state.relays = [r for r in state.relays if r.peer_id in relays_now.records]
        return set(seeds_now.records)

    return await run_attempts(ranked, attempt, store, events, request=request, started=started,
                              max_attempts=max_attempts, refresh=refresh, what="private ask")


__all__ = ["PrivacyError", "RouteState", "ask_private", "build_paths"]
