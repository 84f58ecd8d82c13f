#!/usr/bin/env python3
"""Benchmark of the runtime's prefix KV cache, side by side in one run (prints the ratio).

Time to first token of a prompt made of a shared prefix (`--prefix-tokens`, default 512) and a unique
10-token query, on one session: MISS, the prefix not cached (a fresh cache each time), against HIT,
the prefix prefilled once before by another prompt. Runs alternate miss/hit and the medians are
reported. A prefix longer than the model's context allows is cut to fit (the bundled demo model holds
512 tokens, so there it is 512 - query - 1). Also prints the largest |logit difference| between the
cached-prefix pass and a full pass over the same prompts (the verifier's greedy tolerance is 0.05).

Usage: python scripts/bench_prefix_cache.py [--model DIR] [--prefix-tokens 512] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from gtorrent.runtime import GenerationParams, LanguageModel
from gtorrent.runtime.prefix_cache import CHUNK_TOKENS, PrefixCache

QUERY_TOKENS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT's default)")
    args = parser.parse_args()

    model = LanguageModel.load(args.model, intra_op_threads=args.threads)
    plain = LanguageModel.load(args.model, intra_op_threads=args.threads)
    vocab = int(plain.forward([1]).shape[-1])
    prefix_tokens = min(args.prefix_tokens, model.context_length - QUERY_TOKENS - 1)
    rng = np.random.default_rng(9)
    prefix = [int(t) for t in rng.integers(1, vocab, prefix_tokens)]
    params = GenerationParams(max_tokens=1)

    def query() -> list[int]:
        return [int(t) for t in rng.integers(1, vocab, QUERY_TOKENS)]

    primed = PrefixCache()
    model.prefix_cache = primed
    model.generate(prefix + query(), params)  # fills the cache with the shared prefix
    model.generate(prefix + query(), params)  # and warms the session up
    miss, hit, cached = [], [], []
    for _ in range(args.repeats):
        model.prefix_cache = PrefixCache()
        miss.append(model.generate(prefix + query(), params).ttft_s)
        model.prefix_cache = primed
        result = model.generate(prefix + query(), params)
        hit.append(result.ttft_s)
        cached.append(result.cached_tokens)

    worst, samples = 0.0, 40
    for n in range(samples):  # prefixes of many lengths and 1..10 tokens after them (1 = a decode-like step)
        cut = CHUNK_TOKENS * int(rng.integers(1, prefix_tokens // CHUNK_TOKENS + 1))
        cache = PrefixCache()
        model.prefix_cache = cache
        model.generate(prefix[:cut], params)
        ids = prefix[:cut] + query()[: 1 + n % QUERY_TOKENS]
        logits, _, from_cache = model._prefill(ids, cache)
        assert from_cache == cut
        worst = max(worst, float(np.abs(logits - plain.forward(ids)[from_cache:]).max()))

    miss_ms, hit_ms = statistics.median(miss) * 1000, statistics.median(hit) * 1000
    print(f"model {model.name}, context {model.context_length}, provider {model.provider}")
    print(f"prompt: {prefix_tokens} shared prefix tokens + {QUERY_TOKENS} unique, {args.repeats} runs each, medians")
    print(f"{'':6}{'TTFT ms':>10}{'prompt tokens from cache':>28}")
    print(f"{'miss':6}{miss_ms:>10.2f}{0:>28}")
    print(f"{'hit':6}{hit_ms:>10.2f}{statistics.median(cached):>28.0f}")
    print(f"hit / miss TTFT: {hit_ms / miss_ms:.3f}x")
    print(f"max |logit diff| cached-prefix pass vs full pass, {samples} prompts: {worst:.2e} "
          "(verifier greedy tolerance 0.05)")


if __name__ == "__main__":
    main()
