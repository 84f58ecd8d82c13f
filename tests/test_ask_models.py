"""Which model id a name means: the one the most trusted seeds serve, so that one record squatting on
a name can neither break asks nor take them, and the asker is told about rival claims."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest

from gtorrent.asker import NoSeedError, resolve_model
from gtorrent.discovery import announce_all
from gtorrent.identity import Identity
from gtorrent.protocol import ModelInfo, PeerRecord
from gtorrent.reputation import PeerStanding
from gtorrent.transport import new_context

from .procs import start_seed, start_tracker
from .test_swarm import PROMPT, local_greedy

pytestmark = pytest.mark.timeout(120)

REAL, SQUAT, OTHER = "1" * 64, "2" * 64, "3" * 64


_ports = itertools.count(20000)


def seed(model_id: str, name: str = "gtorrent-demo", port: int = 0, identity: Identity | None = None) -> PeerRecord:
    """A seed record; each on an endpoint of its own unless `port` is given (same endpoint: same node)."""
    return PeerRecord.sign(identity or Identity.generate(), endpoint=f"tcp://127.0.0.1:{port or next(_ports)}",
                           roles=("seed",), models=(ModelInfo(model_id, name, 512),), seq=1, expires=time.time() + 60)


def standings(reputations: dict[str, float]):  # type: ignore[no-untyped-def]
    def standing(peer_id: str) -> PeerStanding:
        return PeerStanding(peer_id, reputations.get(peer_id, 0.5), 0, 0, 0, 0.0, None, None)

    return standing


def test_one_squatting_record_does_not_take_the_name() -> None:
    real = [seed(REAL), seed(REAL)]
    squatter = seed(SQUAT)
    for wanted in (None, "gtorrent-demo"):
        choice = resolve_model([squatter, *real], wanted, standings({}))
        assert choice.model_id == REAL and choice.name == "gtorrent-demo" and len(choice.seeds) == 2
        assert choice.rivals == [(SQUAT, "gtorrent-demo", 1)]
    # an id (or a long enough prefix) is exact: no rivals
    assert resolve_model([squatter, *real], SQUAT, standings({})).model_id == SQUAT
    assert resolve_model([squatter, *real], REAL[:8], standings({})).rivals == []


def test_trust_weighs_before_numbers() -> None:
    trusted = [seed(REAL), seed(REAL)]
    many = [seed(SQUAT) for _ in range(3)]
    reputations = {r.peer_id: 0.9 for r in trusted} | {r.peer_id: 0.35 for r in many}
    assert resolve_model([*many, *trusted], "gtorrent-demo", standings(reputations)).model_id == REAL
    # untrusted seeds (below 0.3) back nothing, however many
    untrusted = [seed(SQUAT) for _ in range(10)]
    reputations = {r.peer_id: 0.1 for r in untrusted}
    choice = resolve_model([*untrusted, trusted[0]], "gtorrent-demo", standings(reputations))
    assert choice.model_id == REAL and choice.rivals == [(SQUAT, "gtorrent-demo", 0)]
    # equal trust: more seeds win
    assert resolve_model([seed(SQUAT), seed(REAL), seed(REAL)], None, standings({})).model_id == REAL


def test_copies_of_one_machine_back_a_model_once() -> None:
    """Records that copy one endpoint (or keys) under fresh peer ids are one node: ten copies of a
    squatter do not outweigh two real seeds."""
    real = [seed(REAL), seed(REAL)]
    copies = [seed(SQUAT, port=1) for _ in range(10)]
    choice = resolve_model([*copies, *real], "gtorrent-demo", standings({}))
    assert choice.model_id == REAL and choice.rivals == [(SQUAT, "gtorrent-demo", 1)]
    # the same with keys copied instead of the endpoint: one identity's keys under many signing keys
    victim = Identity.generate()
    keyed = [
        PeerRecord.sign(Identity.generate(), endpoint=f"tcp://127.0.0.1:{30000 + i}", roles=("seed",),
                        models=(ModelInfo(SQUAT, "gtorrent-demo", 512),), seq=1, expires=time.time() + 60,
                        onion_key=victim.onion_public)
        for i in range(10)
    ]
    assert resolve_model([*keyed, *real], "gtorrent-demo", standings({})).model_id == REAL


def test_without_a_name_another_model_does_not_break_the_ask() -> None:
    choice = resolve_model([seed(OTHER, "other-model"), seed(REAL), seed(REAL)], None, standings({}))
    assert choice.model_id == REAL and choice.rivals == [(OTHER, "other-model", 1)] and choice.wanted is None
    with pytest.raises(NoSeedError, match="no seed serves model 'nope'"):
        resolve_model([seed(REAL)], "nope", standings({}))


def test_ask_without_model_survives_a_squatter(tmp_path: Path) -> None:
    from .test_swarm import run_cli

    tracker, url = start_tracker(tmp_path / "tracker")
    seeds = [start_seed(tmp_path / f"seed{i}", [url]) for i in range(2)]
    try:
        squatter = seed(SQUAT, port=1)

        async def announce() -> dict[str, str]:
            ctx = new_context()
            try:
                return await announce_all(ctx, [url], squatter)
            finally:
                ctx.destroy(linger=0)

        assert asyncio.run(announce()) == {}
        done = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "6", "--direct", "--tracker", url)
        assert done.returncode == 0, done.stderr
        assert done.stdout == local_greedy(6) + "\n"
        real_id = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "1", "--direct", "--json", "--tracker", url)
        import json

        doc = json.loads(real_id.stdout)
        assert doc["model_id"] != SQUAT
        # stderr says which id was chosen, and that another claims the name
        assert doc["model_id"][:12] in done.stderr and SQUAT[:12] in done.stderr
        named = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "6", "--model", "gtorrent-demo", "--direct",
                        "--tracker", url)
        assert named.returncode == 0 and named.stdout == done.stdout
        assert "claimed by several model ids" in named.stderr
    finally:
        for proc, _ in seeds:
            proc.kill()
        tracker.kill()


def test_many_squatting_records_cost_attempts_not_the_ask(tmp_path: Path) -> None:
    """Nine fresh records (separate endpoints, nothing listening) claim `gtorrent-demo` with another id:
    they outnumber the two real seeds and win the choice for a peer with no history. The ask still
    answers: the chosen id gets two attempts, then the real id; after that the seeds this peer has seen
    answer outweigh any number of fresh records."""
    import json

    from .test_swarm import run_cli

    tracker, url = start_tracker(tmp_path / "tracker")
    seeds = [start_seed(tmp_path / f"seed{i}", [url]) for i in range(2)]
    try:
        squatters = [seed(SQUAT, port=2 + i) for i in range(9)]

        async def announce() -> list[dict[str, str]]:
            ctx = new_context()
            try:
                return [await announce_all(ctx, [url], record) for record in squatters]
            finally:
                ctx.destroy(linger=0)

        assert all(errors == {} for errors in asyncio.run(announce()))
        first = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "6", "--direct", "--json", "--tracker", url,
                        timeout_s=90)
        assert first.returncode == 0, first.stderr
        doc = json.loads(first.stdout)
        assert doc["model_id"] != SQUAT and doc["text"] == local_greedy(6)
        assert [f["model_id"] for f in doc["failures"]] == [SQUAT, SQUAT]  # two attempts on the squatted id
        again = run_cli(tmp_path / "asker", "ask", PROMPT, "-n", "6", "--direct", "--json", "--tracker", url)
        assert again.returncode == 0, again.stderr
        doc = json.loads(again.stdout)
        assert doc["model_id"] != SQUAT and doc["failures"] == []  # proven seeds now outweigh the nine
    finally:
        for proc, _ in seeds:
            proc.kill()
        tracker.kill()
