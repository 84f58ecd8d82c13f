"""Model groups: the seeds announcing one model id find each other and exchange their state.

A seed's group is the other seeds its trackers list for its model id (same `model_id`, role seed, not
stopped), re-read every DISCOVERY_INTERVAL_S, with the verdicts the trackers hold on them: a member
counts as trusted for forwarding when the verdicts make it trusted (R >= 0.3), or when no verdict judges
any member of the group yet; an untrusted member, and an unverified one once others are judged, stays in
the group but is never a forwarding target (the asker's tiers, reputation.choice_tier). To each member the seed
opens a CurveZMQ link to the endpoint and curve key of the member's signed record, so a copy of another
seed's endpoint under other keys fails the handshake, and every EXCHANGE_INTERVAL_S (at least once a
second) sends it a `group_state`: its bounded prefix summary (PrefixCache.summary(max_digests), at most
MAX_SUMMARY_DIGESTS digests, so a message stays under 45 KiB), its queue, in-flight count and LB factor.
The member answers with its own `group_state`. Between exchanges a seed pushes its load alone
(`group_load`: queue, in-flight, LB factor; no summary, no answer) to every live member whenever its
queue changes, at most every LOAD_PUSH_MIN_S: a summary changes slowly (popular prefixes stay cached),
but a load half a second old sends every entry's requests to the same member until the next state
(forwarding.py "Load-aware factor"; scripts/bench_forwarding.py's 8-seed simulation: tree+lb at 1.08x
round robin's mean with loads from the exchange alone, 0.74x with loads pushed on change, 0.69x with
every member's state current at every request).

Invariants:
- a `group_state` (or `forward`) is taken only from a listed seed of the model, signed by that record's
  key (GROUP_LABEL + canonical body without `sig`), addressed to this seed (`to`), for this model, with a
  clock within CLOCK_SKEW_S (a state older than the one held shows the member alive but does not replace
  it: the two directions' states can cross); anything else is refused (`counters["refused"]`) and answered with `error` code `not_member` or `invalid`, never with
  a state. So prefix hashes go only to listed seeds of the same model, over CurveZMQ: askers, relays and
  trackers never get them.
- a member that misses MISSED_TO_LEAVE exchanges in a row (no valid answer within EXCHANGE_TIMEOUT_S)
  leaves the group (`live` False) and is no forwarding target; it is tried again on a fresh link after
  a delay that doubles per miss up to RETRY_MAX_S (a record may name anyone's endpoint), and comes back
  as soon as it answers or sends a valid state. A member whose record stops, expires or leaves the
  listing is dropped with its link.
- at most MAX_MEMBERS members, chosen trusted first, then unverified, then untrusted (each by peer id),
  so fresh identities cannot crowd trusted members out; the number of links, tasks and held summaries
  is bounded by it.
- a `group_load` passes the same checks as a state; it is taken only if stamped after the member's last
  load (states and loads share the sender's stamp, and a state's load counts only if newer too), and
  at most MAX_LOADS_PER_S per member are checked at all (the rest are dropped before the signature is
  verified: a flood costs at most that many verifications per member per second).
- the members' trust comes from the last listing taken (`update`): older than LISTING_STALE_S (the
  trackers failed to answer, e.g. under load), it is not trusted any more and the seed forwards nothing
  until a listing comes. Otherwise verdicts that made a member untrusted since would go unseen for as
  long as the trackers stay silent, while askers, who read the verdicts at each ask, refuse that
  member's signature as the entry's failure.
- a member that fails a forward is no forwarding target for a while (FORWARD_BENCH_S, doubling per
  failure in a row), whatever its states claim; a forward it answers resets the count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from .discovery import Discovery, discover
from .errors import GtorrentError
from .forwarding import Member
from .identity import Identity, b64, unb64, verify_signature
from .protocol import MAX_GROUP_SUMMARY_CHARS, Message, PeerRecord, ProtocolError, canonical
from .reputation import consensus_history, state_of
from .runtime.prefix_cache import DIGEST_BYTES, PrefixSummary
from .transport import Connection, Context, Reply, TransportError

log = logging.getLogger(__name__)

GROUP_LABEL = b"gtorrent/group/v1\n"
EXCHANGE_INTERVAL_S = 0.5  # a state to every member this often (the issue asks at least once a second)
EXCHANGE_TIMEOUT_S = 1.0  # an exchange unanswered this long is missed
LOAD_PUSH_MIN_S = 0.01  # a seed pushes its changed load to its members at most this often
LOAD_PUSH_SEND_S = 0.1  # a push to one member waits at most this for its link
MAX_LOADS_PER_S = 200.0  # `group_load`s checked per member per second; more are dropped unread
MISSED_TO_LEAVE = 3  # missed exchanges in a row after which a member leaves the group
RETRY_MAX_S = 30.0  # a member away is tried again after a delay doubling up to this (retry_delay_s)
DISCOVERY_INTERVAL_S = 5.0  # the trackers are asked for the model's seeds this often
# with no listing taken for this long (trackers unreachable or too slow), the members' trust is unknown:
# no forwarding until a listing comes (`routing_view`)
LISTING_STALE_S = 2 * DISCOVERY_INTERVAL_S
UNKNOWN_REFRESH_S = 1.0  # a state from an unlisted seed makes the group re-ask the trackers, at most this often
MAX_MEMBERS = 32
MAX_SUMMARY_DIGESTS = (MAX_GROUP_SUMMARY_CHARS * 3 // 4) // DIGEST_BYTES  # 2,062: b64 fits the schema
CLOCK_SKEW_S = 60.0  # a group message stamped further from this seed's clock is refused
# a member that failed a forward (refused, silent, stalled, bad signature, broke mid-answer) is no target
# for this long, doubling with each failure in a row up to the maximum; a forward it answers resets it.
# So a member that lies to attract forwards and then fails them costs an entry at most one failed forward
# per FORWARD_BENCH_MAX_S, not one per request
FORWARD_BENCH_S = 1.0
FORWARD_BENCH_MAX_S = 60.0
EMPTY = PrefixSummary(frozenset())


@dataclass(frozen=True)
class LocalState:
    """What this seed tells its group."""

    summary: PrefixSummary
    queue: int
    in_flight: int
    lb: float


@dataclass
class GroupMember:
    """Another seed of the model, as its signed record and its last state say."""

    record: PeerRecord
    trusted: bool = True  # False: not a forwarding target (untrusted, or unverified among judged members)
    summary: PrefixSummary = EMPTY
    queue: int = 0
    in_flight: int = 0
    lb: float = 0.0
    missed: int = 0  # exchanges missed in a row
    heard: bool = False  # some valid state came from it since it (re)joined
    last_ts: int = 0  # the newest state stamp taken from it (older ones are replays)
    last_load_ts: int = 0  # the newest stamp its load (from a state or a `group_load`) was taken at
    load_allowance: float = MAX_LOADS_PER_S  # token bucket of `group_load`s it may still have checked
    load_checked_at: float = 0.0  # time.monotonic() of the bucket's last refill
    forwarded: int = 0  # requests this seed forwarded to it since its last state (its queue, kept live)
    failures: int = 0  # forwards it failed in a row (FORWARD_BENCH_S)
    benched_until: float = 0.0  # time.monotonic() before which it is no forwarding target
    link: Connection | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    @property
    def live(self) -> bool:
        return self.heard and self.missed < MISSED_TO_LEAVE


def signed_bytes(body: dict[str, Any], extra: bytes = b"") -> bytes:
    """What a group message's `sig` signs: the label, the canonical body without `sig`, then `extra`."""
    return GROUP_LABEL + canonical({k: v for k, v in body.items() if k != "sig"}) + extra


def encode_summary(summary: PrefixSummary) -> str:
    return b64(summary.to_bytes())


def decode_summary(text: str) -> PrefixSummary:
    """Raises ValueError for anything that is not whole digests."""
    return PrefixSummary.from_bytes(unb64(text))


class ModelGroup:
    """This seed's view of the other seeds of its model, kept fresh by exchanges (module doc)."""

    def __init__(
        self,
        identity: Identity,
        ctx: Context,
        trackers: list[str],
        model_id: str,
        local_state: Callable[[], LocalState],
        *,
        local_load: Callable[[], LocalState] | None = None,
        verifiers: frozenset[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.ctx = ctx
        self.trackers = trackers
        self.model_id = model_id
        self.local_state = local_state
        # the load alone, for pushes: without the summary's scan (`local_state` may do one)
        self.local_load = local_load or local_state
        self.verifiers = verifiers
        self.clock = clock
        self.members: dict[str, GroupMember] = {}
        self.counters: Counter[str] = Counter()
        self.on_change: Callable[[GroupMember, bool], None] = lambda member, joined: None
        self._refresh_wanted = asyncio.Event()
        self._last_refresh = 0.0
        self._last_stamp = 0
        self.listed_at: float | None = None  # time.monotonic() of the last listing taken (`update`)
        self._load_dirty = asyncio.Event()  # the load changed since the last push (load_changed)
        self._push_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ view

    def live_members(self) -> list[GroupMember]:
        return [m for m in self.members.values() if m.live]

    def routing_view(self, own: Member) -> list[Member]:
        """The members forwarding.choose weighs: this seed (`own`) and every live member that is not benched
        for failing a forward (`note_forward_failed`)."""
        now = time.monotonic()
        if self.listed_at is None or now - self.listed_at > LISTING_STALE_S:
            return [own]  # the members' trust is unknown (module doc): serve here
        return [own, *(Member(m.peer_id, m.summary, m.lb, m.queue + m.in_flight + m.forwarded, m.trusted)
                       for m in self.live_members() if m.benched_until <= now)]

    def note_forward_failed(self, peer_id: str) -> None:
        """A forward to `peer_id` failed: no forwarding target for FORWARD_BENCH_S, doubled per failure in a
        row (whatever its states claim: a state is its word, a failed forward is what it did)."""
        member = self.members.get(peer_id)
        if member is not None:
            bench_s = min(FORWARD_BENCH_S * float(2 ** min(member.failures, 16)), FORWARD_BENCH_MAX_S)
            member.failures += 1
            member.benched_until = time.monotonic() + bench_s

    def note_forward_served(self, peer_id: str) -> None:
        member = self.members.get(peer_id)
        if member is not None:
            member.failures = 0

    def note_forward(self, peer_id: str) -> None:
        """This seed forwarded a request to `peer_id`: count it in that member's queue until its next state
        (states come once per exchange; requests many times faster, forwarding.py "Load-aware factor")."""
        member = self.members.get(peer_id)
        if member is not None:
            member.forwarded += 1

    # ------------------------------------------------------------------ messages

    def _stamp(self) -> int:
        # strictly increasing: a reply and this seed's own state can leave within one millisecond
        self._last_stamp = max(int(self.clock() * 1000), self._last_stamp + 1)
        return self._last_stamp

    def state_body(self, to: str) -> dict[str, Any]:
        state = self.local_state()
        body: dict[str, Any] = {
            "from": self.peer_id,
            "to": to,
            "model_id": self.model_id,
            "ts": self._stamp(),
            "summary": encode_summary(state.summary),
            "queue": min(state.queue, 1 << 20),
            "in_flight": min(state.in_flight, 1 << 20),
            "lb": min(max(state.lb, 0.0), 1e6),
        }
        body["sig"] = b64(self.identity.sign(signed_bytes(body)))
        return body

    def load_body(self, to: str, state: LocalState) -> dict[str, Any]:
        body: dict[str, Any] = {
            "from": self.peer_id,
            "to": to,
            "model_id": self.model_id,
            "ts": self._stamp(),
            "queue": min(state.queue, 1 << 20),
            "in_flight": min(state.in_flight, 1 << 20),
            "lb": min(max(state.lb, 0.0), 1e6),
        }
        body["sig"] = b64(self.identity.sign(signed_bytes(body)))
        return body

    def sign_forward(self, body: dict[str, Any], request_digest: bytes) -> dict[str, Any]:
        return {**body, "sig": b64(self.identity.sign(signed_bytes(body, request_digest)))}

    def check(self, message: Message, extra: bytes = b"") -> GroupMember:
        """The listed member that sent this group message; raise ProtocolError (refused) otherwise."""
        body = message.body
        member = self.members.get(body["from"])
        if member is None:
            self.want_refresh()  # perhaps a seed that joined since the last listing
            raise ProtocolError("not_member: the sender is not a listed seed of this model")
        if body["to"] != self.peer_id or body["model_id"] != self.model_id:
            raise ProtocolError("invalid: addressed to another seed or model")
        if abs(body["ts"] / 1000 - self.clock()) > CLOCK_SKEW_S:
            raise ProtocolError("invalid: stamped too far from this seed's clock")
        try:
            signature = unb64(body["sig"])
        except ValueError as exc:
            raise ProtocolError("invalid: bad signature encoding") from exc
        if not verify_signature(member.record.signing_key, signature, signed_bytes(body, extra)):
            raise ProtocolError("invalid: bad signature")
        return member

    def take_state(self, message: Message) -> GroupMember:
        """Check a `group_state` and take it as the member's state (raise ProtocolError to refuse)."""
        member = self.check(message)
        body = message.body
        try:
            summary = decode_summary(body["summary"])
        except ValueError as exc:
            raise ProtocolError(f"invalid: bad summary ({exc})") from exc
        # A state older than the one held (its own state and its reply to ours travel on two links and can
        # cross) is not taken, but still shows the member alive: only this seed could replay a state
        # addressed to it (CurveZMQ hides it from everyone else), so an old one proves nothing false.
        if body["ts"] > member.last_ts:
            member.last_ts = body["ts"]
            member.summary = summary
        self._take_load(member, body)
        rejoined = not member.live
        member.missed = 0
        member.heard = True
        if rejoined:
            self.counters["joined"] += 1
            self.on_change(member, True)
        return member

    @staticmethod
    def _take_load(member: GroupMember, body: dict[str, Any]) -> bool:
        if body["ts"] <= member.last_load_ts:
            return False  # older than the load held (a replay, or crossed on the other link)
        member.last_load_ts = body["ts"]
        member.queue, member.in_flight, member.lb = body["queue"], body["in_flight"], float(body["lb"])
        member.forwarded = 0  # its reported queue now counts what this seed sent it
        return True

    def take_load(self, message: Message) -> bool:
        """A member's pushed `group_load`: take it if it checks and is newer than the load held. False when
        it was dropped, refused or older than the load held (a load is never answered)."""
        member = self.members.get(message.body["from"])
        if member is None:
            self.counters["refused"] += 1
            return False
        now = time.monotonic()
        member.load_allowance = min(MAX_LOADS_PER_S, member.load_allowance + (now - member.load_checked_at) * MAX_LOADS_PER_S)
        member.load_checked_at = now
        if member.load_allowance < 1:
            self.counters["loads_dropped"] += 1
            return False
        member.load_allowance -= 1
        try:
            self.check(message)
        except ProtocolError:
            self.counters["refused"] += 1
            return False
        return self._take_load(member, message.body)

    def load_changed(self) -> None:
        """This seed's queue changed: push its load to the live members soon (at most every
        LOAD_PUSH_MIN_S; changes in between go out together, the latest load only)."""
        self._load_dirty.set()
        if self._push_task is None or self._push_task.done():
            self._push_task = asyncio.get_running_loop().create_task(self._push_loads())

    async def _push_loads(self) -> None:
        loop = asyncio.get_running_loop()
        while self._load_dirty.is_set():
            self._load_dirty.clear()
            started = loop.time()
            state = self.local_load()
            for member in self.live_members():
                if member.link is None:
                    continue  # the next exchange dials it, and carries the load
                try:  # bounded: a link whose queue is full (a member gone quiet) must not hold the others up
                    await asyncio.wait_for(member.link.send("group_load", self.load_body(member.peer_id, state)),
                                           LOAD_PUSH_SEND_S)
                except (TransportError, ProtocolError, zmq.ZMQError, TimeoutError) as exc:
                    log.debug("load push to %s failed: %s", member.peer_id[:8], exc)
            await asyncio.sleep(max(LOAD_PUSH_MIN_S - (loop.time() - started), 0.0))

    async def handle_state(self, reply: Reply, message: Message) -> None:
        """A member's `group_state`: take it and answer with this seed's state; refuse anyone else."""
        try:
            member = self.take_state(message)
        except ProtocolError as exc:
            self.counters["refused"] += 1
            code = str(exc).split(":", 1)[0]
            await reply.send("error", {"code": code if code in ("not_member", "invalid") else "invalid",
                                       "message": str(exc)[:200]})
            return
        await reply.send("group_state", self.state_body(member.peer_id))

    # ------------------------------------------------------------------ membership

    def want_refresh(self) -> None:
        self._refresh_wanted.set()

    def update(self, found: Discovery) -> None:
        """Take a tracker listing as the group's membership (pure apart from links and tasks)."""
        self.listed_at = time.monotonic()
        records = [
            r for r in found.records.values()
            if r.peer_id != self.peer_id and "seed" in r.roles and not r.stopped
            and any(m.model_id == self.model_id for m in r.models)
        ]
        verdicts: dict[str, list[Any]] = {}
        for verdict in found.verdicts:
            verdicts.setdefault(verdict.seed, []).append(verdict)
        trusted_set = self.verifiers if self.verifiers is not None else found.admitted
        states = {}
        for record in records:
            history = consensus_history(verdicts.get(record.peer_id, []),
                                        None if trusted_set is None else set(trusted_set))
            states[record.peer_id] = state_of(history[-1].reputation if history else None)
        # the MAX_MEMBERS kept are the best judged first, then by peer id: ids cost nothing to grind, so
        # by id alone a few fresh identities with small ids would push every trusted member out
        rank = {"trusted": 0, "unverified": 1}
        records.sort(key=lambda r: (rank.get(states[r.peer_id], 2), r.peer_id))
        listed = {r.peer_id: r for r in records[:MAX_MEMBERS]}
        for peer_id in list(self.members):
            if peer_id not in listed:
                self._drop(peer_id)
        # as the asker's tiers (reputation.choice_tier): once some member is judged, only trusted ones are
        # targets; where no verdict judges any, every member counts
        judged = any(states[peer_id] != "unverified" for peer_id in listed)
        for peer_id, record in listed.items():
            trusted = states[peer_id] == "trusted" or (states[peer_id] == "unverified" and not judged)
            member = self.members.get(peer_id)
            if member is None:
                self.members[peer_id] = GroupMember(record, trusted)
                continue
            if (record.endpoint, record.curve_key) != (member.record.endpoint, member.record.curve_key):
                self._close_link(member)  # restarted elsewhere: the next exchange dials the new record
            if record.seq >= member.record.seq:
                member.record = record
            member.trusted = trusted

    def _drop(self, peer_id: str) -> None:
        member = self.members.pop(peer_id)
        if member.task is not None:
            member.task.cancel()
        self._close_link(member)
        if member.live:
            self.counters["left"] += 1
            self.on_change(member, False)

    @staticmethod
    def _close_link(member: GroupMember) -> None:
        if member.link is not None:
            member.link.close()
            member.link = None

    async def refresh(self) -> None:
        self._last_refresh = time.monotonic()  # failed listings count too: never a tight loop
        try:
            found = await discover(self.ctx, self.trackers, model=self.model_id, role="seed", verdicts=True)
        except GtorrentError as exc:
            log.debug("group listing failed: %s", exc.message)
            return
        self.update(found)
        for member in self.members.values():
            if member.task is None or member.task.done():
                member.task = asyncio.create_task(self._exchange_loop(member))

    # ------------------------------------------------------------------ exchanges

    def _missed(self, member: GroupMember) -> None:
        was_live = member.live
        member.missed += 1
        self._close_link(member)  # never let stale states queue up for a member that is away
        if was_live and not member.live:
            self.counters["left"] += 1
            self.on_change(member, False)

    async def exchange(self, member: GroupMember) -> bool:
        """One exchange with a member: send this seed's state, take its answer. False when missed."""
        if member.link is None:
            member.link = Connection(self.ctx, member.record.endpoint, server_key=member.record.curve_key,
                                     name=f"group member {member.peer_id[:8]}", reconnect_ivl_s=(0.1, 1.0))
        link = member.link
        try:
            await link.send("group_state", self.state_body(member.peer_id))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + EXCHANGE_TIMEOUT_S
            while True:
                answer = await link.recv(max(deadline - loop.time(), 0.001), frozenset({"group_state", "error"}))
                if answer.kind == "error":
                    log.debug("group member %s refused our state: %s", member.peer_id[:8], answer.get("message"))
                    break
                if answer["from"] != member.peer_id:
                    continue
                try:
                    self.take_state(answer)
                    return True
                except ProtocolError as exc:
                    log.debug("bad state from %s: %s", member.peer_id[:8], exc)
                    continue  # e.g. a late answer to an earlier exchange: wait for this one's
        except (TransportError, ProtocolError) as exc:
            log.debug("exchange with %s failed: %s", member.peer_id[:8], exc)
        self._missed(member)
        return False

    async def _exchange_loop(self, member: GroupMember) -> None:
        loop = asyncio.get_running_loop()
        while self.members.get(member.peer_id) is member:
            started = loop.time()
            try:
                await self.exchange(member)
            except Exception:  # noqa: BLE001 - one member's trouble must not end the group
                log.exception("group exchange failed")
                self._missed(member)
            await asyncio.sleep(max(self.retry_delay_s(member) - (loop.time() - started), 0.05))

    @staticmethod
    def retry_delay_s(member: GroupMember) -> float:
        """The time between exchanges with a member: EXCHANGE_INTERVAL_S, doubled for each exchange missed
        beyond MISSED_TO_LEAVE up to RETRY_MAX_S. A record may name any host's endpoint (trackers do not
        check them): without the back-off every seed of the model would dial it every second, forever.
        A member that comes back is live again at its first state to this seed, whatever the delay."""
        beyond = member.missed - MISSED_TO_LEAVE
        if beyond < 0:
            return EXCHANGE_INTERVAL_S
        return min(EXCHANGE_INTERVAL_S * float(2 ** min(beyond + 1, 16)), RETRY_MAX_S)

    async def run(self) -> None:
        """Keep the membership fresh and exchange with every member, forever."""
        try:
            while True:
                await self.refresh()
                self._refresh_wanted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._refresh_wanted.wait(), DISCOVERY_INTERVAL_S)
                # a burst of unknown senders costs at most one listing per UNKNOWN_REFRESH_S
                wait = UNKNOWN_REFRESH_S - (time.monotonic() - self._last_refresh)
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            self.close()

    def close(self) -> None:
        if self._push_task is not None:
            self._push_task.cancel()
        for peer_id in list(self.members):
            member = self.members.pop(peer_id)
            if member.task is not None:
                member.task.cancel()
            self._close_link(member)
