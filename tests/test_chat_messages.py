"""Multi-turn chat in the protocol: a generate's `messages` (system, user and assistant turns) is
rendered by the seed with the model's chat template, signed as part of the request, carried the same
way by private asks, and replayed identically by a verifier, so an honest answer scores 1.0."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gtorrent.asker import AskRequest, ask_direct
from gtorrent.errors import UsageError
from gtorrent.garlic import transcript
from gtorrent.identity import verify_signature
from gtorrent.private import ask_private
from gtorrent.routing import RelayRules
from gtorrent.runtime import GenerationParams, LanguageModel
from gtorrent.runtime.sampling import SamplingParams
from gtorrent.seed import prompt_ids
from gtorrent.store import Store
from gtorrent.verifier import score_transcript

pytestmark = pytest.mark.timeout(90)

CONVERSATION = (
    ("system", "You answer in one short sentence."),
    ("user", "What is a list?"),
    ("assistant", "A list holds items in order."),
    ("user", "And a tuple?"),
)
TURNS = [{"role": role, "content": content} for role, content in CONVERSATION]


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(None)


def test_one_user_turn_renders_as_the_chat_prompt_does(demo: LanguageModel) -> None:
    """A conversation of one user turn is exactly `encode(content, chat=True)`: the two ways of asking
    one question give one prompt."""
    assert demo.encode_messages([{"role": "user", "content": "Hi"}]) == demo.encode("Hi", chat=True)


def test_a_system_message_changes_the_rendering(demo: LanguageModel) -> None:
    plain = demo.encode_messages([{"role": "user", "content": "Hi"}])
    told = demo.encode_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert told != plain and demo.decode(told).index("Be brief.") < demo.decode(told).index("Hi")
    rendered = demo.decode(demo.encode_messages(TURNS))
    assert [rendered.index(content) for _, content in CONVERSATION] == sorted(
        rendered.index(content) for _, content in CONVERSATION)  # every turn, in order


def test_the_seed_and_the_verifier_render_a_generates_messages(demo: LanguageModel) -> None:
    request = {"prompt": "", "chat": True, "messages": TURNS}
    assert prompt_ids(demo, request) == demo.encode_messages(TURNS)
    assert prompt_ids(demo, {"prompt": "Hi", "chat": True}) == demo.encode("Hi", chat=True)  # as before
    assert prompt_ids(demo, {"prompt": "Hi"}) == demo.encode("Hi")


def test_a_template_that_refuses_a_conversation_is_the_requests_fault(demo: LanguageModel) -> None:
    """Templates that want alternating roles raise_exception on others: a seed answers bad_request
    (a UsageError), not an internal failure of its own."""
    strict = copy.copy(demo)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(UsageError, match="cannot render this conversation.*no system role"):
        strict.encode_messages(TURNS)
    with pytest.raises(UsageError, match="message 1 is not valid text"):
        demo.encode_messages([{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud800"}])


@pytest.mark.parametrize("private", [False, True], ids=["direct", "private"])
async def test_an_honest_multi_turn_answer_is_signed_over_its_messages_and_scores_one(
    swarm: Any, tmp_path: Path, private: bool
) -> None:
    """End to end: the asker sends the conversation (direct, or in a private ask's cloves), the seed
    renders it, the answer equals the local generation of the rendered conversation, the seed's
    signature covers request bytes that hold the messages, and the verifier's replay of those bytes
    scores the answer 1.0 (sampled with a seed: replayed exactly)."""
    await swarm.start(relays=12 if private else 0)
    store = Store.open(tmp_path)
    request = AskRequest("", max_tokens=12, temperature=0.8, seed=7, chat=True, messages=CONVERSATION)
    if private:
        # every relay here is new and on 127.0.0.1
        result = await ask_private(swarm.ctx, [swarm.url], request, store, rules=RelayRules(0.0, False))
    else:
        result = await ask_direct(swarm.ctx, [swarm.url], request, store)
    ids = swarm.model.encode_messages(TURNS)
    local = swarm.model.generate(ids, GenerationParams(max_tokens=12, sampling=SamplingParams(0.8), seed=7))
    assert result.text == local.text and result.tokens == local.tokens
    assert result.prompt_tokens == len(ids)
    signed = json.loads(result.request_bytes)
    assert signed["messages"] == TURNS and signed["prompt"] == "" and signed["chat"] is True
    assert verify_signature(result.signing_key, result.signature, transcript(
        result.request_bytes, result.model_id, result.text, result.token_ids, result.finish_reason))
    score = score_transcript(swarm.model, signed, result.text, result.token_ids, result.finish_reason)
    assert score.replayed and score.calibrated == 1.0
    # the same answer claimed for another conversation does not replay
    other = {**signed, "messages": [{"role": "user", "content": "And a tuple?"}]}
    assert score_transcript(swarm.model, other, result.text, result.token_ids, result.finish_reason).calibrated < 1.0
