"""The verifier's cost per challenge besides scoring: the model steps its prompts take (challenges.py).

A challenge prompt is a few vocabulary words continued by the reference (verifier.py `_extend`); every
continued token is one model step, as dear as one token of the seed's answer. These tests count the
steps on real ONNX sessions of the bundled demo model and check that the cheaper prompts are still
ones a seed cannot enumerate; scripts/bench_score.py measures the CPU.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gtorrent.challenges import (
    DEFAULT_MIN_TOKENS,
    EXTEND_TOKENS,
    MAX_EXTRA_TOKENS,
    answer_tokens,
    draw_prompt,
    vocabulary_words,
)
from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(None, intra_op_threads=1)


def _words(model: LanguageModel) -> list[str]:
    return vocabulary_words([model.tokenizer.decode([i]) for i in range(model.tokenizer.get_vocab_size())])


def _extend(model: LanguageModel):  # type: ignore[no-untyped-def]
    def extend(opening: str, tokens: int, sample_seed: int) -> str:  # as verifier.py's Verifier._extend
        params = GenerationParams(max_tokens=tokens, sampling=SamplingParams(temperature=1.0), seed=sample_seed)
        return model.generate(opening, params).text

    return extend


def test_a_prompt_costs_the_verifier_a_few_model_steps_against_an_answers_hundreds(
    demo: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[int] = []
    real_run = demo.session.run

    class CountingSession:
        def __getattr__(self, name: str) -> Any:
            return getattr(real_run.__self__, name)

        def run(self, *args: Any, **kwargs: Any) -> Any:
            steps[-1] += 1
            return real_run(*args, **kwargs)

    monkeypatch.setattr(demo, "session", CountingSession())
    words, rng, extend = _words(demo), random.Random(3), _extend(demo)
    for _ in range(200):
        steps.append(0)
        draw_prompt(words, rng, extend)
    answers = [answer_tokens(random.Random(n), room=10**6) for n in range(400)]
    assert min(answers) == DEFAULT_MIN_TOKENS and max(answers) <= DEFAULT_MIN_TOKENS + MAX_EXTRA_TOKENS
    # one step per continued token (the first comes with the opening's prefill): at most 8, a sixteenth
    # of the shortest answer, and about 3 % of an average one (it was up to 16 steps, 10 on average)
    assert max(steps) <= EXTEND_TOKENS[1] <= DEFAULT_MIN_TOKENS / 16
    assert statistics.fmean(steps) / statistics.fmean(answers) <= 0.03


def test_shorter_continuations_still_make_prompts_a_seed_cannot_enumerate(demo: LanguageModel) -> None:
    words, rng, extend = _words(demo), random.Random(11), _extend(demo)
    prompts, openings = [], []
    for _ in range(300):
        state = rng.getstate()
        openings.append(draw_prompt(words, rng))  # the same draws without the continuation
        rng.setstate(state)
        prompts.append(draw_prompt(words, rng, extend))
    assert len(set(prompts)) == len(prompts)
    # every prompt starts with its opening and nearly all go on in the model's own words
    assert all(prompt.startswith(opening) for prompt, opening in zip(prompts, openings, strict=True))
    continued = sum(len(prompt) > len(opening) for prompt, opening in zip(prompts, openings, strict=True))
    assert continued >= 0.9 * len(prompts)
    # the continuation adds variety to short openings: the demo's ~190 words give only ~36,000 pairs
    two_word = [p for p, o in zip(prompts, openings, strict=True) if len(o.split()) == 2]
    assert len(set(two_word)) == len(two_word)


@pytest.mark.timeout(180)
def test_bench_score_cost_only_runs() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/bench_score.py", "--cost-only", "--challenges", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "greedy  cpu : prompt" in done.stdout and "sampled cpu : prompt" in done.stdout
    assert "honest answers scoring 1.0: 2/2" in done.stdout
