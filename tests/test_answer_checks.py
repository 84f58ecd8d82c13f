"""What an asker checks of a finished answer beyond its signature: an end a whole answer has (a seed
must not pass an answer cut short off as whole), and every sampled ask carries a sampling seed, so a
verifier can replay a seed's sampled answer exactly (runtime/score.py)."""

from __future__ import annotations

import time

import pytest

from gtorrent.asker import AnswerSink, AskRequest, SeedFailed, check_answer, generate_body
from gtorrent.garlic import transcript
from gtorrent.identity import Identity, b64
from gtorrent.protocol import PeerRecord

MODEL_ID = "ab" * 32


def signed_done(identity: Identity, reason: str, ids: list[int]) -> tuple[dict[str, object], str]:
    done = {"tokens": len(ids), "finish_reason": reason, "model_id": MODEL_ID}
    return done, b64(identity.sign(transcript(b"request", MODEL_ID, "x" * len(ids), ids, reason)))


@pytest.mark.parametrize(
    ("reason", "count", "accepted"),
    [("eos", 3, True), ("length", 8, True), ("context", 3, True), ("length", 3, False), ("stop", 3, False),
     ("cancelled", 3, False), ("", 3, False)],
)
def test_only_whole_answers_are_accepted(reason: str, count: int, accepted: bool) -> None:
    identity = Identity.generate()
    record = PeerRecord.sign(identity, endpoint="tcp://127.0.0.1:9", roles=("seed",), seq=1, expires=time.time() + 60)
    sink = AnswerSink(record, 10_000, None, max_ids=8)
    ids = list(range(count))
    sink.add("x" * count, ids)
    done, signature = signed_done(identity, reason, ids)  # signed: the lie is the seed's own
    if accepted:
        assert check_answer(record, b"request", MODEL_ID, sink, done, signature)[1] == reason
    else:
        with pytest.raises(SeedFailed):
            check_answer(record, b"request", MODEL_ID, sink, done, signature)


def test_every_sampled_ask_carries_a_sampling_seed() -> None:
    sampled = [generate_body(AskRequest("p", temperature=0.8), MODEL_ID, "r")["seed"] for _ in range(50)]
    assert all(isinstance(s, int) and 0 <= s < 1 << 63 for s in sampled) and len(set(sampled)) == 50
    assert "seed" not in generate_body(AskRequest("p"), MODEL_ID, "r")  # greedy needs none
    assert generate_body(AskRequest("p", temperature=0.8, seed=42), MODEL_ID, "r")["seed"] == 42
