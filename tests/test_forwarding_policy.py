"""The routing policy of a model group (gtorrent/forwarding.py): table-driven, no sockets."""

from __future__ import annotations

import pytest

from gtorrent.forwarding import DEFAULT_POLICY, POLICIES, LbFactor, Member, choose, percentile_lb
from gtorrent.runtime.prefix_cache import PrefixSummary, chunk_hashes

PROMPT = list(range(100, 160))  # 6 chunks
DIGESTS = chunk_hashes(PROMPT)
OTHER = chunk_hashes(list(range(900, 960)))


def held(depth: int, digests: list[bytes] = DIGESTS) -> PrefixSummary:
    return PrefixSummary(frozenset(digests[:depth]))


def member(peer_id: str, depth: int = 0, lb: float = 1.0, queue: int = 0, trusted: bool = True) -> Member:
    return Member(peer_id, held(depth), lb, queue, trusted)


def test_policy_names_are_the_contract() -> None:
    assert POLICIES == ("off", "rr", "least-load", "tree", "tree+lb")
    assert DEFAULT_POLICY == "tree+lb"
    with pytest.raises(ValueError):
        choose("random", DIGESTS, [member("a")], "a", turn=0)


def test_lb_factor_is_an_ewma_of_weight_one_eighth() -> None:
    lb = LbFactor()
    assert lb.value == 0.0
    lb.add(2.0)
    assert lb.value == 2.0  # the first sample as it is
    lb.add(10.0)
    assert lb.value == pytest.approx(2.0 * 7 / 8 + 10.0 / 8)
    lb.add(float("nan"))  # ignored, never poisons the factor
    assert lb.value == pytest.approx(3.0)


def test_off_always_serves_here() -> None:
    members = [member("self", 0, lb=9.0), member("b", 6, lb=0.1)]
    assert choose("off", DIGESTS, members, "self", turn=3) == "self"


def test_round_robin_cycles_over_eligible_members_in_id_order() -> None:
    members = [member("c"), member("self"), member("a"), member("bad", trusted=False)]
    picks = [choose("rr", DIGESTS, members, "self", turn=t) for t in range(6)]
    assert picks == ["a", "c", "self", "a", "c", "self"]


def test_least_load_goes_by_queue_then_lb_and_prefers_self_on_ties() -> None:
    members = [member("self", queue=2, lb=1.0), member("b", queue=1, lb=5.0), member("c", queue=1, lb=2.0)]
    assert choose("least-load", DIGESTS, members, "self", turn=0) == "c"
    tied = [member("self", queue=1, lb=2.0), member("a", queue=1, lb=2.0)]
    assert choose("least-load", DIGESTS, tied, "self", turn=0) == "self"


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        # a hit: the deepest match wins whatever its LB factor
        ([member("self", 0, lb=0.5), member("b", 4, lb=3.0), member("c", 2, lb=1.0)], "b"),
        # deepest ties go by LB factor
        ([member("self", 0, lb=0.5), member("b", 4, lb=3.0), member("c", 4, lb=1.0)], "c"),
        # ties with self stay here
        ([member("self", 4, lb=1.0), member("b", 4, lb=1.0)], "self"),
        # a miss: the lowest LB factor
        ([member("self", 0, lb=2.0), member("b", 0, lb=1.0)], "b"),
    ],
)
def test_tree_takes_the_longest_match(members: list[Member], expected: str) -> None:
    assert choose("tree", DIGESTS, members, "self", turn=0) == expected


def test_tree_lb_takes_the_hit_member_when_not_overloaded() -> None:
    members = [member("self", 0, lb=1.0), member("b", 5, lb=1.5), member("c", 0, lb=1.2), member("d", 0, lb=2.0),
               member("e", 0, lb=2.5)]
    assert choose("tree+lb", DIGESTS, members, "self", turn=0) == "b"


def test_tree_lb_steps_down_to_a_shorter_prefix_when_the_hit_member_is_overloaded() -> None:
    # b holds 5 chunks but is the slowest (above the 80th percentile); c holds 3 of them and is not
    members = [member("self", 0, lb=1.0), member("b", 5, lb=9.0), member("c", 3, lb=2.0), member("d", 0, lb=1.5),
               member("e", 0, lb=1.1)]
    assert percentile_lb(members) == 2.0
    assert choose("tree+lb", DIGESTS, members, "self", turn=0) == "c"


def test_tree_lb_falls_back_to_the_lowest_lb_when_every_hit_member_is_overloaded() -> None:
    members = [member("self", 0, lb=1.0), member("b", 5, lb=9.0), member("d", 0, lb=0.7), member("e", 0, lb=1.1),
               member("f", 0, lb=1.2)]
    assert choose("tree+lb", DIGESTS, members, "self", turn=0) == "d"


def test_tree_lb_on_a_miss_takes_the_lowest_lb() -> None:
    members = [member("self", 0, lb=1.0), member("b", 0, lb=0.4), Member("c", held(6, OTHER), 0.2, 0)]
    assert choose("tree+lb", DIGESTS, members, "self", turn=0) == "c"


def test_members_without_samples_never_count_as_overloaded() -> None:
    # one factor with data only: no percentile, the hit member is taken
    members = [member("self", 0, lb=0.0), member("b", 3, lb=7.0)]
    assert percentile_lb(members) is None
    assert choose("tree+lb", DIGESTS, members, "self", turn=0) == "b"


@pytest.mark.parametrize("policy", POLICIES)
def test_untrusted_members_are_never_targets(policy: str) -> None:
    members = [member("self", 0, lb=5.0, queue=9), member("bad", 6, lb=0.1, queue=0, trusted=False)]
    for turn in range(4):
        assert choose(policy, DIGESTS, members, "self", turn=turn) == "self"


def test_an_untrusted_hit_falls_back_to_trusted_members() -> None:
    members = [member("self", 0, lb=5.0), member("bad", 6, lb=0.1, trusted=False), member("c", 2, lb=1.0)]
    assert choose("tree+lb", DIGESTS, members, "self", turn=0) == "c"


def test_alone_or_absent_from_members_serves_here() -> None:
    for policy in POLICIES:
        assert choose(policy, DIGESTS, [], "self", turn=1) == "self"
        assert choose(policy, DIGESTS, [member("self", 3)], "self", turn=1) == "self"
