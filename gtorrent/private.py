"""Private asks: the request reaches the seed split over onion-routed paths; the answer comes back
the same way.

One attempt: plan n disjoint paths of L relays (routing.py), build the n circuits at once, each ending
at the seed (circuit.py); split the request with S-IDA (n cloves, any k rebuild it) and send clove j
on path j (garlic.py); then read reply fragments from every path, rebuild each chunk from any k, and
stream its text. A path that breaks is tolerated while k paths live; below that the attempt fails and
the ask starts again on fresh paths (telling the caller first, so partial answers are never mixed).
The final chunk carries the seed's signature over the transcript, checked against its record.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

from .asker import (
    AskEvents,
    AskRequest,
    AskResult,
    AskTimeouts,
    SeedFailed,
    check_request,
    generate_body,
    rank_seeds,
    recording,
    resolve_model,
    trusted_seeds,
)
from .circuit import CircuitClient, CircuitError
from .discovery import discover
from .errors import GtorrentError, UsageError
from .garlic import ASK_ID_BYTES, REPLY_KEY_BYTES, GarlicError, ReplyAssembler, clove_payloads, transcript
from .identity import b64, short_id, unb64, verify_signature
from .onion import DATA, forward_capacity
from .protocol import PeerRecord
from .routing import PathPlan, PrivacyError, plan_paths
from .sida import split
from .store import Store
from .transport import Context

DEFAULT_PATHS = 4
DEFAULT_HOPS = 3
DEFAULT_K = 3
MAX_PATH_HOPS = 8  # the CLI's --hops limit


class PathsLost(GtorrentError):
    """Fewer than k paths could be built or stayed up; `broken` names their relays."""

    def __init__(self, message: str, broken: list[list[str]] | None = None) -> None:
        super().__init__(message)
        self.broken = broken or []


async def _build(
    ctx: Context, plan: PathPlan, seed: PeerRecord, timeout_s: float
) -> tuple[list[tuple[int, CircuitClient]], list[list[str]]]:
    """Build every path at once; return (built circuits, relay ids of the paths that failed)."""
    circuits = [CircuitClient(ctx, [*path, seed]) for path in plan.paths]
    results = await asyncio.gather(*(c.build(timeout_s) for c in circuits), return_exceptions=True)
    built, failed = [], []
    for index, (circuit, result) in enumerate(zip(circuits, results, strict=True)):
        if isinstance(result, BaseException):
            await circuit.close()
            if not isinstance(result, GtorrentError):
                raise result
            failed.append(circuit.route[:-1])
        else:
            built.append((index, circuit))
    return built, failed


async def _one_attempt(
    ctx: Context,
    seed: PeerRecord,
    model_id: str,
    request: AskRequest,
    plan: PathPlan,
    timeouts: AskTimeouts,
    on_text: Any,
    started: float,
) -> AskResult:
    setup_started = time.perf_counter()
    built, failed = await _build(ctx, plan, seed, timeouts.accept_s)
    path_setup_s = time.perf_counter() - setup_started
    try:
        if len(built) < plan.k:
            raise PathsLost(f"only {len(built)} of {len(plan.paths)} paths could be built (need {plan.k})", failed)
        reply_key, ask_id = os.urandom(REPLY_KEY_BYTES), os.urandom(ASK_ID_BYTES)
        body = generate_body(request, model_id, "private")
        del body["id"]
        request_bytes = json.dumps({**body, "reply_key": b64(reply_key)}, separators=(",", ":")).encode("utf-8")
        cloves = split(request_bytes, n=len(built), k=plan.k)
        for (_, circuit), clove in zip(built, cloves, strict=True):
            # cells are filled to the capacity of the longest allowed path, whatever this path's length,
            # so the seed cannot tell how many relays precede it
            for payload in clove_payloads(ask_id, clove.to_bytes(), forward_capacity(MAX_PATH_HOPS + 1)):
                await circuit.send(payload)
        return await _receive(built, plan, seed, model_id, request_bytes, reply_key, timeouts, on_text, started, path_setup_s)
    finally:
        await asyncio.gather(*(circuit.close() for _, circuit in built), return_exceptions=True)


async def _receive(
    built: list[tuple[int, CircuitClient]],
    plan: PathPlan,
    seed: PeerRecord,
    model_id: str,
    request_bytes: bytes,
    reply_key: bytes,
    timeouts: AskTimeouts,
    on_text: Any,
    started: float,
    path_setup_s: float,
) -> AskResult:
    queue: asyncio.Queue[tuple[int, bytes | None]] = asyncio.Queue()

    async def read(path: int, circuit: CircuitClient) -> None:
        terminal = len(circuit.onion.hops) - 1
        try:
            while True:
                origin, command, payload = await circuit.receive(3600.0)
                if origin != terminal or command != DATA:
                    break  # a relay sealing its own cells: drop this path, blame no seed
                queue.put_nowait((path, payload))
        except CircuitError:
            pass
        queue.put_nowait((path, None))

    readers = [asyncio.create_task(read(path, circuit)) for path, circuit in enumerate(c for _, c in built)]
    assembler = ReplyAssembler(reply_key)
    alive = len(built)
    broken: list[list[str]] = []
    pieces: list[str] = []
    ttft_s: float | None = None
    try:
        while True:
            wait_s = timeouts.first_token_s if ttft_s is None else timeouts.between_tokens_s
            try:
                path, payload = await asyncio.wait_for(queue.get(), wait_s)
            except TimeoutError:
                raise SeedFailed(f"no answer over the paths to seed {short_id(seed.peer_id)} in {wait_s:g} s", "timeout") from None
            if payload is None:
                alive -= 1
                broken.append(built[path][1].route[:-1])
                if alive < plan.k:
                    raise PathsLost(f"only {alive} paths left (need {plan.k})", broken)
                continue
            try:
                chunks = assembler.feed(payload, path)
            except GarlicError as exc:
                raise SeedFailed(f"bad reply from seed {short_id(seed.peer_id)}: {exc}") from exc
            for bad_path in assembler.take_suspects():
                broken.append(built[bad_path][1].route[:-1])  # its fragments did not fit the others'
                alive -= 1
                if alive < plan.k:
                    raise PathsLost(f"only {alive} consistent paths left (need {plan.k})", broken)
            for chunk in chunks:
                if "text" in chunk:
                    if ttft_s is None:
                        ttft_s = time.perf_counter() - started
                    pieces.append(str(chunk["text"]))
                    if on_text is not None:
                        on_text(str(chunk["text"]))
                elif "error" in chunk:
                    if chunk["error"] == "bad_request":
                        raise UsageError(f"the seed refused the request: {chunk.get('message', '')}")
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} failed: {chunk.get('message', chunk['error'])}")
                elif "done" in chunk:
                    text = "".join(pieces)
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
                        privacy={**plan.describe(), "paths": len(built)} | {"degraded": plan.degraded or len(built) < plan.wanted_paths},
                        path_setup_s=path_setup_s,
                        route=[c.route[:-1] for _, c in built],
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
    max_attempts: int = 3,
) -> AskResult:
    events = events or AskEvents()
    timeouts = timeouts or AskTimeouts()
    check_request(request)
    if not 1 <= k <= paths:
        raise UsageError(f"--paths must be at least {k} (the S-IDA threshold)", hint=f"use --paths {k} or more")
    started = time.perf_counter()
    seeds_found, relays_found = await asyncio.gather(
        discover(ctx, trackers, model=request.model, role="seed"), discover(ctx, trackers, role="relay")
    )
    if not seeds_found.records and request.model is not None:
        seeds_found = await discover(ctx, trackers, role="seed")  # only to say what the swarm serves
    store.saw_peers([*seeds_found.records.values(), *relays_found.records.values()])
    model_id, seeds = resolve_model(list(seeds_found.records.values()), request.model)
    usable = trusted_seeds(seeds, store, model_id)
    relays = [r for r in relays_found.records.values() if store.standing(r.peer_id).trusted]
    rng = random.Random()
    failures: list[dict[str, str]] = []
    suspects: set[str] = set()  # relays on paths that broke: left out of the next attempt
    ranked = rank_seeds(usable, store, time.time())
    attempt = 0
    for seed in (ranked * max_attempts)[:max_attempts]:
        attempt += 1
        plan = plan_paths(relays, exclude={seed.peer_id} | suspects, paths=paths, hops=hops, k=k, strict=strict, rng=rng)
        if events.on_attempt is not None:
            events.on_attempt(seed, attempt)
        on_text, streamed = recording(events)
        try:
            result = await _one_attempt(ctx, seed, model_id, request, plan, timeouts, on_text, time.perf_counter())
        except (SeedFailed, PathsLost, CircuitError) as exc:
            if isinstance(exc, PathsLost):
                suspects.update(peer for route in exc.broken for peer in route)
            outcome = getattr(exc, "outcome", "failed") if isinstance(exc, SeedFailed) else None
            if outcome is not None:
                store.observe(seed.peer_id, outcome, detail=exc.message)
            failures.append({"seed": seed.peer_id, "reason": exc.message})
            if events.on_restart is not None and attempt < max_attempts:
                events.on_restart(seed, exc.message, len(streamed))
            continue
        store.observe(seed.peer_id, "ok", ttft_s=result.ttft_s, tokens_per_s=result.tokens_per_s)
        result.ttft_s += time.perf_counter() - started - result.total_s
        result.total_s = time.perf_counter() - started
        result.attempts = attempt
        result.failures = failures
        return result
    reasons = "; ".join(f"{short_id(f['seed'])}: {f['reason']}" for f in failures)
    raise GtorrentError(f"the private ask failed after {len(failures)} attempt(s): {reasons}",
                        hint="try again, use --direct, or check relays and seeds with `gtorrent peers`")


__all__ = ["PrivacyError", "ask_private"]
