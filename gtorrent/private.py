"""Private asks: the request reaches the seed split over onion-routed paths; the answer comes back
the same way.

One attempt: plan n disjoint paths of L relays (routing.py), build the n circuits at once, each ending
at the seed (circuit.py), replacing paths that fail to build with fresh ones while relays remain;
tell the caller the route (`on_route`, before any text, so a degraded route is known up front); split
the request with S-IDA (n cloves, any k rebuild it) and send clove j on path j (garlic.py); then read
reply fragments from every path, rebuild each chunk from any k, and stream its text. A path that
breaks is tolerated while k paths live. The final chunk carries the signature over the transcript
of the seed that generated the answer, checked against its record: the seed asked, or a seed of its
model group it forwarded the request to, accepted only from this ask's own listing (asker.Signers; no
tracker is ever asked about a signer, as that would link the ask to its target). Retries are
asker.run_attempts' (the loop direct asks use).

Blame goes to the party that failed, so that a dead seed never burns healthy relays, and to whoever
reported the failure along with the accused, so that a relay cannot frame honest ones and stay in use
(a `destroy` carries no proof of which relay started it):

- a circuit that fails while extending to hop i (a relay) makes suspects of hop i and of every relay
  before it that could have sent the destroy or swallowed the EXTEND: relays 0..i for a silence or a
  destroy, relays i-1 and i for a spoilt key proof (circuit.CircuitError.first), relay 0 alone when
  our link to it broke. When hop i is the seed, the seed is at fault if no path reached it at all
  (SeedFailed with `reached` False: written to the store, not asked again; no relay is blamed; a
  verifier does not count it against the seed, which may simply be down), else that path's relays
  are suspects by the same rule (the seed answered on other paths);
- paths that break mid-answer: if every path breaks, the seed (the one node they share) is at fault
  (SeedFailed with `stopped`: a verifier treats it as silence, as relays on every path could break
  them, verifier.py); if some live on, every relay of a broken path is a suspect (relay 0 alone when
  our link to it broke);
- an answer that stops (the first-token or between-token timer expires): when some paths delivered
  more of it than others, the seed answered and the relays of the paths left behind dropped cells
  (RouteFailed, they are suspects); when every live path is equally far along (nothing at all, or the
  seed stopped mid-answer on all of them) the seed is at fault (SeedFailed, "timeout", `stopped`;
  `answered` False when nothing of its came back at all; a verifier re-sends either on fresh paths
  before counting it, verifier.py). Residuals: relays
  on more than n-k paths dropping the forward cloves (the seed never gets the request), or relays on
  every path dropping at the same point, still look like a silent seed; a seed that answers on some
  paths only makes the other paths' relays suspects (for that ask) and costs a retry;
- suspects are left out of the rest of this ask only (RouteFailed; the seed may be asked again).

With --strict, a route with fewer paths than planned (replacements ran out) never carries the request:
the attempt fails as a RouteFailed and the retry plans again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass, field

from .asker import (
    FORWARD_FAILED,
    AnswerSink,
    AskEvents,
    AskRequest,
    AskResult,
    AskTimeouts,
    ModelChoice,
    RequestRefused,
    RouteFailed,
    SeedFailed,
    SignerRefused,
    Signers,
    answer_result,
    check_answer,
    check_request,
    find_seeds,
    generate_body,
    run_attempts,
    signers_of,
)
from .circuit import CircuitClient, CircuitError
from .discovery import discover
from .errors import GtorrentError, UsageError
from .garlic import ASK_ID_BYTES, REPLY_KEY_BYTES, GarlicError, ReplyAssembler, clove_payloads, text_chunk
from .guards import Guard, choose_guards, expired, rotation_time, set_size, swarm_key
from .identity import b64, short_id
from .onion import DATA, forward_capacity
from .protocol import PeerRecord, ProtocolError
from .routing import (
    DEFAULT_MIN_HOPS,
    ONE_HOP_HINT,
    PathPlan,
    PrivacyError,
    RelayRules,
    host_of,
    normalise_endpoint,
    plan_paths,
)
from .sida import split
from .store import Store
from .transport import Connection, Context, TransportError

DEFAULT_PATHS = 4
DEFAULT_HOPS = 3
DEFAULT_K = 3
MAX_PATH_HOPS = 8  # the CLI's --hops limit
BUILD_ROUNDS = 3  # a path that fails to build is replaced at most twice within one attempt
RESOLVE_TIMEOUT_S = 2.0  # per host name in a record, all resolved at once
BREAK_SETTLE_S = 1.0  # after too many paths broke: how long to wait to see whether all of them do
RELAY_SAMPLE = 1000  # relays an asker lists (a uniform sample, paged): the pool paths and guards come from
GUARD_HELLO_TIMEOUT_S = 2.0  # a guard that does not answer `hello` in this long is silent for this ask
GUARD_CANDIDATES = 2  # candidates confirmed per guard wanted (copies and dead relays fail the hello) ...
GUARD_ROUNDS = 6  # ... in at most this many rounds


@dataclass
class RelayView:
    """The relays an ask may use now: trusted relays listed, their listing ages, and the asker's guards
    that answered (their fresh records), in order of preference (None: no guards, any first hop)."""

    relays: list[PeerRecord]
    listed_s: dict[str, float]
    guards: list[PeerRecord] | None


async def _hello(ctx: Context, record: PeerRecord, timeout_s: float) -> PeerRecord | None:
    """The record a relay answers about itself over CurveZMQ under the key `record` names, if it is the
    same peer with the same keys and not stopped; else None (silent, a copy, or a liar)."""
    try:
        async with Connection(ctx, record.endpoint, server_key=record.curve_key, name=f"guard {record.endpoint}") as conn:
            reply = await conn.request("hello", {}, frozenset({"hello_ok"}), timeout_s)
        answered = PeerRecord.from_wire(reply["record"])
    except (GtorrentError, ProtocolError, KeyError, TypeError, ValueError):
        return None
    same = answered.peer_id == record.peer_id and answered.curve_key == record.curve_key
    if not same or answered.stopped or answered.expires <= time.time() or "relay" not in answered.roles:
        return None
    return answered


async def confirm(ctx: Context, records: list[PeerRecord], timeout_s: float = GUARD_HELLO_TIMEOUT_S) -> dict[str, PeerRecord]:
    """The records of these relays that answered `hello` as themselves, by peer id (all asked at once)."""
    answers = await asyncio.gather(*(_hello(ctx, r, timeout_s) for r in records))
    return {r.peer_id: a for r, a in zip(records, answers, strict=True) if a is not None}


async def relay_view(
    ctx: Context, trackers: list[str], store: Store, rules: RelayRules, *, paths: int, use_guards: bool = True,
    rng: random.Random | None = None,
) -> RelayView:
    """List relays (a uniform sample of up to RELAY_SAMPLE, with their listing ages) and keep the
    asker's guard set of this swarm (guards.py): confirm the guards held by asking each of them, drop
    those due for rotation or gone, and draw new ones when the set is short, each confirmed the same
    way before it is added."""
    rng = rng or secrets.SystemRandom()
    now = time.time()
    swarm = swarm_key(trackers)
    held = store.guards(swarm) if use_guards else []
    found, answered = await asyncio.gather(
        discover(ctx, trackers, role="relay", want=RELAY_SAMPLE), confirm(ctx, [g.record for g in held])
    )
    store.saw_peers(found.records.values())
    relays = [r for r in found.records.values() if store.standing(r.peer_id).eligible]
    if not use_guards:
        return RelayView(relays, dict(found.listed_s), None)
    if held:
        store.update_guards(swarm, answered.values(), [g.peer_id for g in held if g.peer_id not in answered], now)
        # after the hellos: a guard that answered now is not gone, however long it was silent before
        stale = [g.peer_id for g in store.guards(swarm) if expired(g, now)]
        if stale:
            store.drop_guards(swarm, stale)
        held = store.guards(swarm)
    size = set_size(paths)
    if len(held) < size:  # the first private ask in this swarm, or guards left: draw, confirm, add
        first_seen = store.first_seen()

        def seniority(record: PeerRecord) -> float:  # of conflicting records, the one seen first
            return first_seen.get(record.peer_id, float("inf"))

        chosen: list[PeerRecord] = []
        refused: set[str] = {g.peer_id for g in held}
        for _ in range(GUARD_ROUNDS):  # a candidate that does not answer as itself (dead, or a copy) is
            need = size - len(held) - len(chosen)  # passed over, and the next round may keep the real one
            if need <= 0:
                break
            candidates = choose_guards(
                [r for r in relays if r.peer_id not in refused], [*(g.record for g in held), *chosen],
                len(held) + len(chosen) + GUARD_CANDIDATES * need, rng, listed_s=found.listed_s, rules=rules,
                seniority=seniority,
            )
            if not candidates:
                break
            fresh = await confirm(ctx, candidates)
            answered.update(fresh)
            refused |= {r.peer_id for r in candidates}
            chosen += [fresh[r.peer_id] for r in candidates if r.peer_id in fresh][:need]
        store.add_guards(swarm, [Guard(r, now, rotation_time(now, rng)) for r in chosen], limit=size)
        held = store.guards(swarm)  # asks at once on one home may each have added some: the store decides
    # in the order chosen, those that answered now and are trusted: the planner takes first hops from the front
    usable = [answered[g.peer_id] for g in held if g.peer_id in answered and store.standing(g.peer_id).eligible]
    # a guard that did not answer just now is left out of this ask altogether, middle hops included
    left_out = {r.peer_id for r in usable} | {g.peer_id for g in held if g.peer_id not in answered}
    return RelayView([*(r for r in relays if r.peer_id not in left_out), *usable], dict(found.listed_s), usable)


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
    first_seen: dict[str, float] = field(default_factory=dict)  # of conflicting records, the first seen wins
    aliases: dict[str, frozenset[str]] = field(default_factory=dict)  # host names -> the addresses they resolved to
    guards: list[PeerRecord] | None = None  # the asker's guards listed now (first hops); None: any relay
    listed_s: dict[str, float] = field(default_factory=dict)  # how long each relay has been listed
    rules: RelayRules = field(default_factory=RelayRules)

    def seniority(self, record: PeerRecord) -> float:
        return self.first_seen.get(record.peer_id, float("inf"))

    def plan(self, seed: PeerRecord, *, exclude: set[str] | None = None, paths: int | None = None,
             hops: int | None = None, k: int | None = None, strict: bool | None = None,
             min_hops: int | None = None) -> PathPlan:
        """A plan to `seed` under this ask's rules (the ask's own sizes unless given); a seed that
        failed in this ask is a suspect too: it may also be listed as a relay."""
        return plan_paths(
            self.relays, target=seed, exclude=self.suspects | (exclude or set()), paths=paths or self.paths,
            hops=hops or self.hops, k=k or self.k, strict=self.strict if strict is None else strict, rng=self.rng,
            min_hops=min_hops or self.min_hops, seniority=self.seniority, aliases=self.aliases,
            guards=self.guards, listed_s=self.listed_s, rules=self.rules,
        )


async def resolve_names(records: list[PeerRecord], timeout_s: float = RESOLVE_TIMEOUT_S) -> dict[str, frozenset[str]]:
    """The addresses the host names in these records' endpoints resolve to, as routing aliases.

    A record may name the seed's address under a host name (any DNS name that points at it); compared
    as text it would not conflict with the seed, and the asker would connect to the seed as its first
    hop. Names that do not resolve in time are left as they are (connecting to them fails too)."""
    loop = asyncio.get_running_loop()
    names = {normalise_endpoint(r.endpoint): (host, r.endpoint.rpartition(":")[2])
             for r in records if (host := host_of(r.endpoint)) is not None}

    async def resolve(host: str, port: str) -> frozenset[str]:
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
        except (OSError, TimeoutError, UnicodeError):
            return frozenset()
        return frozenset(normalise_endpoint(f"tcp://[{info[4][0]}]:{port}") for info in infos)

    resolved = await asyncio.gather(*(resolve(host, port) for host, port in names.values()))
    return {endpoint: addresses for endpoint, addresses in zip(names, resolved, strict=True) if addresses}


def failed_span(circuit: CircuitClient, exc: CircuitError) -> tuple[int, int] | None:
    """(first, hop): indices in `circuit.route` of the earliest peer that may be at fault and of the
    peer that did not answer or failed its proof, when known (see circuit.CircuitError)."""
    hop, first = exc.hop, exc.first
    if hop is None or first is None or not 0 <= first <= hop < len(circuit.route):
        return None
    return (first, hop)


async def _close_all(circuits: list[CircuitClient]) -> None:
    await asyncio.gather(*(circuit.close() for circuit in circuits), return_exceptions=True)


async def build_paths(
    ctx: Context, plan: PathPlan, seed: PeerRecord, state: RouteState, timeout_s: float
) -> list[CircuitClient]:
    """Build the plan's circuits at once; replace failed paths with fresh ones (up to BUILD_ROUNDS).

    Raises SeedFailed when no path reached the seed and the seed's hop failed; returns the circuits
    built otherwise (fewer than planned when relays ran out), adding the relays that may have caused
    each failure to the suspects (see the module docstring).
    """
    routes = plan.paths
    built: list[CircuitClient] = []
    # circuits that failed at the seed's hop, with the earliest hop that may be at fault instead
    seed_misses: list[tuple[CircuitClient, int]] = []
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
            span = failed_span(circuit, result) if isinstance(result, CircuitError) else None
            if span is not None and span[1] == len(circuit.route) - 1:
                seed_misses.append((circuit, span[0]))
            elif span is not None:  # the accused relay and the relays that may have reported it falsely
                state.suspects.update(circuit.route[span[0] : span[1] + 1])
            else:  # no hop named: any relay of this path may be at fault, the seed is not known to be
                state.suspects.update(circuit.route[:-1])
        if unexpected is not None:
            await _close_all(built)
            raise unexpected
        if not built and seed_misses:
            raise SeedFailed(
                f"seed {short_id(seed.peer_id)} did not answer on any path ({len(seed_misses)} got as far as it)",
                "timeout", reached=False,
            )
        # the seed answered on other paths: a relay of this path did not extend (or lied about it)
        for circuit, first in seed_misses:
            state.suspects.update(circuit.route[first:-1])
        seed_misses = []
        missing = len(plan.paths) - len(built)
        if missing == 0 or round_number == BUILD_ROUNDS - 1:
            break
        in_use = {peer for circuit in built for peer in circuit.route[:-1]}
        try:
            routes = state.plan(seed, exclude=in_use, paths=missing, hops=plan.hops, k=1, strict=True,
                                min_hops=plan.hops).paths
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
    signers: Signers | None = None,
    forward: bool = True,
) -> AskResult:
    started = time.perf_counter()
    plan = state.plan(seed)
    built = await build_paths(ctx, plan, seed, state, timeouts.accept_s)
    path_setup_s = time.perf_counter() - started
    try:
        if len(built) < plan.k:
            raise RouteFailed(f"only {len(built)} of {len(plan.paths)} paths could be built (need {plan.k})",
                              set(state.suspects))
        if state.strict and len(built) < len(plan.paths):
            # --strict: never send a clove over a route weaker than planned; the retry plans afresh
            raise RouteFailed(f"only {len(built)} of {len(plan.paths)} paths could be built (--strict)",
                              set(state.suspects))
        used = PathPlan([circuit.hops[:-1] for circuit in built], plan.k, plan.wanted_paths, plan.wanted_hops)
        if events.on_route is not None:  # before the request goes out, so before any answer text
            events.on_route(seed, used.describe(), [circuit.route[:-1] for circuit in built])
        reply_key, ask_id = os.urandom(REPLY_KEY_BYTES), os.urandom(ASK_ID_BYTES)
        body = generate_body(request, model_id, "private", forward)
        if not forward:
            signers = (signers or Signers()).declining()
        del body["id"]
        request_bytes = json.dumps({**body, "reply_key": b64(reply_key)}, separators=(",", ":")).encode("utf-8")
        cloves = split(request_bytes, n=len(built), k=plan.k)
        for circuit, clove in zip(built, cloves, strict=True):
            # cells are filled to the capacity of the longest allowed path, whatever this path's length,
            # so the seed cannot tell how many relays precede it
            for payload in clove_payloads(ask_id, clove.to_bytes(), forward_capacity(MAX_PATH_HOPS + 1)):
                await circuit.send(payload)
        return await _receive(built, used, seed, model_id, request_bytes, reply_key, timeouts, sink, started, path_setup_s,
                              signers)
    finally:
        await _close_all(built)


def _broken_suspects(circuit: CircuitClient, exc: CircuitError | None) -> set[str]:
    """The relays to blame for a path that broke mid-answer (see the module docstring)."""
    relays = circuit.route[:-1]
    if exc is not None and isinstance(exc.__cause__, TransportError):
        return {relays[0]}  # our own link to the first relay broke
    # a destroy (any relay may send one and say it came from further on), or cells no hop should
    # send: any of its relays, the one that reported the break included
    return set(relays)


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
    signers: Signers | None = None,
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
    # fragments each path delivered in this attempt: the seed sends one per chunk on every path, and
    # only the seed can seal a cell as the terminal hop, so a relay cannot inflate its path's count
    delivered = [0] * len(built)

    def silence(wait_s: float) -> RouteFailed | SeedFailed:
        """The answer stopped for `wait_s`: whose fault (see the module docstring)."""
        most = max(delivered)
        behind = [path for path in range(len(built)) if path not in dead and delivered[path] < most]
        if not behind:  # every live path is as far along as any: the seed went silent
            return SeedFailed(f"no answer over the paths to seed {short_id(seed.peer_id)} in {wait_s:g} s", "timeout",
                              answered=most > 0, stopped=True)
        for path in behind:
            suspects.update(built[path].route[:-1])
        return RouteFailed(f"{len(behind)} of {len(built)} paths went silent ({wait_s:g} s) while the seed "
                           f"answered on others", set(suspects))

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
            return SeedFailed(f"every path to seed {short_id(seed.peer_id)} broke ({reason})", answered=max(delivered) > 0,
                              stopped=True)
        return RouteFailed(reason, set(suspects))

    try:
        while True:
            wait_s = timeouts.first_token_s if ttft_s is None else timeouts.between_tokens_s
            try:
                path, payload, error = await asyncio.wait_for(queue.get(), wait_s)
            except TimeoutError:
                raise silence(wait_s) from None
            if payload is None:
                if path not in dead:
                    dead.add(path)
                    suspects.update(_broken_suspects(built[path], error))
                if len(built) - len(dead) < plan.k:
                    raise await paths_lost(f"only {len(built) - len(dead)} paths left (need {plan.k})")
                continue
            delivered[path] += 1
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
                    try:
                        piece, ids = text_chunk(chunk)
                    except GarlicError as exc:  # the seed sealed it: the seed's fault
                        raise SeedFailed(f"seed {short_id(seed.peer_id)} sent a bad chunk: {exc}") from exc
                    sink.add(piece, ids)
                elif "error" in chunk:
                    if chunk["error"] == "bad_request":
                        raise RequestRefused(f"the seed refused the request: {chunk.get('message', '')}")
                    raise SeedFailed(f"seed {short_id(seed.peer_id)} failed: {chunk.get('message', chunk['error'])}",
                                     code=str(chunk["error"]), stopped=chunk["error"] == FORWARD_FAILED)
                elif "done" in chunk:
                    info = chunk["done"]
                    if not isinstance(info, dict):
                        raise SeedFailed(f"seed {short_id(seed.peer_id)} sent a malformed final chunk")
                    # a forwarded answer names its signer in `done`; only this ask's listing can vouch
                    # for it (asker.Signers), never a tracker asked about it
                    checked = check_answer(seed, request_bytes, model_id, sink, info, chunk.get("signature"), signers)
                    result = answer_result(seed, model_id, sink, request_bytes, checked, ttft_s,
                                           time.perf_counter() - started)
                    result.mode, result.privacy, result.path_setup_s = "private", plan.describe(), path_setup_s
                    result.route = [circuit.route[:-1] for circuit in built]
                    return result
    finally:
        for reader in readers:
            reader.cancel()


async def _aimed(ctx: Context, trackers: list[str], seed: PeerRecord, request: AskRequest) -> tuple[ModelChoice, list[PeerRecord]]:
    """`seed` alone, after the same tracker query a user's ask makes (find_seeds), so that a tracker
    cannot tell a verifier's challenge from a user's ask by the queries before it."""
    with contextlib.suppress(GtorrentError):
        await discover(ctx, trackers, model=request.model, role="seed", verdicts=True)
    return ModelChoice(request.model or "", "", [seed]), [seed]


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
    rules: RelayRules | None = None,
    use_guards: bool = True,
    only_seed: PeerRecord | None = None,
    signers: Signers | None = None,
) -> AskResult:
    """`only_seed`: ask that seed alone, for `request.model` (a verifier's challenge, verifier.py),
    whatever its standing in `store`; the paths and messages are those of any private ask.

    `signers`: who besides the seed asked may sign a forwarded answer (asker.check_answer); by default
    the seeds this ask listed, not untrusted in `store` (with `only_seed`: none unless given; a
    verifier passes its epoch's listing)."""
    events = events or AskEvents()
    ask_timeouts = timeouts or AskTimeouts()
    check_request(request)
    if not 1 <= k <= paths:
        raise UsageError(f"--paths must be at least {k} (the S-IDA threshold)", hint=f"use --paths {k} or more")
    min_hops = 1 if allow_one_hop else DEFAULT_MIN_HOPS
    if hops < min_hops:
        raise UsageError(f"--hops {hops}: with one relay per path, that relay sees both you and the seed",
                         hint=f"use --hops {DEFAULT_MIN_HOPS} or more, or {ONE_HOP_HINT}")
    rules = rules or RelayRules()
    started = time.perf_counter()
    (choice, ranked), view = await asyncio.gather(
        find_seeds(ctx, trackers, request, store, events) if only_seed is None
        else _aimed(ctx, trackers, only_seed, request),
        relay_view(ctx, trackers, store, rules, paths=paths, use_guards=use_guards),
    )
    state = RouteState(view.relays, paths, hops, k, strict, min_hops, first_seen=store.first_seen(),
                       guards=view.guards, listed_s=view.listed_s, rules=rules)
    state.aliases = await resolve_names([*state.relays, *ranked, *(s for _, seeds in choice.alternatives for s in seeds)])
    if signers is None:
        signers = signers_of(choice, store)

    async def attempt(seed: PeerRecord, model_id: str, sink: AnswerSink, forward: bool) -> AskResult:
        try:
            return await _one_attempt(ctx, seed, model_id, request, state, ask_timeouts, events, sink, signers, forward)
        except SignerRefused:
            raise  # not yet the seed's fault: asked again at once with forwarding declined (run_attempts)
        except SeedFailed:
            state.suspects.add(seed.peer_id)  # it may be listed as a relay too: not on later paths either
            raise
        except RouteFailed as exc:
            state.suspects |= exc.suspects
            raise
        except CircuitError as exc:  # a circuit failure outside building: a route failure
            raise RouteFailed(exc.message) from exc

    async def refresh(model_id: str) -> set[str] | None:
        """Seeds and relays still announced: a peer that said `stopped` is neither asked nor used.

        The relays' records are replaced by the ones listed now: an ask may outlive a rotated onion
        key's grace period (onionkeys.py), and a record naming a key past it only gets its CREATE
        refused. The suspects of this ask stay."""
        try:
            seeds_now, view_now = await asyncio.gather(
                discover(ctx, trackers, model=model_id, role="seed"),
                relay_view(ctx, trackers, store, rules, paths=paths, use_guards=use_guards),
            )
        except GtorrentError:
            return None
        state.relays, state.listed_s, state.guards = view_now.relays, view_now.listed_s, view_now.guards
        state.first_seen = store.first_seen()
        state.aliases = await resolve_names([*state.relays, *(s for s in seeds_now.records.values())])
        return set(seeds_now.records)

    return await run_attempts(ranked, attempt, store, events, request=request, started=started,
                              model_id=choice.model_id, alternatives=choice.alternatives,
                              max_attempts=max_attempts, refresh=refresh, what="private ask")


__all__ = ["PrivacyError", "RelayView", "RouteState", "ask_private", "build_paths", "relay_view"]
