"""Reputation rules (pure): how verdicts become a verification reputation, and which seeds get asks.

Two signals, kept apart so that neither can stand in for the other (issue 8 item 4):

- verification reputation R, from verifiers' signed verdicts only. Per model and epoch, the consensus
  C is the median of the credibilities the trusted verifiers gave the seed for that model in that
  epoch, so one lying verifier of three can neither frame an honest seed nor clear a cheater. Over
  one model's consensus C's in epoch order the paper's rule applies (shared/research/paper-notes.md
  §4.2): R starts at 0.5, R <- 0.4 R + 0.6 C, with the window punishment (W = 5, tau = 0.4,
  gamma = 0.2) and a clamp to [0, 1]. A seed judged on several models has the worst of their R's: it
  cannot launder lies about one model with honest answers about another (a verdict names its model,
  and the epochs of one model never feed another's R). The paper's 0.3 threshold applies to this R
  alone: a seed is `trusted` (R >= 0.3), `untrusted`, or `unverified` (no verdict from a trusted
  verifier yet).
- reliability, from this client's own ask outcomes: an EWMA of success (1) and failure (0). With the
  back-off after failures, it orders the eligible seeds; it never makes an untrusted seed eligible
  (the mean of the two once kept a C = 0 seed at 0.497, above the threshold) and never makes a
  trusted or unverified one ineligible (a timeout says nothing about the weights a seed serves).

Eligible (gets asks) = trusted or unverified, never untrusted. Seed choice (`choice_key`) goes by
tiers, whatever the reliability and load: trusted seeds not backing off first, then unverified ones
not backing off, then trusted ones backing off, then unverified ones backing off, untrusted last. So
an unverified seed gets a user's ask only when no trusted seed is usable: a caught cheater that
returns under a fresh identity gets no asks while honest verified seeds exist, only the verifiers'
challenges, which make it trusted or untrusted within an epoch or two. Where no verifier judges the
swarm (every seed unverified) the order is the reliability and load one, as without verification.
There is a way back: R follows the recent C's, so an untrusted seed that serves honestly again is
trusted after a few epochs (the paper's code has none).
All functions take their inputs (verdicts, clock `now`) as arguments.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
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
    def model_id(self) -> str: ...

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
    """One epoch of a seed's verdicts on one model, as trusted verifiers gave them, and what they did to R."""

    epoch: int
    credibilities: dict[str, float]  # verifier peer id -> its C for this model and epoch
    consensus: float  # the median of `credibilities`
    agreed: int  # verifiers on the consensus's side of tau (they agree the epoch was normal, or abnormal)
    reputation: float  # the seed's R after this epoch: the worst of its models' R's so far
    model_id: str = ""  # the model the verdicts judged
    model_reputation: float | None = None  # this model's own R after this epoch (None: same as `reputation`)

    @property
    def verifiers(self) -> int:
        return len(self.credibilities)


def quorum_of(verifiers: int) -> int:
    """Verdicts an epoch needs from a trusted set of this many verifiers: ⌊2N/3⌋ + 1 (paper)."""
    return (2 * verifiers) // 3 + 1 if verifiers > 0 else 1


def consensus_history(
    verdicts: Iterable[Scored], trusted_verifiers: set[str] | None = None,
    judges: Mapping[str, Collection[str]] | None = None,
) -> list[EpochConsensus]:
    """Per (epoch, model), oldest first, the median of the trusted verifiers' C and the seed's R after it.

    `trusted_verifiers`: the verifiers' peer ids this client trusts; None trusts any verifier (whoever
    can make identities can then outvote the honest ones: fine for a private swarm, not an open one).
    One verdict per verifier, model and epoch counts (the store keeps the first; here too the first
    wins). With a known trusted set an epoch of a model counts only with a quorum of ⌊2N/3⌋ + 1 of the N
    trusted verifiers that judge that model (the paper's MIN_VOTES_FRACTION): otherwise one verifier
    could frame or clear a seed alone, in epochs numbered so that no other verifier judged them. N
    counts per model, not the whole trusted set: a verifier loads one reference model and judges only
    that one, so with verifiers of two models trusted a quorum of the whole set would never be met and
    no seed would ever be judged. `judges`: model id -> the verifiers known to judge it (the store's
    verdicts on every seed, so a tracker withholding the verdicts on one seed cannot shrink N there);
    None: those in `verdicts`; the verifiers in `verdicts` always count.

    Each model has its own R (the paper's rule over that model's epochs only); an entry's `reputation`
    is the worst R over every model judged up to then, so the last entry's is the seed's R: honest
    answers about one model never lift a seed that lies about another."""
    by_key: dict[tuple[int, str], dict[str, float]] = {}
    for verdict in verdicts:
        if trusted_verifiers is not None and verdict.verifier not in trusted_verifiers:
            continue
        by_key.setdefault((verdict.epoch, verdict.model_id), {}).setdefault(verdict.verifier, verdict.credibility)
    history = []
    models: dict[str, tuple[float, list[float]]] = {}  # model id -> (its R, its window)
    judging: dict[str, set[str]] = {}  # model id -> the trusted verifiers that judge it
    for (_, model_id), scores in by_key.items():
        judging.setdefault(model_id, set()).update(scores)
    if judges is not None and trusted_verifiers is not None:
        for model_id, known in judging.items():
            known.update(v for v in judges.get(model_id, ()) if v in trusted_verifiers)
    for epoch, model_id in sorted(by_key):
        scores = by_key[(epoch, model_id)]
        if trusted_verifiers is not None and len(scores) < quorum_of(len(judging[model_id])):
            continue
        consensus = float(statistics.median(scores.values()))
        reputation, window = models.get(model_id, (INITIAL_REPUTATION, []))
        reputation, window = next_reputation(reputation, window, consensus)
        models[model_id] = (reputation, window)
        agreed = sum(1 for score in scores.values() if (score < TAU) == (consensus < TAU))
        worst = min(r for r, _ in models.values())
        history.append(EpochConsensus(epoch, dict(scores), consensus, agreed, worst, model_id, reputation))
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
    """How much a seed is preferred within its tier (`choice_key`), before load: verification and
    reliability together. An unverified seed counts as R at the threshold, the lowest a trusted seed
    can have (only its order among other unverified seeds depends on it)."""
    state = standing.state
    verification = standing.reputation if state == "trusted" else UNTRUSTED_BELOW if state == "unverified" else 0.0
    return (verification + standing.reliability) / 2


def choice_tier(standing: PeerStanding, now: float) -> int:
    """0: trusted, not backing off; 1: unverified, not backing off; 2: trusted, backing off;
    3: unverified, backing off; 4: untrusted. No reliability or load moves a seed across tiers: an
    unverified seed (a fresh identity, perhaps a caught cheater's) is asked only when no trusted seed is
    usable, and a seed backing off only when no seed is usable."""
    if not standing.eligible:
        return 4
    return (2 if standing.avoided(now) else 0) + (0 if standing.state == "trusted" else 1)


def choice_key(standing: PeerStanding | None, queue: float, now: float) -> tuple[int, float]:
    """Sort key for seed choice (smaller is better): the tier (`choice_tier`), then within a tier the
    rank score discounted by load."""
    if standing is None:
        standing = PeerStanding("", INITIAL_REPUTATION, 0, 0, 0, 0.0, None, None, verified=False)
    return (choice_tier(standing, now), -rank_score(standing) / (1.0 + queue))
