#!/usr/bin/env python3
"""Benchmark of streaming detokenization: gtorrent.runtime.detok (tokenizers' DecodeStream) against the
hand-written windowed detokenizer it replaced (kept below, as it was), side by side in one run.

Token streams, all from the committed models:

  text           README.md and a multilingual sample, encoded with the tokenizer the bundled demo and
                 tests/models/* share (byte-level BPE)
  sampled        the demo model's own answers at temperature 1.6 (odd byte tokens, characters split
                 across tokens), generated here
  random         uniformly random ids over the whole vocabulary, special tokens included (lone
                 continuation bytes, truncated characters)
  byte-fallback  the text stream's text re-encoded with a Llama-2-style tokenizer (SentencePiece BPE
                 with <0xNN> byte fallback; tests/test_detok.py builds it), where every non-ASCII
                 character is 2-4 byte tokens
  random-bf      uniformly random ids over that tokenizer's vocabulary: byte runs that turn out invalid
                 after part of them was released, where DecodeStream refuses the step ("Invalid
                 prefix") and detok.py falls back to the hand-written slice (its worst case)

For each stream it first checks that both give the same pieces, token by token, and that their
concatenation equals the tokenizer's full decode (not for random-bf: no stream can take back text it
released); then it times --rounds rounds of each, alternating, and prints the median time per token and
the ratio DecodeStream / hand-written (below 1: DecodeStream is faster). The demo model's own time per
generated token is printed for scale.

Usage: nice python scripts/bench_detok.py [--tokens 4000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams, bundled_model_path  # noqa: E402
from gtorrent.runtime.detok import IncrementalDetokenizer  # noqa: E402
from tests.test_detok import TEXT, sentencepiece_style_tokenizer  # noqa: E402

REPLACEMENT = "\ufffd"


class HandWrittenDetokenizer:
    """gtorrent/runtime/detok.py before DecodeStream (commit 25fcb63), unchanged."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._emitted: list[str] = []
        self._prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=self._skip))

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._prefix_text
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            self._emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        self._emitted.append(delta)
        return delta


class Streaming(Protocol):
    def push(self, token_id: int) -> str: ...
    def flush(self) -> str: ...


def run(
    make: Callable[[Tokenizer], Streaming], tokenizer: Tokenizer, ids: list[int], chunk: int
) -> list[str]:
    """Stream `ids` as answers of `chunk` tokens each (a fresh detokenizer per answer, as generate has)."""
    pieces: list[str] = []
    for start in range(0, len(ids), chunk):
        detok = make(tokenizer)
        pieces.extend(detok.push(token) for token in ids[start : start + chunk])
        pieces.append(detok.flush())
    return pieces


def sampled_stream(model: LanguageModel, tokens: int) -> tuple[list[int], float]:
    """The demo's answers at temperature 1.6, about `tokens` ids in all, and its seconds per token."""
    ids: list[int] = []
    seconds = 0.0
    seed = 0
    while len(ids) < tokens:
        params = GenerationParams(
            max_tokens=256, sampling=SamplingParams(temperature=1.6), seed=seed, stop_at_eos=False
        )
        result = model.generate("Größe 日本 and the", params)
        ids += result.token_ids
        seconds += result.total_s
        seed += 1
    return ids, seconds / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000, help="token ids per stream (default 4000)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per detokenizer (default 15)")
    parser.add_argument("--answer", type=int, default=256, help="tokens per answer (default 256)")
    args = parser.parse_args()

    model = LanguageModel.load(bundled_model_path())
    demo = model.tokenizer
    source = (ROOT / "README.md").read_text(encoding="utf-8") + (" " + TEXT) * 40
    text_ids = demo.encode(source, add_special_tokens=False).ids
    sampled, model_s_per_token = sampled_stream(model, args.tokens)
    rng = random.Random(0)
    spm = sentencepiece_style_tokenizer()
    streams = {
        "text": (demo, text_ids[: args.tokens]),
        "sampled": (demo, sampled[: args.tokens]),
        "random": (demo, [rng.randrange(demo.get_vocab_size()) for _ in range(args.tokens)]),
        "byte-fallback": (spm, spm.encode(source, add_special_tokens=False).ids[: args.tokens]),
        "random-bf": (spm, [rng.randrange(spm.get_vocab_size()) for _ in range(args.tokens)]),
    }
    print(
        f"tokenizers {sys.modules['tokenizers'].__version__}; {args.tokens} tokens per stream in answers of "
        f"{args.answer}, median of {args.rounds} alternating rounds"
    )
    print(f"{'stream':<14} {'hand-written':>14} {'DecodeStream':>14} {'ratio':>7}   same pieces")
    for name, (tokenizer, ids) in streams.items():
        old = run(HandWrittenDetokenizer, tokenizer, ids, args.answer)
        new = run(IncrementalDetokenizer, tokenizer, ids, args.answer)
        full = "".join(
            tokenizer.decode(ids[s : s + args.answer], skip_special_tokens=True)
            for s in range(0, len(ids), args.answer)
        )
        same = old == new and (name == "random-bf" or "".join(new) == full)
        timings: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for key, make in (("old", HandWrittenDetokenizer), ("new", IncrementalDetokenizer)):
                started = time.perf_counter()
                run(make, tokenizer, ids, args.answer)
                timings[key].append((time.perf_counter() - started) / len(ids))
        old_us, new_us = (statistics.median(timings[key]) * 1e6 for key in ("old", "new"))
        print(
            f"{name:<14} {old_us:>11.2f} us {new_us:>11.2f} us {new_us / old_us:>7.2f}   {'yes' if same else 'NO'}"
        )
    print(f"for scale: the demo model (3.4M) generates a token in {model_s_per_token * 1e6:,.0f} us here")


if __name__ == "__main__":
    main()
