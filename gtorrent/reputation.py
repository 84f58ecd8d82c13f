"""Reputation rules (pure): how verdicts become a verification reputation, and which seeds get asks.

Two signals, kept apart so that neither can stand in for the other (issue 8 item 4):

- verification reputation R, from verifiers' signed verdicts only. Per epoch, the consensus C is the
  median of the credibilities the trusted verifiers gave the seed for that epoch, so one lying verifier
  of three can neither frame an honest seed nor clear a cheater. Over the consensus C's in epoch order
  the paper's rule applies (shared/research/paper-notes.md §4.2): R starts at 0.5, R <- 0.4 R + 0.6 C,
  with the window punishment (W = 5, tau = 0.4, gamma = 0.2) and a clamp to [0, 1]. The paper's 0.3
  threshold applies to this R alone: a seed is `trusted` (R >= 0.3), `untrusted`, or `unverified`
  (no verdict from a trusted verifier yet).
- reliability, from this client's own ask outcomes: an EWMA of success (1) and failure (0). With the
  back-off after failures, it orders the eligible seeds; it never makes an untrusted seed eligible
  (the mean of the two once kept a C = 0 seed at 0.497, above the threshold) and never makes a
  trusted or unverified one ineligible (a timeout says nothing about the weights a seed serves).

Eligible (gets asks) = trusted or unverified. Among eligible seeds an unverified one ranks below a
trusted one of the same reliability and load. There is a way back: R follows the recent C's, so an
untrusted seed that serves honestly again is trusted after a few epochs (the paper's code has none).
All functions take their inputs (verdicts, clock `now`) as arguments.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

ALPHA = 0.4  # weight of the previous reputation (paper)
BETA = 0.6  # weight of the epoch's consensus credibility (paper)
WINDOW = 5  # epochs remembered for punishment (paper)
TAU = 0.4  # an epoch below this is abnormal (paper)
GAMMA = 0.2  # punish when more than this fraction is abnormal (paper)
INITIAL_REPUTATION = 0.5  # paper
UNTRUSTED_BELOW = 0.3  # paper
RELIABILITY_WEIGHT = 0.2  # EWMA weight of one ask outcome
BACKOFF_BASE_S = 15.0  # avoid for 15 s after one failure, doubling per further failure
BACKOFF_MAX_S = 600.0

State = Literal["trusted", "untrusted", "unverified"]


class Scored(Protocol):
    """What the rules read of a verdict (protocol.Verdict has it; tests may pass plain tuples' kin)."""

    @property
    def verifier(self) -> str: ...

    @property
    def epoch(self) -> int: ...

    @property
    def credibility(self) -> float: ...


def clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def punishment_weight(abnormal: int) -> float:
    """The weight of C in an epoch whose window holds `abnormal` epochs below tau: (W+1)/(W + c/gamma + 2)."""
    return (WINDOW + 1) / (WINDOW + abnormal / GAMMA + 2)


def next_reputation(reputation: float, window: Sequence[float], credibility: float) -> tuple[float, list[float]]:
    """One epoch of the paper's rule: (R after, the window after) from R before, the last <= W consensus
    C's before this one, and this epoch's C."""
    abnormal = sum(1 for score in window if score < TAU) + (1 if credibility < TAU else 0)
    kept = [*window, credibility][-WINDOW:]
    weight = punishment_weight(abnormal) if abnormal / len(kept) > GAMMA else BETA
    return clamp(ALPHA * reputation + weight * credibility), kept


def verification_reputation(consensus: Sequence[float]) -> float:
    """The paper's reputation after epochs of these consensus credibilities (oldest first)."""
    reputation = INITIAL_REPUTATION
    window: list[float] = []
    for credibility in consensus:
        reputation, window = next_reputation(reputation, window, credibility)
    return reputation


def state_of(reputation: float | None) -> State:
    """The trust state of a verification reputation (None: never verified)."""
    if reputation is None:
        return "unverified"
    return "trusted" if reputation >= UNTRUSTED_BELOW else "untrusted"


@dataclass(frozen=True)
class EpochConsensus:
    """One epoch of a seed's verdicts, as trusted verifiers gave them, and what they did to R."""

    epoch: int
    credibilities: dict[str, float]  # verifier peer id -> its C for this epoch
    consensus: float  # the median of `credibilities`
    agreed: int  # verifiers on the consensus's side of tau (they agree the epoch was normal, or abnormal)
    reputation: float  # R after this epoch

    @property
    def verifiers(self) -> int:
        return len(self.credibilities)


def quorum_of(verifiers: int) -> int:
    """Verdicts an epoch needs from a trusted set of this many verifiers: ⌊2N/3⌋ + 1 (paper)."""
    return (2 * verifiers) // 3 + 1 if verifiers > 0 else 1


def consensus_history(verdicts: Iterable[Scored], trusted_verifiers: set[str] | None = None) -> list[EpochConsensus]:
    """Per epoch (oldest first) the median of the trusted verifiers' C and R after it.

    `trusted_verifiers`: the verifiers' peer ids this client trusts; None trusts any verifier (whoever
    can make identities can then outvote the honest ones: fine for a private swarm, not an open one).
    One verdict per verifier and epoch counts (the store keeps the first; here too the first wins).
    With a known trusted set of N verifiers an epoch counts only with a quorum of ⌊2N/3⌋ + 1 of them
    (the paper's MIN_VOTES_FRACTION): otherwise one verifier could frame or clear a seed alone, in
    epochs numbered so that no other verifier judged them."""
    by_epoch: dict[int, dict[str, float]] = {}
    for verdict in verdicts:
        if trusted_verifiers is not None and verdict.verifier not in trusted_verifiers:
            continue
        by_epoch.setdefault(verdict.epoch, {}).setdefault(verdict.verifier, verdict.credibility)
    history = []
    reputation = INITIAL_REPUTATION
    window: list[float] = []
    quorum = quorum_of(len(trusted_verifiers)) if trusted_verifiers is not None else 1
    for epoch in sorted(by_epoch):
        scores = by_epoch[epoch]
        if len(scores) < quorum:
            continue
        consensus = float(statistics.median(scores.values()))
        reputation, window = next_reputation(reputation, window, consensus)
        agreed = sum(1 for score in scores.values() if (score < TAU) == (consensus < TAU))
        history.append(EpochConsensus(epoch, dict(scores), consensus, agreed, reputation))
    return history


def reliability_from_outcomes(successes: Iterable[bool]) -> float:
    """EWMA of ask outcomes (oldest first), starting at the initial reputation."""
    value = INITIAL_REPUTATION
    for ok in successes:
        value = (1 - RELIABILITY_WEIGHT) * value + RELIABILITY_WEIGHT * (1.0 if ok else 0.0)
    return value


def avoid_until(consecutive_failures: int, last_failure_at: float | None) -> float:
    """Unix time until which a peer is avoided (0 when it is not)."""
    if consecutive_failures <= 0 or last_failure_at is None:
        return 0.0
    backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (consecutive_failures - 1))
    return last_failure_at + backoff


@dataclass(frozen=True)
class PeerStanding:
    """What the local store knows of one peer, as used to choose seeds and to show `gtorrent peers`.

    `reputation` is the verification reputation R (the initial 0.5 while `verified` is False). Built by
    the store with every field; the defaults keep positional construction (tests) meaning "verified,
    with this R"."""

    peer_id: str
    reputation: float
    asks_ok: int
    asks_failed: int
    consecutive_failures: int
    avoid_until: float
    median_ttft_s: float | None
    median_tokens_per_s: float | None
    verified: bool = True  # some trusted verifier has given a verdict on it
    reliability: float = INITIAL_REPUTATION  # EWMA of this client's ask outcomes
    last_epoch: EpochConsensus | None = None  # the latest epoch with verdicts

    def avoided(self, now: float) -> bool:
        return now < self.avoid_until

    @property
    def state(self) -> State:
        return state_of(self.reputation if self.verified else None)

    @property
    def eligible(self) -> bool:
        """May get asks (and, later, forward them): trusted or not yet verified, never untrusted."""
        return self.state != "untrusted"


def rank_score(standing: PeerStanding) -> float:
    """How much an eligible seed is preferred, before load: verification and reliability together.

    An unverified seed counts as R at the threshold, the lowest a trusted seed can have, so with equal
    reliability it never ranks above a trusted one (`choice_key` breaks the tie at exactly 0.3)."""
    state = standing.state
    verification = standing.reputation if state == "trusted" else UNTRUSTED_BELOW if state == "unverified" else 0.0
    return (verification + standing.reliability) / 2


def choice_key(standing: PeerStanding | None, queue: float, now: float) -> tuple[int, float, int]:
    """Sort key for seed choice (smaller is better): eligible and not backing off first, then eligible
    ones backing off, untrusted last; within a tier the rank score discounted by load, then trusted
    before unverified."""
    if standing is None:
        standing = PeerStanding("", INITIAL_REPUTATION, 0, 0, 0, 0.0, None, None, verified=False)
    tier = 0 if standing.eligible and not standing.avoided(now) else (1 if standing.eligible else 2)
    return (tier, -rank_score(standing) / (1.0 + queue), 0 if standing.state == "trusted" else 1)
