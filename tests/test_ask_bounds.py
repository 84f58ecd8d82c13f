"""The asker bounds what a seed may send: more answer text than --max-tokens can explain is the
seed's fault, in direct and in private asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gtorrent.asker import AskRequest, ask_direct
from gtorrent.errors import GtorrentError
from gtorrent.private import ask_private
from gtorrent.store import Store

from .test_private import PROMPT, Swarm

pytestmark = pytest.mark.timeout(90)


def inflate(swarm: Swarm, extra_chars: int) -> None:
    """Make the (real) seed pad every piece of text it generates: a seed that streams far too much."""
    original = swarm.model.generate

    def generate(prompt: str, params: Any, **kwargs: Any) -> Any:
        on_text = kwargs["on_text"]
        kwargs["on_text"] = lambda piece: on_text(piece + "x" * extra_chars)
        return original(prompt, params, **kwargs)

    swarm.model.generate = generate  # type: ignore[method-assign]


@pytest.mark.parametrize("mode", ["direct", "private"])
async def test_an_oversized_answer_is_the_seeds_fault(swarm: Swarm, tmp_path: Path, mode: str) -> None:
    await swarm.start(relays=12)
    inflate(swarm, 3000)
    store = Store.open(tmp_path)
    request = AskRequest(PROMPT, max_tokens=4)  # 4 tokens x 3000 padding: far over 4 tokens' worth
    with pytest.raises(GtorrentError, match="more answer than --max-tokens allows"):
        if mode == "direct":
            await ask_direct(swarm.ctx, [swarm.url], request, store)
        else:
            await ask_private(swarm.ctx, [swarm.url], request, store)
    assert store.standing(swarm.seeds[0].identity.peer_id).asks_failed == 1
    store.close()
