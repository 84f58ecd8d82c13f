#!/usr/bin/env python3
"""Benchmark of the runtime's prefix KV cache, side by side in one run (prints the ratios).

Time to first token of a prompt made of a shared prefix (`--prefix-tokens`, default 512) and a unique
10-token query, on one session: MISS, the prefix not cached (a fresh cache each time), against HIT,
the prefix prefilled once before by another prompt. Runs alternate miss/hit and the medians are
reported. A prefix longer than the model's context allows is cut to fit (the bundled demo model holds
512 tokens, so there it is 512 - query - 1). Also prints the largest |logit difference| between the
cached-prefix pass and a full pass over the same prompts (the verifier's greedy tolerance is 0.05).

Each `--model` (repeatable; `demo` = the bundled demo model, else a model folder such as the ~110M
one from `scripts/build_models.py random --preset 100m --out DIR`) is one column. `--io-binding` adds a
column per model with IOBinding forced on its session (the GPU path: the KV state stays OrtValues on
the session's device and a shorter cached prefix is sliced there; on a CPU machine, "cpu" OrtValues).

Usage: python scripts/bench_prefix_cache.py [--model demo] [--model DIR]… [--io-binding]
           [--prefix-tokens 512] [--repeats 15] [--samples 40] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import numpy as np

from gtorrent.runtime import GenerationParams, LanguageModel
from gtorrent.runtime.prefix_cache import CHUNK_TOKENS, PrefixCache

QUERY_TOKENS = 10


@dataclass(frozen=True)
class Figures:
    label: str
    provider: str
    prefix_tokens: int
    miss_ms: float
    hit_ms: float
    cached: float
    worst_logit_diff: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.hit_ms / self.miss_ms


def measure(path: str | None, *, io_binding: bool, prefix_tokens: int, repeats: int, samples: int,
            threads: int) -> Figures:
    model = LanguageModel.load(path, intra_op_threads=threads, io_binding=io_binding)
    plain = LanguageModel.load(path, intra_op_threads=threads, io_binding=io_binding)
    vocab = int(plain.forward([1]).shape[-1])
    prefix_tokens = min(prefix_tokens, model.context_length - QUERY_TOKENS - 1)
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
    for _ in range(repeats):
        model.prefix_cache = PrefixCache()
        miss.append(model.generate(prefix + query(), params).ttft_s)
        model.prefix_cache = primed
        result = model.generate(prefix + query(), params)
        hit.append(result.ttft_s)
        cached.append(result.cached_tokens)

    worst = 0.0
    for n in range(samples):  # prefixes of many lengths and 1..10 tokens after them (1 = a decode-like step)
        cut = CHUNK_TOKENS * int(rng.integers(1, prefix_tokens // CHUNK_TOKENS + 1))
        cache = PrefixCache()
        model.prefix_cache = cache
        model.generate(prefix[:cut], params)
        ids = prefix[:cut] + query()[: 1 + n % QUERY_TOKENS]
        logits, _, from_cache = model._prefill(ids, cache)
        assert from_cache == cut
        worst = max(worst, float(np.abs(logits - plain.forward(ids)[from_cache:]).max()))

    label = f"{model.name}{', iobinding' if io_binding else ''}"
    return Figures(label, model.provider, prefix_tokens, statistics.median(miss) * 1000,
                   statistics.median(hit) * 1000, statistics.median(cached), worst, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="model folder, or `demo` for the bundled demo model (repeatable; default: demo)")
    parser.add_argument("--io-binding", action="store_true", help="also run each model with IOBinding forced")
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--samples", type=int, default=40, help="prompts for the logit-difference check")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT's default)")
    args = parser.parse_args()

    runs: list[Figures] = []
    for name in args.model or ["demo"]:
        path = None if name == "demo" else name
        for io_binding in (False, True) if args.io_binding else (False,):
            runs.append(measure(path, io_binding=io_binding, prefix_tokens=args.prefix_tokens,
                                repeats=args.repeats, samples=args.samples, threads=args.threads))

    print(f"prompt: shared prefix + {QUERY_TOKENS} unique tokens, {args.repeats} alternating runs each, medians")
    width = max(24, *(len(run.label) + 2 for run in runs))
    rows = [
        ("provider", [run.provider.removesuffix("ExecutionProvider") for run in runs]),
        ("shared prefix tokens", [str(run.prefix_tokens) for run in runs]),
        ("miss TTFT ms", [f"{run.miss_ms:.2f}" for run in runs]),
        ("hit TTFT ms", [f"{run.hit_ms:.2f}" for run in runs]),
        ("hit: tokens from cache", [f"{run.cached:.0f}" for run in runs]),
        ("hit / miss (target <= 0.20)", [f"{run.ratio:.3f}x" for run in runs]),
        ("max |logit diff| vs full", [f"{run.worst_logit_diff:.2e} ({run.samples})" for run in runs]),
    ]
    print(f"{'':30}" + "".join(f"{run.label:>{width}}" for run in runs))
    for title, cells in rows:
        print(f"{title:30}" + "".join(f"{cell:>{width}}" for cell in cells))
    print("(logit diff: the verifier's greedy tolerance is 0.05)")


if __name__ == "__main__":
    main()
