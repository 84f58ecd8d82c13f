"""Cheating seeds for the verification tests: real SeedServices that lie about what they serve.

Each announces and signs the honest model's id (the transcript is signed correctly: the lie is in the
weights or the text, which only scoring against the reference can catch)."""

from __future__ import annotations

from gtorrent.identity import Identity
from gtorrent.runtime import LanguageModel
from gtorrent.seed import SeedService

from .conftest import GPT2


def other_weights(honest: LanguageModel) -> LanguageModel:
    """tests/models/gpt2-tiny (the demo model's tokenizer, other weights) passing as `honest`."""
    cheat = LanguageModel.load(GPT2)
    cheat.model_id = honest.model_id  # announced in its record and signed in every transcript
    return cheat


class OtherWeightsSeed(SeedService):
    """Issue 8 cheat (a): serves other weights under the honest model's id and name."""

    def __init__(self, identity: Identity, honest: LanguageModel, *, trackers: list[str]) -> None:
        super().__init__(identity, other_weights(honest), trackers=trackers, name=honest.name)
