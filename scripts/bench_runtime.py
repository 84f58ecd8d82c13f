#!/usr/bin/env python3
"""Benchmark of the model runtime, side by side in one run (prints ratios; record them in the README).

For the bundled demo model and a ~100M-parameter Llama-style model with random weights (built on first
use by `scripts/build_models.py random --preset 100m` into .bench/, which needs the `build` extra):

1. decode tokens/s of gtorrent's generation loop vs a minimal hand-written onnxruntime greedy loop on
   the very same session (ratio; target >= 0.95). Runs alternate A/B and the median is reported.
2. the KV-cache speedup per decoded token at 256 tokens of context (cache vs full recomputation).
3. load time (session + tokenizer + model id), and the model-id hashing alone: uncached vs cached.

Usage: python scripts/bench_runtime.py [--big DIR] [--tokens 64] [--repeats 5] [--skip-big]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gtorrent.runtime import GenerationParams, LanguageModel, model_id

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIG = ROOT / ".bench" / "llama-100m"


def ensure_big_model(path: Path, build_python: str | None) -> Path:
    if (path / "model.onnx").is_file():
        return path
    candidates = [build_python] if build_python else [sys.executable, str(ROOT / ".buildvenv" / "bin" / "python")]
    for python in candidates:
        if python and subprocess.run([python, "-c", "import torch, transformers, onnx"], capture_output=True).returncode == 0:
            print(f"building the ~100M random model into {path} (one-off, about a minute)…", flush=True)
            subprocess.run(
                [python, str(ROOT / "scripts" / "build_models.py"), "random", "--preset", "100m", "--out", str(path)],
                check=True,
            )
            return path
    raise SystemExit(
        "the ~100M model needs torch, transformers and onnx: pip install -e '.[build]' "
        "(or pass --big DIR / --skip-big)"
    )


def hand_written_greedy(lm: LanguageModel, prompt_ids: list[int], tokens: int) -> tuple[list[int], float]:
    """The minimal loop: numpy feeds, session.run, argmax. Returns (tokens, decode seconds after token 1)."""
    session = lm.session
    layout = lm.layout
    heads, head_dim = layout.past_shape
    names = {i.name for i in session.get_inputs()}
    outputs = ["logits", *layout.present_names]
    past = [np.zeros((1, heads, 0, head_dim), dtype=layout.past_dtype) for _ in layout.past_names]
    ids, new, past_len = [], list(prompt_ids), 0
    decode_start = 0.0
    for step in range(tokens):
        feeds = {"input_ids": np.asarray([new], dtype=np.int64)}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, past_len + len(new)), dtype=np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(past_len, past_len + len(new), dtype=np.int64)[None, :]
        feeds.update(zip(layout.past_names, past, strict=False))
        result = session.run(outputs, feeds)
        past_len += len(new)
        token = int(np.argmax(result[0][0, -1]))
        past = result[1:]
        ids.append(token)
        new = [token]
        if step == 0:
            decode_start = time.perf_counter()
    return ids, time.perf_counter() - decode_start


def gtorrent_greedy(lm: LanguageModel, prompt_ids: list[int], tokens: int, use_cache: bool = True) -> tuple[list[int], float]:
    params = GenerationParams(max_tokens=tokens, stop_at_eos=False, use_cache=use_cache)
    result = lm.generate(prompt_ids, params)
    return result.token_ids, result.total_s - result.ttft_s


def prompt_of(lm: LanguageModel, length: int) -> list[int]:
    text = "The for statement is used to iterate over the elements of a sequence. " * 64
    ids = lm.encode(text)
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def bench_model(label: str, path: Path | None, tokens: int, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        lm = LanguageModel.load(path, cache_dir=Path(cache))
        load_cold = time.perf_counter() - started
        started = time.perf_counter()
        model_id(lm.files, Path(cache))
        hash_cached = time.perf_counter() - started
    started = time.perf_counter()
    model_id(lm.files, None)
    hash_cold = time.perf_counter() - started
    prompt = prompt_of(lm, 16)
    # warm-up both loops once; check they agree token for token
    ours, _ = gtorrent_greedy(lm, prompt, tokens)
    theirs, _ = hand_written_greedy(lm, prompt, tokens)
    assert ours == theirs, "gtorrent's loop and the hand-written loop disagree"
    ours_s, theirs_s = [], []
    for _ in range(repeats):
        ours_s.append(gtorrent_greedy(lm, prompt, tokens)[1])
        theirs_s.append(hand_written_greedy(lm, prompt, tokens)[1])
    ours_tps = (tokens - 1) / statistics.median(ours_s)
    theirs_tps = (tokens - 1) / statistics.median(theirs_s)
    # KV cache at 256 tokens of context
    long_prompt = prompt_of(lm, 256)
    steps = 8
    gtorrent_greedy(lm, long_prompt, 2)
    cached = statistics.median(gtorrent_greedy(lm, long_prompt, steps + 1)[1] for _ in range(3)) / steps
    full = statistics.median(gtorrent_greedy(lm, long_prompt, steps + 1, use_cache=False)[1] for _ in range(2)) / steps
    row = {
        "decode_tps": ours_tps,
        "hand_tps": theirs_tps,
        "ratio": ours_tps / theirs_tps,
        "cached_ms": cached * 1000,
        "full_ms": full * 1000,
        "kv_speedup": full / cached,
        "load_s": load_cold,
        "hash_cold_s": hash_cold,
        "hash_cached_s": hash_cached,
    }
    print(
        f"{label:<14} decode {ours_tps:8.1f} tok/s  hand loop {theirs_tps:8.1f} tok/s  ratio {row['ratio']:.3f}  |  "
        f"@256 ctx: cached {cached * 1000:6.2f} ms/tok, full {full * 1000:7.2f} ms/tok, speedup {row['kv_speedup']:5.1f}x  |  "
        f"load {load_cold:.2f} s (model id: {hash_cold * 1000:.0f} ms to hash, {hash_cached * 1000:.1f} ms cached)  [{lm.provider}]",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=Path, default=DEFAULT_BIG, help="folder of the ~100M model")
    parser.add_argument("--build-python", help="python with torch/transformers/onnx to build it")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"gtorrent runtime benchmark: {args.tokens} greedy tokens, median of {args.repeats}, after 1 warm-up")
    bench_model("demo (3.4M)", None, args.tokens, args.repeats)
    if not args.skip_big:
        bench_model("random ~100M", ensure_big_model(args.big, args.build_python), args.tokens, args.repeats)


if __name__ == "__main__":
    main()
