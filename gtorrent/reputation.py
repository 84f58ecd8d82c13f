"""Reputation rules (pure): how observations and verdicts become a score, and when to avoid a peer.

Two signals, each starting at the paper's initial reputation 0.5:

- quality, from verification verdicts (credibility C per epoch), by the paper's rule:
  R <- 0.4 R + 0.6 C, with the sliding-window punishment when more than 1 in 5 of the recent epochs
  scored below 0.4 (shared/research/paper-notes.md §4.2);
- reliability, from this client's own ask outcomes: an EWMA of success (1) and failure (0), gentler
  than the verdict rule because a single timeout says little about a seed.

reputation = mean of the two; a peer below 0.3 is untrusted and gets no asks. A peer that just failed
is also avoided for a while (exponential back-off by consecutive failures) and forgiven by a success.
All functions take their clock (`now`) as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ALPHA = 0.4  # weight of the previous reputation (paper)
BETA = 0.6  # weight of the epoch's credibility (paper)
WINDOW = 5  # epochs remembered for punishment (paper)
TAU = 0.4  # an epoch below this is abnormal (paper)
GAMMA = 0.2  # punish when more than this fraction is abnormal (paper)
INITIAL_REPUTATION = 0.5  # paper
UNTRUSTED_BELOW = 0.3  # paper
RELIABILITY_WEIGHT = 0.2  # EWMA weight of one ask outcome
BACKOFF_BASE_S = 15.0  # avoid for 15 s after one failure, doubling per further failure
BACKOFF_MAX_S = 600.0


def clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def quality_from_verdicts(credibilities: Sequence[float]) -> float:
    """The paper's reputation after epochs with these mean credibilities (oldest first)."""
    reputation = INITIAL_REPUTATION
    window: list[float] = []
    for credibility in credibilities:
        abnormal = sum(1 for score in window if score < TAU) + (1 if credibility < TAU else 0)
        window = (window + [credibility])[-WINDOW:]
        if abnormal / len(window) > GAMMA:
            weight = (WINDOW + 1) / (WINDOW + abnormal / GAMMA + 2)
        else:
            weight = BETA
        reputation = clamp(ALPHA * reputation + weight * credibility)
    return reputation


def reliability_from_outcomes(successes: Iterable[bool]) -> float:
    """EWMA of ask outcomes (oldest first), starting at the initial reputation."""
    value = INITIAL_REPUTATION
    for ok in successes:
        value = (1 - RELIABILITY_WEIGHT) * value + RELIABILITY_WEIGHT * (1.0 if ok else 0.0)
    return value


def combined(quality: float, reliability: float) -> float:
    return clamp((quality + reliability) / 2)


def trusted(reputation: float) -> bool:
    return reputation >= UNTRUSTED_BELOW


def avoid_until(consecutive_failures: int, last_failure_at: float | None) -> float:
    """Unix time until which a peer is avoided (0 when it is not)."""
    if consecutive_failures <= 0 or last_failure_at is None:
        return 0.0
    backoff = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (consecutive_failures - 1))
    return last_failure_at + backoff


@dataclass(frozen=True)
class PeerStanding:
    """What the local store knows of one peer, as used to choose seeds and to show `gtorrent peers`."""

    peer_id: str
    reputation: float
    asks_ok: int
    asks_failed: int
    consecutive_failures: int
    avoid_until: float
    median_ttft_s: float | None
    median_tokens_per_s: float | None

    def avoided(self, now: float) -> bool:
        return now < self.avoid_until

    @property
    def trusted(self) -> bool:
        return trusted(self.reputation)


def choice_key(standing: PeerStanding | None, queue: float, now: float) -> tuple[int, float]:
    """Sort key for seed choice (smaller is better): usable first, then reputation discounted by load."""
    if standing is None:
        return (0, -INITIAL_REPUTATION / (1.0 + queue))
    tier = 0 if standing.trusted and not standing.avoided(now) else (1 if standing.trusted else 2)
    return (tier, -standing.reputation / (1.0 + queue))
