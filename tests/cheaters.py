"""Cheating seeds for the verification tests (issue 8 item 7): models that lie about what they serve.

`cheat_model(kind, honest)` returns an object a SeedService (or `node.run_seed`) serves as its model.
It announces the honest model's id, name and context length and encodes/decodes with the honest
tokenizer; only `generate` lies. The seed signs the transcript of exactly what it sent (seed.py), so
every cheater's answer is well formed and correctly signed: token ids plus the text that decodes from
them, a finish reason a whole answer has. The lie is in the weights or the text, which only scoring
against the reference (runtime/score.py) can catch.

Kinds (CHEAT_KINDS):
- honest: the honest model itself (the control).
- other-weights: tests/models/gpt2-tiny (the demo's tokenizer, other architecture and weights).
- smaller: tests/models/llama-small (the demo's architecture and tokenizer, a fraction of its size).
- truncate: the honest answer cut to a third of what was asked, claimed finished at "eos" (a lazy
  seed that saves two thirds of the work; "length" short of max_tokens is refused by the asker before
  any scoring, "eos" passes every check but the scorer's end test).
- canned: the same fixed text for every ask, finish "eos" (or "length" when cut at max_tokens).
- sometimes: honest on a random share `honest_share` of asks (a `secrets` coin per ask), other weights
  on the rest.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gtorrent.identity import Identity
from gtorrent.runtime import GenerationParams, GenerationResult, LanguageModel
from gtorrent.runtime.detok import IncrementalDetokenizer
from gtorrent.seed import SeedService

MODELS = Path(__file__).parent / "models"
GPT2 = MODELS / "gpt2-tiny"
LLAMA_SMALL = MODELS / "llama-small"
CHEAT_KINDS = ("honest", "other-weights", "smaller", "truncate", "canned", "sometimes")
CANNED_TEXT = (
    "The result is an object whose value is the same as the original one, and the statement is "
    "executed once for each item in the sequence."
)
TRUNCATE_TO = 3  # a truncating seed generates ceil(max_tokens / TRUNCATE_TO) tokens


def other_weights(honest: LanguageModel, folder: Path = GPT2) -> LanguageModel:
    """The model in `folder` (the demo's tokenizer, other weights) passing as `honest`."""
    cheat = LanguageModel.load(folder)
    cheat.model_id = honest.model_id  # announced in its record and signed in every transcript
    return cheat


class CheatModel:
    """Passes as `honest` (id, name, context length, tokenizer: everything the seed reads but
    `generate`), and generates as its kind says. Thread-safe as LanguageModel is: per-ask state lives
    in the `generate` call (the seed runs generations in worker threads)."""

    def __init__(
        self,
        kind: str,
        honest: LanguageModel,
        *,
        honest_share: float = 0.5,
        other: LanguageModel | None = None,
        coin: Callable[[], float] | None = None,
    ) -> None:
        if kind not in CHEAT_KINDS:
            raise ValueError(f"unknown cheat kind {kind!r}; one of {', '.join(CHEAT_KINDS)}")
        if not 0.0 <= honest_share <= 1.0:
            raise ValueError(f"honest_share must be within 0..1, got {honest_share}")
        self.kind, self.honest, self.honest_share, self.other = kind, honest, honest_share, other
        # a fresh unpredictable coin per ask: the verifier's challenges cannot be told apart, so the
        # seed's choice is independent of them (the premise of the escape probability in the tests)
        self.coin = coin or (lambda: secrets.randbelow(1 << 30) / (1 << 30))
        self.asks = 0
        self.honest_asks = 0

    # what the seed announces: the honest model's, whatever generates
    @property
    def model_id(self) -> str:
        return self.honest.model_id

    @property
    def name(self) -> str:
        return self.honest.name

    @property
    def context_length(self) -> int:
        return self.honest.context_length

    def __getattr__(self, attribute: str) -> Any:  # tokenizer, encode, decode, eos_ids, provider, ...
        return getattr(self.honest, attribute)

    def generate(
        self,
        prompt: str | list[int],
        params: GenerationParams | None = None,
        *,
        chat: bool = False,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> GenerationResult:
        params = params or GenerationParams()
        self.asks += 1
        hooks: dict[str, Any] = {
            "chat": chat,
            "on_text": on_text,
            "should_stop": should_stop,
            "on_token": on_token,
        }
        kind = self.kind
        if kind == "sometimes":
            kind = "honest" if self.coin() < self.honest_share else "other-weights"
        if kind == "honest":
            self.honest_asks += 1
            return self.honest.generate(prompt, params, **hooks)
        if kind in ("other-weights", "smaller"):
            assert self.other is not None
            return self.other.generate(prompt, params, **hooks)
        if kind == "truncate":
            short = dataclasses.replace(params, max_tokens=-(-params.max_tokens // TRUNCATE_TO))
            result = self.honest.generate(prompt, short, **hooks)
            if result.finish_reason in ("length", "context"):
                result = dataclasses.replace(result, finish_reason="eos")  # "I was done"
            return result
        return self._canned(
            prompt, params, chat=chat, on_text=on_text, should_stop=should_stop, on_token=on_token
        )

    def _canned(
        self,
        prompt: str | list[int],
        params: GenerationParams,
        *,
        chat: bool,
        on_text: Callable[[str], None] | None,
        should_stop: Callable[[], bool] | None,
        on_token: Callable[[int], None] | None,
    ) -> GenerationResult:
        """CANNED_TEXT's tokens (cut at max_tokens), streamed as the runtime streams: each id to
        `on_token` before the text it completes goes to `on_text`."""
        prompt_ids = prompt if isinstance(prompt, list) else self.honest.encode(prompt, chat=chat)
        canned = list(self.honest.tokenizer.encode(CANNED_TEXT, add_special_tokens=False).ids)
        ids = canned[: params.max_tokens]
        reason = "eos" if len(ids) == len(canned) else "length"
        detok = IncrementalDetokenizer(self.honest.tokenizer)
        produced: list[int] = []
        for token in ids:
            if should_stop is not None and should_stop():
                reason = "cancelled"
                break
            produced.append(token)
            if on_token is not None:
                on_token(token)
            piece = detok.push(token)
            if piece and on_text is not None:
                on_text(piece)
        tail = detok.flush()
        if tail and on_text is not None:
            on_text(tail)
        return GenerationResult(
            text=detok.text,
            token_ids=produced,
            prompt_tokens=len(prompt_ids),
            finish_reason=reason,
            ttft_s=0.0,
            total_s=0.0,
        )


def cheat_model(
    kind: str, honest: LanguageModel, honest_share: float = 0.5, *, intra_op_threads: int = 0
) -> CheatModel:
    """A model object for a seed: `kind` (CHEAT_KINDS) passing as `honest`. Loads the other weights
    the kind needs (other-weights and sometimes: gpt2-tiny; smaller: llama-small)."""
    other = None
    if kind in ("other-weights", "sometimes"):
        other = LanguageModel.load(GPT2, intra_op_threads=intra_op_threads)
    elif kind == "smaller":
        other = LanguageModel.load(LLAMA_SMALL, intra_op_threads=intra_op_threads)
    return CheatModel(kind, honest, honest_share=honest_share, other=other)


class OtherWeightsSeed(SeedService):
    """Issue 8 cheat (a): serves other weights under the honest model's id and name."""

    def __init__(self, identity: Identity, honest: LanguageModel, *, trackers: list[str]) -> None:
        super().__init__(identity, other_weights(honest), trackers=trackers, name=honest.name)
