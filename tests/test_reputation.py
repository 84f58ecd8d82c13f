"""Reputation rules (pure, with the paper's constants) and the SQLite store that feeds them.

The verification reputation follows paper-notes §4.2 over the per-epoch consensus of trusted verifiers;
ask outcomes order eligible seeds and drive back-off, and never lift an untrusted seed."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from gtorrent import reputation as rep
from gtorrent.identity import Identity
from gtorrent.protocol import PeerRecord, Verdict
from gtorrent.store import DB_NAME, Store


@dataclass(frozen=True)
class Scored:
    verifier: str
    epoch: int
    credibility: float
    model_id: str = "m"


def epochs(*scores: float, verifier: str = "v1") -> list[Scored]:
    return [Scored(verifier, epoch, score) for epoch, score in enumerate(scores)]


# ------------------------------------------------------------------ the paper's rule, its worked numbers


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([], 0.5),
        ([0.2], 0.300),  # paper-notes §4.2: 0.5 -> 0.300 -> 0.191
        ([0.2, 0.2], 0.191),
        ([0.7], 0.62),  # honest: 0.62 -> 0.668 -> 0.687
        ([0.7, 0.7], 0.668),
        ([0.7, 0.7, 0.7], 0.687),
    ],
)
def test_paper_reputation_rule(scores: list[float], expected: float) -> None:
    assert rep.verification_reputation(scores) == pytest.approx(expected, abs=1e-3)


def test_constants_are_the_papers() -> None:
    assert (rep.ALPHA, rep.BETA, rep.WINDOW, rep.TAU, rep.GAMMA) == (0.4, 0.6, 5, 0.4, 0.2)
    assert (rep.INITIAL_REPUTATION, rep.UNTRUSTED_BELOW) == (0.5, 0.3)


@pytest.mark.parametrize(
    ("abnormal", "factor"), [(1, 0.5), (2, 0.353), (3, 0.273), (4, 0.222), (5, 0.188), (6, 0.162)]
)
def test_punishment_factors(abnormal: int, factor: float) -> None:
    # paper-notes §4.2 [Derived]: 6/(7 + 5c) for W = 5
    assert rep.punishment_weight(abnormal) == pytest.approx(factor, abs=1e-3)


def test_punishment_applies_when_window_is_abnormal() -> None:
    # one abnormal epoch out of one: c = 1, fraction 1 > 0.2 -> factor 6/(5 + 5 + 2) = 0.5
    assert rep.verification_reputation([0.3]) == pytest.approx(0.4 * 0.5 + 0.5 * 0.3)
    # a window of five normal epochs then one abnormal: c = 1 of 5, 0.2 is not > 0.2 -> beta
    before = rep.verification_reputation([0.9] * 5)
    assert rep.verification_reputation([0.9] * 5 + [0.35]) == pytest.approx(0.4 * before + 0.6 * 0.35)
    # c counts the window and the current epoch, so it reaches W + 1
    reputation, window = rep.next_reputation(0.5, [0.1] * 5, 0.1)
    assert window == [0.1] * 5 and reputation == pytest.approx(0.4 * 0.5 + rep.punishment_weight(6) * 0.1)


def test_reputation_is_clamped() -> None:
    assert rep.verification_reputation([1.0] * 50) <= 1.0
    assert rep.verification_reputation([0.0] * 50) >= 0.0


def test_low_scorer_is_untrusted_after_the_second_epoch() -> None:
    history = rep.consensus_history(epochs(0.2, 0.2, 0.2))
    assert [rep.state_of(e.reputation) for e in history] == ["trusted", "untrusted", "untrusted"]


def test_way_back_for_a_fixed_seed() -> None:
    # the paper's code has none: here R follows the recent consensus, so honest epochs earn trust back
    history = rep.consensus_history(epochs(0.0, 0.0, 0.0, *[0.9] * 3))
    assert rep.state_of(history[2].reputation) == "untrusted"
    assert rep.state_of(history[-1].reputation) == "trusted"


# ------------------------------------------------------------------ consensus of several verifiers


def test_median_consensus_one_liar_of_three_frames_no_one() -> None:
    honest = [Scored(v, 0, 0.8) for v in ("a", "b")] + [Scored(v, 1, 0.8) for v in ("a", "b")]
    liar = [Scored("liar", 0, 0.0), Scored("liar", 1, 0.0)]
    history = rep.consensus_history(honest + liar)
    assert [e.consensus for e in history] == [0.8, 0.8]
    assert [(e.agreed, e.verifiers) for e in history] == [(2, 3), (2, 3)]
    assert rep.state_of(history[-1].reputation) == "trusted"
    # nor can a lying verifier clear a cheater
    cheat = [Scored(v, e, 0.05) for v in ("a", "b") for e in (0, 1)] + [Scored("liar", e, 1.0) for e in (0, 1)]
    assert rep.state_of(rep.consensus_history(cheat)[-1].reputation) == "untrusted"


def test_one_verifier_cannot_frame_or_clear_alone_in_epochs_no_one_else_judged() -> None:
    """A trusted verifier of three that signs verdicts for epoch numbers the others never used would,
    without a quorum, be the whole consensus of those epochs. An epoch counts with ⌊2N/3⌋ + 1 of the
    trusted verifiers (the paper's vote fraction)."""
    trusted = {"a", "b", "liar"}
    honest = [Scored(v, e, 0.9) for v in trusted for e in range(10)]
    framing = [Scored("liar", 10**9 + e, 0.0) for e in range(4)]
    history = rep.consensus_history(honest + framing, trusted_verifiers=trusted)
    assert [e.epoch for e in history] == list(range(10)) and rep.state_of(history[-1].reputation) == "trusted"
    cheater = [Scored(v, e, 0.0) for v in ("a", "b") for e in range(10)] + [Scored("liar", e, 0.0) for e in range(10)]
    clearing = [Scored("liar", 10**9 + e, 1.0) for e in range(6)]
    history = rep.consensus_history(cheater + clearing, trusted_verifiers=trusted)
    assert rep.state_of(history[-1].reputation) == "untrusted"
    assert [rep.quorum_of(n) for n in (1, 2, 3, 4, 6, 10)] == [1, 2, 3, 3, 5, 7]


def test_only_trusted_verifiers_count_and_first_verdict_wins() -> None:
    verdicts = [Scored("a", 0, 0.9), Scored("x", 0, 0.0), Scored("a", 0, 0.1)]
    (only,) = rep.consensus_history(verdicts, trusted_verifiers={"a"})
    assert only.credibilities == {"a": 0.9} and only.consensus == 0.9
    assert rep.consensus_history(verdicts, trusted_verifiers=set()) == []
    assert rep.consensus_history(verdicts)[0].credibilities == {"a": 0.9, "x": 0.0}


def test_epochs_apply_in_epoch_order_not_arrival_order() -> None:
    shuffled = [Scored("a", 2, 0.2), Scored("a", 0, 0.7), Scored("a", 1, 0.7)]
    history = rep.consensus_history(shuffled)
    assert [e.epoch for e in history] == [0, 1, 2]
    assert history[-1].reputation == pytest.approx(rep.verification_reputation([0.7, 0.7, 0.2]))


# ------------------------------------------------------------------ states, eligibility, choice


def standing(reputation: float = 0.5, *, verified: bool = True, reliability: float = 0.5, failures: int = 0,
             avoid_until: float = 0.0, peer_id: str = "p") -> rep.PeerStanding:
    return rep.PeerStanding(peer_id, reputation, 0, failures, failures, avoid_until, None, None,
                            verified=verified, reliability=reliability)


def test_states_and_eligibility() -> None:
    assert standing(0.3).state == "trusted" and standing(0.3).eligible
    assert standing(0.29).state == "untrusted" and not standing(0.29).eligible
    assert standing(verified=False).state == "unverified" and standing(verified=False).eligible
    assert rep.state_of(None) == "unverified"


def test_ask_outcomes_never_lift_an_untrusted_seed() -> None:
    # regression: reputation was the mean of verification and reliability, so a seed verified at C = 0
    # that answered 20 asks scored (0 + 0.994) / 2 = 0.497 and stayed trusted
    cheater = standing(rep.verification_reputation([0.0] * 10), reliability=rep.reliability_from_outcomes([True] * 20))
    assert cheater.reliability > 0.99 and cheater.state == "untrusted" and not cheater.eligible
    assert rep.choice_key(cheater, 0, 0.0)[0] == 4  # last, behind even a backing-off seed
    # and ask failures never make a trusted seed ineligible: they only delay it (back-off)
    flaky = standing(0.9, reliability=rep.reliability_from_outcomes([False] * 20), failures=20, avoid_until=1e12)
    assert flaky.eligible and rep.choice_key(flaky, 0, 0.0)[0] == 2
    assert rep.choice_key(flaky, 0, 0.0) < rep.choice_key(cheater, 0, 0.0)


def test_choice_prefers_usable_reputable_idle() -> None:
    now = time.time()
    good = standing(0.8, reliability=0.9)
    avoided = standing(0.9, reliability=0.9, failures=1, avoid_until=1e12)
    untrusted = standing(0.1, reliability=0.9)
    assert rep.choice_key(good, 0, now) < rep.choice_key(avoided, 0, now) < rep.choice_key(untrusted, 0, now)
    assert rep.choice_key(good, 0, now) < rep.choice_key(good, 3, now)
    assert rep.choice_key(None, 0, now) < rep.choice_key(avoided, 0, now)


def test_unverified_ranks_below_trusted_of_the_same_standing() -> None:
    now = time.time()
    for reliability in (0.2, 0.5, 0.99):
        for reputation in (0.3, 0.5, 0.9):
            trusted = standing(reputation, reliability=reliability)
            unverified = standing(verified=False, reliability=reliability)
            assert rep.choice_key(trusted, 0, now) < rep.choice_key(unverified, 0, now)
    assert rep.choice_key(standing(verified=False), 0, now) == rep.choice_key(None, 0, now)


def test_unverified_seed_gets_asks_only_when_no_trusted_seed_is_usable() -> None:
    """A caught cheater back under a fresh identity is unverified, idle and, by its own doing, perfectly
    reliable; an honest verified seed is busy and has failed a few asks. On HEAD the rank score
    discounted by load put the fresh identity first; a tier keeps it behind every usable trusted seed."""
    now = 1000.0
    honest = standing(0.31, reliability=0.1)  # barely trusted, unreliable of late, with a long queue
    fresh = standing(verified=False, reliability=1.0)
    assert rep.choice_key(honest, 20, now) < rep.choice_key(fresh, 0, now)
    # a trusted seed backing off is not usable: then the unverified one is asked, before any seed backing off
    backing_off = standing(0.9, reliability=0.9, failures=1, avoid_until=now + 10)
    fresh_backing_off = standing(verified=False, reliability=1.0, failures=1, avoid_until=now + 10)
    untrusted = standing(0.1, reliability=1.0)
    order = [honest, fresh, backing_off, fresh_backing_off, untrusted]
    keys = [rep.choice_key(s, 0, now) for s in order]
    assert keys == sorted(keys) and [rep.choice_tier(s, now) for s in order] == [0, 1, 2, 3, 4]
    # no verifier at all (every seed unverified): reliability and load order them, as without verification
    a, b = standing(verified=False, reliability=0.9), standing(verified=False, reliability=0.4)
    assert rep.choice_key(a, 0, now) < rep.choice_key(b, 0, now) and rep.choice_key(b, 0, now) < rep.choice_key(a, 9, now)


def test_a_seed_is_as_bad_as_its_worst_model() -> None:
    """Verdicts name a model; each model has its own R and the seed's is the worst. On HEAD the verdicts
    of two models for one epoch were merged as if one verifier had judged one thing (first wins), so
    honest answers about one model could hide lies about another."""
    lies = [Scored("v", e, 0.0, model_id="big") for e in range(4)]
    honest = [Scored("v", e, 1.0, model_id="demo") for e in range(4)]
    for verdicts in (honest + lies, lies + honest):  # whichever arrives first
        history = rep.consensus_history(verdicts)
        assert len(history) == 8 and {e.model_id for e in history} == {"big", "demo"}
        assert rep.state_of(history[-1].reputation) == "untrusted"
        by_model = {e.model_id: e.model_reputation for e in history[-2:]}
        assert by_model["demo"] == pytest.approx(rep.verification_reputation([1.0] * 4))
        assert by_model["big"] == pytest.approx(rep.verification_reputation([0.0] * 4))
        assert history[-1].reputation == by_model["big"]
    # one model's epochs never feed another's R: an honest model judged later does not lift the seed
    history = rep.consensus_history(lies[:2] + [Scored("v", e, 1.0, model_id="demo") for e in range(2, 10)])
    assert rep.state_of(history[-1].reputation) == "untrusted"
    # and the quorum counts per (model, epoch), over the trusted verifiers that judge that model
    trusted = {"a", "b", "c"}
    split = [Scored("a", 0, 0.9, "x"), Scored("b", 0, 0.9, "y"), Scored("c", 0, 0.9, "x")]
    assert [(e.model_id, e.verifiers) for e in rep.consensus_history(split, trusted_verifiers=trusted)] == [
        ("x", 2), ("y", 1)]
    # b is known (judges) to judge x too: 3 judges of x, an epoch of x needs all 3
    judges = {"x": {"a", "b", "c"}, "y": {"b"}}
    assert [e.model_id for e in rep.consensus_history(split, trusted_verifiers=trusted, judges=judges)] == ["y"]
    full = split + [Scored("b", 0, 0.9, "x")]
    assert [(e.model_id, e.verifiers) for e in rep.consensus_history(full, trusted_verifiers=trusted,
                                                                    judges=judges)] == [("x", 3), ("y", 1)]


def test_verifiers_of_different_models_are_no_quorum_of_each_other() -> None:
    """Review fix: each verifier judges the one model it loaded. On HEAD an epoch needed ⌊2N/3⌋ + 1 of the
    whole trusted set, so with one verifier per model (N = 2, quorum 2) no epoch ever counted and a
    cheater judged C = 0 every epoch stayed unverified, eligible for asks."""
    trusted = {"vx", "vy"}
    cheater = [Scored("vx", e, 0.0, "x") for e in range(4)]
    judges = {"x": {"vx"}, "y": {"vy"}}
    for given in (None, judges):
        history = rep.consensus_history(cheater, trusted_verifiers=trusted, judges=given)
        assert len(history) == 4 and rep.state_of(history[-1].reputation) == "untrusted"
    # judges name only trusted verifiers' weight: an untrusted one known to judge x raises no quorum
    history = rep.consensus_history(cheater, trusted_verifiers=trusted, judges={"x": {"vx", "stranger"}})
    assert len(history) == 4


def test_fresh_unverified_records_do_not_outweigh_a_verified_seed_for_a_name() -> None:
    """Choosing the model id for a name (asker.resolve_model) counts verified trust only: on HEAD an
    unverified record added its initial 0.5 to the sum, so three fresh identities (1.5) outweighed an
    honest seed verified at R = 0.9."""
    from gtorrent.asker import resolve_model
    from gtorrent.protocol import ModelInfo

    def seed(model_id: str, port: int) -> PeerRecord:
        return PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{port}", roles=("seed",),
                               models=(ModelInfo(model_id, "gtorrent-demo", 512),), seq=1, expires=time.time() + 60)

    honest = seed("1" * 64, 9001)
    fresh = [seed("2" * 64, 9002 + i) for i in range(3)]

    def standing_of(peer_id: str) -> rep.PeerStanding:
        if peer_id == honest.peer_id:
            return standing(0.9, peer_id=peer_id)
        return standing(verified=False, peer_id=peer_id)

    choice = resolve_model([*fresh, honest], "gtorrent-demo", standing_of)
    assert choice.model_id == "1" * 64 and choice.rivals == [("2" * 64, "gtorrent-demo", 3)]
    # with no verifier anywhere, numbers decide as before
    choice = resolve_model([*fresh, honest], "gtorrent-demo", lambda peer_id: standing(verified=False, peer_id=peer_id))
    assert choice.model_id == "2" * 64


def test_store_standing_is_the_worst_model(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    verifier, seed = Identity.generate(), Identity.generate().peer_id
    for epoch in range(3):
        store.add_verdicts([
            Verdict.sign(verifier, seed=seed, model_id=model_id, epoch=epoch, credibility=score, challenges=3,
                         evidence="cd" * 32)
            for model_id, score in (("aa" * 32, 1.0), ("bb" * 32, 0.0))
        ])
    held = store.standing(seed)
    assert held.state == "untrusted" and not held.eligible
    store.close()


def test_reliability_ewma_and_backoff() -> None:
    assert rep.reliability_from_outcomes([]) == 0.5
    assert rep.reliability_from_outcomes([True] * 10) > 0.9
    assert rep.reliability_from_outcomes([False] * 10) < 0.1
    assert rep.avoid_until(0, 100.0) == 0.0
    assert rep.avoid_until(1, 100.0) == 100.0 + rep.BACKOFF_BASE_S
    assert rep.avoid_until(2, 100.0) == 100.0 + 2 * rep.BACKOFF_BASE_S
    assert rep.avoid_until(30, 100.0) == 100.0 + rep.BACKOFF_MAX_S


# ------------------------------------------------------------------ the store


def signed(identity: Identity) -> PeerRecord:
    return PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), seq=1, expires=time.time() + 60)


def test_store_migrates_once_wal_and_survives_reopen(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    peer = Identity.generate()
    store.saw_peers([signed(peer)], now=10.0)
    store.observe(peer.peer_id, "ok", ttft_s=0.1, tokens_per_s=50.0, now=11.0)
    store.close()
    again = Store.open(tmp_path)
    assert again.db.execute("pragma journal_mode").fetchone()[0] == "wal"
    applied = [name for (name,) in again.db.execute("select name from _sqlite_migrations order by rowid").fetchall()]
    assert applied == ["m001_peers_and_observations", "m002_verdicts", "m003_guards", "m004_signed_verdicts",
                       "m005_verdicts_per_model", "m006_verdict_judges"]
    assert [r.peer_id for r in again.known_records()] == [peer.peer_id]
    assert again.standing(peer.peer_id).asks_ok == 1
    again.saw_peers([signed(peer)], now=20.0)
    row = again.db["peers"].get(peer.peer_id)
    assert row["first_seen"] == 10.0 and row["last_seen"] == 20.0
    again.close()
    # readable by plain sqlite3 too: nothing exotic on disk
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("select count(*) from observations").fetchone()[0] == 1


def test_failures_are_avoided_then_forgiven(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    peer = Identity.generate().peer_id
    store.observe(peer, "ok", now=100.0)
    store.observe(peer, "timeout", now=200.0)
    store.observe(peer, "failed", now=201.0)
    held = store.standing(peer)
    assert held.consecutive_failures == 2 and held.asks_failed == 2 and held.asks_ok == 1
    assert held.avoided(210.0) and not held.avoided(201.0 + 2 * rep.BACKOFF_BASE_S + 1)
    assert held.state == "unverified" and held.eligible  # failures delay a seed; only verdicts untrust it
    store.observe(peer, "ok", now=300.0)
    forgiven = store.standing(peer)
    assert forgiven.consecutive_failures == 0 and not forgiven.avoided(300.0)
    assert forgiven.reliability < rep.reliability_from_outcomes([True, True, True, True])
    with pytest.raises(ValueError):
        store.observe(peer, "exploded")
    store.close()


def verdict(verifier: Identity, seed: str, epoch: int, credibility: float) -> Verdict:
    return Verdict.sign(verifier, seed=seed, model_id="ab" * 32, epoch=epoch, credibility=credibility, challenges=3,
                        evidence="cd" * 32)


def test_store_standing_c0_seed_with_good_asks_is_untrusted(tmp_path: Path) -> None:
    # the store-level regression: on HEAD, standing() = mean(quality, reliability) = 0.497 -> trusted
    store = Store.open(tmp_path)
    verifier, seed = Identity.generate(), Identity.generate().peer_id
    store.add_verdicts([verdict(verifier, seed, epoch, 0.0) for epoch in range(10)])
    for at in range(20):
        store.observe(seed, "ok", now=float(at))
    held = store.standing(seed)
    assert held.verified and held.reputation < 0.01 and held.reliability > 0.99
    assert held.state == "untrusted" and not held.eligible
    assert held.last_epoch is not None and held.last_epoch.epoch == 9 and held.last_epoch.consensus == 0.0
    store.close()


def test_store_trusts_only_the_verifiers_named(tmp_path: Path) -> None:
    liar, honest, seed = Identity.generate(), Identity.generate(), Identity.generate().peer_id
    store = Store.open(tmp_path)
    store.add_verdicts([verdict(liar, seed, epoch, 0.0) for epoch in range(3)])
    assert store.standing(seed).state == "untrusted"  # None: any verifier counts
    store.close()
    picky = Store.open(tmp_path, trusted_verifiers={honest.peer_id})
    assert picky.standing(seed).state == "unverified"  # the liar's verdicts are kept but do not count
    picky.add_verdicts([verdict(honest, seed, epoch, 0.9) for epoch in range(3)])
    assert picky.standing(seed).state == "trusted"
    assert len(picky.verdicts(seed)) == 6
    picky.close()
