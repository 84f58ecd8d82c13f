"""Token choice from logits: pure, table-driven, with a seeded generator."""

from __future__ import annotations

import numpy as np
import pytest

from gtorrent.runtime.sampling import SamplingParams, log_softmax, sample_token

LOGITS = np.log(np.array([0.05, 0.5, 0.3, 0.1, 0.05], dtype=np.float32))


def draws(params: SamplingParams, count: int = 4000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount([sample_token(LOGITS, params, rng) for _ in range(count)], minlength=5) / count


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(), {1}),
        (SamplingParams(temperature=1.0, top_k=1), {1}),
        (SamplingParams(temperature=1.0, top_k=2), {1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.5), {1}),
        (SamplingParams(temperature=1.0, top_p=0.75), {1, 2}),
        (SamplingParams(temperature=1.0, top_p=0.85), {1, 2, 3}),
        (SamplingParams(temperature=1.0), {0, 1, 2, 3, 4}),
    ],
)
def test_support_of_the_distribution(params: SamplingParams, allowed: set[int]) -> None:
    freq = draws(params)
    assert set(np.nonzero(freq)[0]) == allowed


def test_temperature_one_follows_the_distribution() -> None:
    freq = draws(SamplingParams(temperature=1.0), count=20000)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.02)


def test_low_temperature_sharpens() -> None:
    assert draws(SamplingParams(temperature=0.1))[1] > 0.99


def test_same_seed_same_draws() -> None:
    params = SamplingParams(temperature=1.0, top_k=3)
    assert np.array_equal(draws(params, 200, seed=3), draws(params, 200, seed=3))


def test_log_softmax_normalises() -> None:
    values = log_softmax(np.array([[1000.0, 1001.0, 999.0]]))
    np.testing.assert_allclose(np.exp(values).sum(), 1.0)
    assert np.all(np.isfinite(values))
