"""The prefix KV cache and its HR-tree index (gtorrent.runtime.prefix_cache), pure and on real ONNX
sessions over the bundled demo model: the same greedy tokens with and without the cache, cached prompt
tokens counted, the index always equal to what the entries hold, in-use states never evicted, shared
by concurrent generations, and answers made with the cache scoring 1 under the verifier. The model tests
run twice: with numpy feeds, and with IOBinding forced on the CPU session (the GPU path: the KV state
stays OrtValues on the session's device, a shorter prefix is sliced there by the committed Slice graph).
Also the bounded summary (a subset of the tree closed under ancestors, most recently used paths first)
and the cumulative stats."""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams, score_answer
from gtorrent.runtime import model as model_module
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


@pytest.fixture(scope="module")
def plain_bound() -> LanguageModel:
    return LanguageModel.load(DEMO, io_binding=True)


@pytest.fixture(params=[False, True], ids=["numpy", "iobinding"])
def bound(request: pytest.FixtureRequest) -> bool:
    """Whether the model under test keeps its KV state as OrtValues through IOBinding (the GPU path)."""
    return bool(request.param)


@pytest.fixture
def reference(bound: bool, plain: LanguageModel, plain_bound: LanguageModel) -> LanguageModel:
    """The same feeding path without the prefix cache."""
    return plain_bound if bound else plain


def _cached_model(max_bytes: int = 256 << 20, *, io_binding: bool = False) -> LanguageModel:
    return LanguageModel.load(DEMO, prefix_cache=PrefixCache(max_bytes), io_binding=io_binding)


def _agree(cache: PrefixCache) -> None:
    assert cache.tree_paths() == cache.held_paths()
    assert cache.bytes <= cache.max_bytes
    held = {digest for path in cache.held_paths() for digest in path}
    assert cache.summary().digests == held


def _closed_subset(summary: PrefixSummary, cache: PrefixCache) -> None:
    """The summary names only held prefixes, each with all its ancestors."""
    paths = cache.tree_paths()
    assert summary.digests <= {path[-1] for path in paths}
    for path in paths:
        if path[-1] in summary.digests:
            assert set(path) <= summary.digests, "a digest without its ancestors"


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


def test_bounded_summary_keeps_the_most_recent_whole_paths() -> None:
    cache = PrefixCache(10_000)
    cache.insert(_path(4, 1), "a", 10)  # 4 digests
    cache.insert(_path(2, 2), "b", 10)  # 2
    cache.insert(_path(3, 3), "c", 10)  # 3
    cache.insert(_path(5, 1), "a5", 10)  # extends a: replaces it, 1 new digest (5 on its path)
    assert len(cache) == 3 and cache.summary().digests == {d for p in cache.held_paths() for d in p}
    assert cache.summary(None) == cache.summary(10) == cache.summary(100)  # the whole tree: 10 digests
    assert cache.summary(0).digests == frozenset()
    assert cache.summary(5).digests == set(_path(5, 1))  # the most recent entry, whole
    assert cache.summary(4).digests == set(_path(3, 3))  # a5 does not fit whole: the next one does
    assert cache.summary(8).digests == set(_path(5, 1) + _path(3, 3))
    assert cache.summary(9).digests == set(_path(5, 1) + _path(3, 3))  # b needs 2 more
    lease = cache.acquire(_path(2, 2))  # b is now the most recently used
    assert lease is not None
    assert cache.summary(2).digests == set(_path(2, 2))
    assert cache.summary(7).digests == set(_path(2, 2) + _path(5, 1))
    cache.release(lease)
    # a shared prefix counts once: a path that extends one already in the summary costs only its tail
    assert cache.insert(_path(2, 1), "x", 10)  # covered by a5: only touched
    assert cache.summary(5).digests == set(_path(5, 1))
    for bound_ in range(12):
        summary = cache.summary(bound_)
        assert len(summary.digests) <= bound_
        _closed_subset(summary, cache)
        again = PrefixSummary.from_bytes(summary.to_bytes())
        assert again == summary
    with pytest.raises(ValueError):
        cache.summary(-1)


def test_stats_count_lookups_hits_and_tokens_and_are_thread_safe() -> None:
    cache = PrefixCache(10_000)
    assert cache.stats() == {"lookups": 0, "hits": 0, "prompt_tokens": 0, "cached_tokens": 0, "evictions": 0,
                             "entries": 0, "bytes": 0, "max_bytes": 10_000}
    cache.insert(_path(3), "s", 100)
    assert cache.acquire(_path(2, 5), prompt_tokens=27) is None  # a miss counts its prompt, no cached
    lease = cache.acquire(_path(6), prompt_tokens=64)  # 3 chunks of it cached
    assert lease is not None
    cache.release(lease)
    lease = cache.acquire(_path(2))  # prompt_tokens defaults to the whole chunks: 20
    assert lease is not None
    cache.release(lease)
    stats = cache.stats()
    assert {k: stats[k] for k in ("lookups", "hits", "prompt_tokens", "cached_tokens")} == {
        "lookups": 3, "hits": 2, "prompt_tokens": 27 + 64 + 20, "cached_tokens": 30 + 20}
    assert (stats["entries"], stats["bytes"]) == (1, 100)

    threads, rounds = 8, 400
    start = threading.Barrier(threads)

    def hammer(n: int) -> None:
        start.wait()
        for i in range(rounds):
            found = cache.acquire(_path(3) if (i + n) % 2 else _path(2, 9), prompt_tokens=33)
            if found is not None:
                cache.release(found)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(hammer, range(threads)))
    after = cache.stats()
    calls = threads * rounds
    assert after["lookups"] == stats["lookups"] + calls
    assert after["hits"] == stats["hits"] + calls // 2
    assert after["prompt_tokens"] == stats["prompt_tokens"] + 33 * calls
    assert after["cached_tokens"] == stats["cached_tokens"] + 30 * (calls // 2)
    assert cache.in_use() == 0


def test_evicted_prefixes_leave_the_tree_and_every_summary_after_random_operations() -> None:
    """Eviction vs index: after every insert, acquire and release the tree equals what the entries hold,
    the full summary equals the tree, a bounded one is a subset closed under ancestors, states in use
    stay, an insert fails only if the states in use leave no room, and each prefix that left the cache
    is gone from the tree, from every summary and from acquire."""
    for seed in range(3):
        rng = random.Random(seed)
        cache = PrefixCache(4000)
        leases: list[Any] = []
        roots = [[rng.randrange(1024) for _ in range(CHUNK_TOKENS)] for _ in range(5)]
        held = cache.held_paths()
        departed = 0
        for step in range(1500):
            root = roots[rng.randrange(len(roots))]
            tail = [rng.randrange(3) for _ in range(CHUNK_TOKENS * rng.randrange(0, 7))]
            digests = chunk_hashes(root + tail)
            action = rng.random()
            if action < 0.55:
                nbytes = rng.randrange(50, 1500)
                in_use = sum(e.nbytes for e in cache._entries.values() if e.refs)
                covered = cache.covers(digests)
                stored = cache.insert(digests, step, nbytes)
                assert stored == (covered or in_use + nbytes <= cache.max_bytes), (step, nbytes, in_use)
                if stored:
                    assert cache.longest_match(digests) == len(digests)
            elif action < 0.8:
                lease = cache.acquire(digests)
                if lease is not None:
                    assert lease.depth == cache.longest_match(digests) > 0
                    leases.append(lease)
            elif leases:
                cache.release(leases.pop(rng.randrange(len(leases))))
            _agree(cache)
            now = cache.held_paths()
            assert all(lease.key in {p[-1] for p in now} for lease in leases)  # in use: never evicted
            summaries = [cache.summary(), cache.summary(rng.randrange(0, 40))]
            for summary in summaries:
                _closed_subset(summary, cache)
            for path in held - now:  # left the cache: gone from the tree, the summaries and acquire
                departed += 1
                assert path[-1] not in cache.tree
                assert all(path[-1] not in summary.digests for summary in summaries)
                assert cache.longest_match(path) < len(path)
            held = now
        assert cache.evictions > 100 and departed > 100


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
def test_greedy_tokens_identical_with_and_without_the_cache(
    plain: LanguageModel, reference: LanguageModel, bound: bool
) -> None:
    model = _cached_model(io_binding=bound)
    params = GenerationParams(max_tokens=24)
    counted = 0
    for round_ in range(2):
        for shared in SHARED:
            for query in QUERIES:
                prompt = shared + query
                expected = reference.generate(prompt, params)
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
    assert reference.generate(SHARED[0], params).cached_tokens == 0
    _agree(model.prefix_cache)


@pytest.mark.timeout(300)
def test_io_binding_keeps_the_cached_state_on_the_device(
    plain_bound: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forced IOBinding on CPU: stored states are OrtValues on the session's device, copies of the
    prefill's output, never written later; hits shorter than a stored state are sliced on the device;
    and no KV tensor goes through the host (only logits come back, only the empty past goes in)."""
    model = _cached_model(io_binding=True)
    cache = model.prefix_cache
    assert cache is not None
    heads, head_dim = model.layout.past_shape
    long_ids = model.encode(SHARED[0] + " Python is a programming language with")
    short_ids = long_ids[:25]
    assert len(long_ids) > 30
    to_host: list[tuple[int, ...]] = []
    from_host: list[tuple[int, ...]] = []
    numpy_of, from_numpy = ort.OrtValue.numpy, ort.OrtValue.ortvalue_from_numpy

    def watched_numpy(self: Any) -> Any:
        array = numpy_of(self)
        to_host.append(array.shape)
        return array

    def watched_from_numpy(array: Any, *args: Any, **kwargs: Any) -> Any:
        from_host.append(array.shape)
        return from_numpy(array, *args, **kwargs)

    sliced: list[int] = []
    slice_on_device = model._slice_on_device

    def watched_slice(values: list[Any], length: int) -> list[Any]:
        sliced.append(length)
        return slice_on_device(values, length)

    monkeypatch.setattr(model, "_slice_on_device", watched_slice)
    with monkeypatch.context() as patch:
        patch.setattr(ort.OrtValue, "numpy", watched_numpy)
        patch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(watched_from_numpy))
        logits, present, from_cache = model._prefill(long_ids, cache)
        assert from_cache == 0 and len(cache) == 1
        stored_len = len(long_ids) // CHUNK_TOKENS * CHUNK_TOKENS
        assert sliced == [stored_len]  # the copy on insert, made on the device
        (entry,) = cache._entries.values()
        stored = list(entry.value)
        snapshot = [numpy_of(value).copy() for value in stored]
        assert entry.nbytes == sum(value.tensor_size_in_bytes() for value in stored)
        for value, out in zip(stored, present, strict=True):
            assert isinstance(value, ort.OrtValue) and value.device_name() == model._ort_device == "cpu"
            assert value.shape() == [1, heads, stored_len, head_dim]
            assert value.data_ptr() != out.data_ptr()  # a copy, not the present a later step reads
            np.testing.assert_array_equal(numpy_of(value), numpy_of(out)[:, :, :stored_len, :])
        # a shorter hit: sliced on the device to 20 positions; a hit of the stored length: bound as is
        short = model.generate(short_ids, GenerationParams(max_tokens=6))
        assert short.cached_tokens == 20 and sliced[-1] == 20
        count = len(sliced)
        exact_ids = long_ids[:stored_len] + model.encode(" and")[-1:]
        exact = model.generate(exact_ids, GenerationParams(max_tokens=6))
        assert exact.cached_tokens == stored_len and len(sliced) == count  # no slice, no new entry
        again = model.generate(long_ids, GenerationParams(max_tokens=6))
        assert again.cached_tokens == (len(long_ids) - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    vocab = int(logits.shape[-1])
    assert to_host and all(len(shape) == 3 and shape[-1] == vocab for shape in to_host)  # logits only
    assert from_host and all(shape[2] == 0 for shape in from_host)  # the empty past of a miss only
    # the same stored buffers, unchanged by the steps that read them
    (entry,) = cache._entries.values()
    assert [value.data_ptr() for value in entry.value] == [value.data_ptr() for value in stored]
    for value, before in zip(entry.value, snapshot, strict=True):
        np.testing.assert_array_equal(value.numpy(), before)
    params = GenerationParams(max_tokens=6)
    for ids, result in ((short_ids, short), (exact_ids, exact), (long_ids, again)):
        assert result.token_ids == plain_bound.generate(ids, params).token_ids


def test_kv_slice_graphs_cut_the_sequence_axis_on_the_session_device() -> None:
    """The committed slice graphs (scripts/build_models.py kv-slice) for float32 and float16 KV."""
    folder = Path(model_module.__file__).parent
    rng = np.random.default_rng(3)
    for dtype in ("float32", "float16"):
        session = ort.InferenceSession((folder / f"kv_slice_{dtype}.onnx").read_bytes(),
                                       providers=["CPUExecutionProvider"])
        assert [(i.name, i.type) for i in session.get_inputs()] == [
            ("data", f"tensor({'float' if dtype == 'float32' else dtype})"), ("end", "tensor(int64)")]
        data = rng.standard_normal((1, 3, 17, 5)).astype(dtype)
        for end in (1, 10, 17):
            binding = session.io_binding()
            binding.bind_ortvalue_input("data", ort.OrtValue.ortvalue_from_numpy(data, "cpu", 0))
            binding.bind_cpu_input("end", np.array([end], dtype=np.int64))
            binding.bind_output("sliced", "cpu")
            session.run_with_iobinding(binding)
            (out,) = binding.get_outputs()
            assert out.shape() == [1, 3, end, 5]
            np.testing.assert_array_equal(out.numpy(), data[:, :, :end, :])


def test_stats_count_the_models_prompts_and_cached_tokens(bound: bool) -> None:
    model = _cached_model(io_binding=bound)
    assert model.prefix_cache is not None
    prompts, cached = 0, 0
    for n in range(6):
        result = model.generate(SHARED[n % 2] + QUERIES[n % len(QUERIES)], GenerationParams(max_tokens=2))
        prompts += result.prompt_tokens
        cached += result.cached_tokens
    stats = model.prefix_cache.stats()
    assert stats["lookups"] == 6 and stats["hits"] == 4  # the first ask on each prefix misses
    assert stats["prompt_tokens"] == prompts and stats["cached_tokens"] == cached > 0


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


def test_eviction_under_a_tiny_budget_keeps_index_and_cache_in_agreement(
    reference: LanguageModel, bound: bool
) -> None:
    # demo: 4096 bytes of KV a token, ~3 short prompts
    model = _cached_model(max_bytes=3 * 20 * 4096 + 1, io_binding=bound)
    cache = model.prefix_cache
    assert cache is not None
    params = GenerationParams(max_tokens=4)
    for n in range(12):
        prompt = f"{n} " + SHARED[n % 2] + QUERIES[n % len(QUERIES)]
        assert model.generate(prompt, params).token_ids == reference.generate(prompt, params).token_ids
        _agree(cache)
    assert cache.evictions > 0 and cache.bytes > 0
    kind = ort.OrtValue if bound else np.ndarray
    assert all(isinstance(value, kind) for entry in cache._entries.values() for value in entry.value)


def test_a_state_in_use_is_not_evicted_on_the_model(bound: bool) -> None:
    model = _cached_model(max_bytes=50 * 4096, io_binding=bound)
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
def test_concurrent_generations_share_the_cache(reference: LanguageModel, bound: bool) -> None:
    # small enough that threads evict each other's states
    model = _cached_model(max_bytes=400 * 4096, io_binding=bound)
    prompts = [f"{n % 3} " + SHARED[n % 2] + QUERIES[n % len(QUERIES)] for n in range(24)]
    params = GenerationParams(max_tokens=12)
    expected = [reference.generate(prompt, params).token_ids for prompt in prompts]

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


def test_io_binding_without_a_slice_graph_for_the_kv_dtype_runs_without_the_cache(
    plain_bound: LanguageModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KV dtype with no committed slice graph (float64) cannot cut states on the device: no cache."""
    monkeypatch.setattr(model_module, "_SLICE_DTYPES", frozenset({"float16"}))  # as if float32 had none
    model = _cached_model(io_binding=True)
    params = GenerationParams(max_tokens=6)
    for _ in range(2):
        got = model.generate(SHARED[0], params)
        assert got.cached_tokens == 0 and got.token_ids == plain_bound.generate(SHARED[0], params).token_ids
    assert model.prefix_cache is not None and len(model.prefix_cache) == 0
    assert model.prefix_cache.stats()["lookups"] == 0


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
