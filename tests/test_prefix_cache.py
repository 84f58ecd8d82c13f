"""The prefix KV cache and its HR-tree index (gtorrent.runtime.prefix_cache), pure and on real ONNX
sessions over the bundled demo model: the same greedy tokens with and without the cache, cached prompt
tokens counted, the index always equal to what the entries hold, in-use states never evicted, shared
by concurrent generations, and answers made with the cache scoring 1 under the verifier."""

from __future__ import annotations

import hashlib
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams, score_answer
from gtorrent.runtime.prefix_cache import (
    CHUNK_TOKENS,
    ROOT,
    PrefixCache,
    PrefixSummary,
    chunk_hashes,
)

from .conftest import DEMO

SHARED = [
    "The for statement is used to iterate over the elements of a sequence, such as a string, tuple or list,"
    " or other iterable object.",
    "A class definition is an executable statement. The inheritance list usually gives a list of base classes",
]
QUERIES = ["", " Python is", " The def statement defines", " Lambda expressions", " Copyright 2001", " x"]


@pytest.fixture(scope="module")
def plain() -> LanguageModel:
    return LanguageModel.load(DEMO)


def _cached_model(max_bytes: int = 256 << 20) -> LanguageModel:
    return LanguageModel.load(DEMO, prefix_cache=PrefixCache(max_bytes))


def _agree(cache: PrefixCache) -> None:
    assert cache.tree_paths() == cache.held_paths()
    assert cache.bytes <= cache.max_bytes


# ------------------------------------------------------------------ keys


def test_chunk_hashes_are_chained_blake2b_over_whole_chunks() -> None:
    ids = list(range(1000, 1025))
    digests = chunk_hashes(ids)
    assert len(digests) == 2 and all(len(d) == 16 for d in digests)  # the 5-token tail has no key
    first = hashlib.blake2b(ROOT + struct.pack("<10I", *ids[:10]), digest_size=16, person=b"gtorrent/kv/v1")
    assert digests[0] == first.digest()
    second = hashlib.blake2b(digests[0] + struct.pack("<10I", *ids[10:20]), digest_size=16, person=b"gtorrent/kv/v1")
    assert digests[1] == second.digest()
    # the same chunk after another prefix is another key: a digest names its whole prefix
    other = chunk_hashes([7] * 10 + ids[10:20])
    assert other[1] != digests[1]
    assert chunk_hashes(ids[:9]) == []
    assert chunk_hashes(ids[:20]) == digests


# ------------------------------------------------------------------ pure cache and index


def _path(n: int, branch: int = 0) -> list[bytes]:
    return chunk_hashes([branch] * CHUNK_TOKENS + list(range(CHUNK_TOKENS * (n - 1))))


def test_acquire_gives_the_deepest_state_and_a_longer_path_replaces_its_prefix() -> None:
    cache = PrefixCache(1000)
    assert cache.acquire(_path(3)) is None
    assert cache.insert(_path(2), "two", 100)
    lease = cache.acquire(_path(5))
    assert lease is not None and lease.depth == 2 and lease.value == "two"
    cache.release(lease)
    assert cache.insert(_path(4), "four", 200)  # covers the 2-chunk state: that one goes
    assert len(cache) == 1 and cache.bytes == 200
    lease = cache.acquire(_path(3))
    assert lease is not None and lease.depth == 3 and lease.value == "four"
    cache.release(lease)
    assert cache.insert(_path(3), "three", 150)  # already covered: only touched
    assert len(cache) == 1 and cache.bytes == 200
    assert (cache.hits, cache.misses) == (2, 1)
    _agree(cache)


def test_lru_eviction_within_the_budget_and_states_in_use_never_evicted() -> None:
    cache = PrefixCache(300)
    for branch in range(3):
        assert cache.insert(_path(2, branch), branch, 100)
    held = cache.acquire(_path(2, 0))  # the oldest, but in use (and now the most recent)
    assert held is not None
    touched = cache.acquire(_path(2, 1))
    assert touched is not None
    cache.release(touched)
    assert cache.insert(_path(2, 3), 3, 100)  # evicts branch 2, the least recently used
    assert cache.longest_match(_path(2, 2)) == 0 and cache.longest_match(_path(2, 0)) == 2
    assert cache.insert(_path(2, 4), 4, 200)  # needs two: branch 1 and 3; branch 0 is in use
    assert cache.longest_match(_path(2, 0)) == 2 and cache.longest_match(_path(2, 1)) == 0
    assert not cache.insert(_path(2, 5), 5, 250)  # only by evicting the state in use: not stored
    assert cache.longest_match(_path(2, 0)) == 2 and cache.longest_match(_path(2, 5)) == 0
    assert not cache.insert(_path(2, 6), 6, 301)  # bigger than the whole budget
    cache.release(held)
    assert cache.insert(_path(2, 5), 5, 250)
    assert cache.longest_match(_path(2, 0)) == 0
    _agree(cache)


def test_index_agrees_with_the_entries_after_random_inserts_and_evictions() -> None:
    rng = random.Random(9)
    cache = PrefixCache(5000)
    leases = []
    roots = [[rng.randrange(1024) for _ in range(CHUNK_TOKENS)] for _ in range(4)]
    for step in range(2000):
        root = roots[rng.randrange(len(roots))]
        tail = [rng.randrange(3) for _ in range(CHUNK_TOKENS * rng.randrange(0, 6))]
        digests = chunk_hashes(root + tail)
        action = rng.random()
        if action < 0.6:
            cache.insert(digests, step, rng.randrange(50, 900))
        elif action < 0.8:
            lease = cache.acquire(digests)
            if lease is not None:
                assert lease.depth == cache.longest_match(digests)
                leases.append(lease)
        elif leases:
            cache.release(leases.pop(rng.randrange(len(leases))))
        _agree(cache)
        summary = cache.summary()
        assert summary.longest_match(digests) == cache.longest_match(digests)
        assert all(lease.key in {p[-1] for p in cache.held_paths()} for lease in leases)  # never evicted
    assert cache.evictions > 100


def test_summary_round_trips_and_answers_like_the_tree() -> None:
    cache = PrefixCache(10_000)
    cache.insert(_path(4, 1), "a", 10)
    cache.insert(_path(2, 2), "b", 10)
    summary = cache.summary()
    assert len(summary.to_bytes()) == 16 * 6
    again = PrefixSummary.from_bytes(summary.to_bytes())
    assert again == summary
    for probe in (_path(6, 1), _path(2, 1), _path(3, 2), _path(2, 3), []):
        assert again.longest_match(probe) == cache.longest_match(probe)
    with pytest.raises(ValueError):
        PrefixSummary.from_bytes(b"x" * 17)


# ------------------------------------------------------------------ on the demo model


@pytest.mark.timeout(300)
def test_greedy_tokens_identical_with_and_without_the_cache(plain: LanguageModel) -> None:
    model = _cached_model()
    params = GenerationParams(max_tokens=24)
    counted = 0
    for round_ in range(2):
        for shared in SHARED:
            for query in QUERIES:
                prompt = shared + query
                expected = plain.generate(prompt, params)
                got = model.generate(prompt, params)
                assert got.token_ids == expected.token_ids, prompt
                assert got.text == expected.text
                prompt_tokens = len(model.encode(prompt))
                assert got.prompt_tokens == prompt_tokens
                # a prefix seen before comes from the cache, in whole chunks, never the whole prompt
                assert got.cached_tokens % CHUNK_TOKENS == 0 and got.cached_tokens < prompt_tokens
                if round_ == 1:
                    assert got.cached_tokens == (prompt_tokens - 1) // CHUNK_TOKENS * CHUNK_TOKENS
                counted += got.cached_tokens
    assert counted > 0 and model.prefix_cache is not None and model.prefix_cache.hits > 0
    assert plain.generate(SHARED[0], params).cached_tokens == 0  # off by default
    _agree(model.prefix_cache)


def test_cached_prefix_logits_match_a_full_pass(plain: LanguageModel) -> None:
    model = _cached_model()
    assert model.prefix_cache is not None
    diffs = []
    for shared in SHARED:
        for query in QUERIES[1:]:
            ids = model.encode(shared + query)
            model.generate(shared, GenerationParams(max_tokens=1))  # caches the shared prefix
            logits, _, from_cache = model._prefill(ids, model.prefix_cache)
            assert from_cache > 0
            full = plain.forward(ids)[from_cache:]
            diffs.append(float(np.abs(logits - full).max()))
        # a whole-chunk prefix and one token after it: the one-token step a decode step also takes
        ids = model.encode(shared)
        ids = ids[: len(ids) // CHUNK_TOKENS * CHUNK_TOKENS] + [ids[-1]]
        logits, _, from_cache = model._prefill(ids, model.prefix_cache)
        assert from_cache == len(ids) - 1
        diffs.append(float(np.abs(logits - plain.forward(ids)[from_cache:]).max()))
    # the verifier's greedy tolerance is 0.05 logits; the cached pass is float noise away from a full one
    assert max(diffs) < 1e-3


def test_eviction_under_a_tiny_budget_keeps_index_and_cache_in_agreement(plain: LanguageModel) -> None:
    model = _cached_model(max_bytes=3 * 20 * 4096 + 1)  # demo: 4096 bytes of KV a token, ~3 short prompts
    cache = model.prefix_cache
    assert cache is not None
    params = GenerationParams(max_tokens=4)
    for n in range(12):
        prompt = f"{n} " + SHARED[n % 2] + QUERIES[n % len(QUERIES)]
        assert model.generate(prompt, params).token_ids == plain.generate(prompt, params).token_ids
        _agree(cache)
    assert cache.evictions > 0 and cache.bytes > 0


def test_a_state_in_use_is_not_evicted_on_the_model() -> None:
    model = _cached_model(max_bytes=50 * 4096)
    cache = model.prefix_cache
    assert cache is not None
    ids = model.encode(SHARED[0])
    model.generate(ids, GenerationParams(max_tokens=1))
    lease = cache.acquire(chunk_hashes(ids))
    assert lease is not None
    for n in range(5):  # each of these alone needs most of the budget
        model.generate(f"{n} " + SHARED[1] + QUERIES[n], GenerationParams(max_tokens=1))
    assert cache.longest_match(chunk_hashes(ids)) == lease.depth
    cache.release(lease)
    model.generate("9 " + SHARED[1], GenerationParams(max_tokens=1))  # now it may go, and does
    assert cache.longest_match(chunk_hashes(ids)) == 0 and cache.evictions > 0
    _agree(cache)


@pytest.mark.timeout(300)
def test_concurrent_generations_share_the_cache(plain: LanguageModel) -> None:
    model = _cached_model(max_bytes=400 * 4096)  # small enough that threads evict each other's states
    prompts = [f"{n % 3} " + SHARED[n % 2] + QUERIES[n % len(QUERIES)] for n in range(24)]
    params = GenerationParams(max_tokens=12)
    expected = [plain.generate(prompt, params).token_ids for prompt in prompts]

    def run(prompt: str) -> list[int]:
        return model.generate(prompt, params).token_ids

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(run, prompts))
    assert got == expected
    assert model.prefix_cache is not None and model.prefix_cache.hits > 0
    assert model.prefix_cache.in_use() == 0
    _agree(model.prefix_cache)


@pytest.mark.timeout(300)
def test_answers_made_with_the_cache_score_one(plain: LanguageModel) -> None:
    reference = LanguageModel.load(DEMO, intra_op_threads=1)
    model = _cached_model()
    asks = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
            SamplingParams(temperature=0.8, top_k=40), SamplingParams(temperature=0.3, top_p=0.95)]
    scored = 0
    for n in range(20):
        sampling = asks[n % len(asks)]
        prompt_ids = model.encode(SHARED[n % 2] + QUERIES[n % len(QUERIES)])
        seed = None if sampling.greedy else 1000 + n
        result = model.generate(prompt_ids, GenerationParams(max_tokens=32, sampling=sampling, seed=seed))
        score = score_answer(reference, prompt_ids, result.token_ids, sampling,
                             finish_reason=result.finish_reason, seed=seed, max_tokens=32)
        assert score.calibrated == 1.0, (n, sampling, score.replay_fraction, score.support_fraction)
        scored += result.cached_tokens > 0
    assert scored >= 16  # all but the first ask on each prefix came from the cache


def test_exports_without_a_kv_cache_and_uncached_runs_ignore_the_prefix_cache() -> None:
    from .conftest import GPT2_NOCACHE

    model = LanguageModel.load(GPT2_NOCACHE, prefix_cache=PrefixCache())
    plain = LanguageModel.load(GPT2_NOCACHE)
    for _ in range(2):
        got = model.generate(SHARED[0], GenerationParams(max_tokens=8))
        assert got.cached_tokens == 0 and got.token_ids == plain.generate(SHARED[0], GenerationParams(max_tokens=8)).token_ids
    demo = _cached_model()
    for _ in range(2):
        assert demo.generate(SHARED[0], GenerationParams(max_tokens=4, use_cache=False)).cached_tokens == 0
    assert model.prefix_cache is not None and len(model.prefix_cache) == 0
    assert demo.prefix_cache is not None and len(demo.prefix_cache) == 0
