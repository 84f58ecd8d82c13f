#!/usr/bin/env python3
"""Benchmark of answer scoring (gtorrent.runtime.score): honest vs cheating answers, both credibilities.

The reference is the bundled demo model (or --reference DIR). For N prompts each (drawn from the pydoc
topics, a pool a seed cannot enumerate from a short list) it builds answers of these kinds and scores
each with the reference:

  honest-greedy      the reference itself, temperature 0, generated with another intra-op thread count
  honest-sampled     the reference, a random mix of (temperature, top_k, top_p) as users set them
  other-greedy/-sampled  another model with the same tokenizer (tests/models/gpt2-tiny by default)
  other-tuned        that model sampling at 0.7 × the requested temperature (to pass a surprisal
                     test), scored with the seeded replay and, for comparison, without the seed
  truncated          the honest greedy answer cut to a third and marked "eos" / "length"

Sampled asks carry a sampling seed (as every ask does), so sampled answers are checked by replaying the
seed's draws; the "-unseeded" kind shows the fallback test alone.
  canned             the same fixed text for every prompt
  random             uniformly random token ids

It prints, per kind, the mean / min / max of the paper's credibility (1/PPL, top-50, ε = 1e-5) and of
the calibrated one and the fraction below the paper's τ = 0.4.

Then the verifier's cost (`challenge_costs`): --challenges challenges made the way gtorrent verify
makes them (challenges.draw_prompt with the reference extending the opening as verifier.py's
`_extend` does, answer lengths from challenges.answer_tokens, sampling from draw_sampling, half of
them greedy), answered by an honest seed (a second session of the reference) and scored with
verifier.score_transcript. Per challenge it measures the verifier's CPU (time.process_time) and
wall time for the prompt and for the scoring, and the seed's CPU and wall time to generate the
answer; it prints prompt, scoring and their total as fractions of the seed's (the issue's target:
≤ 5 % of the seed's CPU). Both sides run ONNX Runtime with --threads intra-op threads (default 1:
a seed's CPU per answer is lowest there, so the fraction is the least flattering). `--cost-only`
prints only this part, on one model (no --other needed): use it on a random-weight model built by
`scripts/build_models.py random` to see how the cost scales; such a model's scores mean nothing,
its costs are real.

Usage: python scripts/bench_score.py [--answers 50] [--tokens 64] [--reference DIR] [--other DIR]
                                     [--challenges 16] [--cost-only] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gtorrent.challenges import answer_tokens, draw_prompt, draw_sampling, vocabulary_words
from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams, bundled_model_path
from gtorrent.runtime.score import AnswerScore, epoch_credibility, score_answer
from gtorrent.verifier import score_transcript

ROOT = Path(__file__).resolve().parent.parent
CANNED = "Python is a programming language that lets you work quickly and integrate systems more effectively."
USER_SAMPLING = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=40),
    SamplingParams(temperature=1.2, top_k=50, top_p=0.95),
]


def prompts(count: int, rng: random.Random) -> list[str]:
    import pydoc_data.topics

    texts = sorted(pydoc_data.topics.topics.values())
    out = []
    for _ in range(count):
        words = rng.choice(texts).split()
        start = rng.randrange(max(1, len(words) - 8))
        out.append(" ".join(words[start : start + rng.randint(3, 8)]))
    return out


@dataclass(frozen=True)
class Cost:
    """One challenge: the verifier's prompt and scoring, the seed's generation (seconds)."""

    greedy: bool
    answer_tokens: int
    prompt_cpu: float
    prompt_wall: float
    score_cpu: float
    score_wall: float
    seed_cpu: float
    seed_wall: float
    calibrated: float


def challenge_costs(reference: LanguageModel, seed_model: LanguageModel, count: int, rng: random.Random) -> list[Cost]:
    """`count` challenges made, answered and scored as `gtorrent verify` does, half greedy, timed."""
    vocab = reference.tokenizer.get_vocab_size()
    words = vocabulary_words([reference.tokenizer.decode([i]) for i in range(vocab)])

    def extend(opening: str, tokens: int, sample_seed: int) -> str:  # verifier.py Verifier._extend
        params = GenerationParams(max_tokens=tokens, sampling=SamplingParams(temperature=1.0), seed=sample_seed)
        return reference.generate(opening, params).text

    costs = []
    for n in range(count):
        greedy = n % 2 == 0
        cpu, wall = time.process_time(), time.perf_counter()
        prompt = draw_prompt(words, rng, extend)  # what Verifier.plan does per challenge
        room = reference.context_length - len(reference.encode(prompt))
        max_tokens = answer_tokens(rng, room)
        sampling = draw_sampling(rng, greedy=greedy)
        prompt_cpu, prompt_wall = time.process_time() - cpu, time.perf_counter() - wall
        sample_seed = rng.getrandbits(63)  # every ask carries one (asker.generate_body)
        request = {"prompt": prompt, "max_tokens": max_tokens, "temperature": sampling.temperature,
                   "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": sample_seed, "chat": False}
        cpu, wall = time.process_time(), time.perf_counter()
        answer = seed_model.generate(prompt, GenerationParams(max_tokens=max_tokens, sampling=sampling,
                                                              seed=sample_seed))
        seed_cpu, seed_wall = time.process_time() - cpu, time.perf_counter() - wall
        cpu, wall = time.process_time(), time.perf_counter()
        score = score_transcript(reference, request, answer.text, answer.token_ids, answer.finish_reason)
        score_cpu, score_wall = time.process_time() - cpu, time.perf_counter() - wall
        costs.append(Cost(greedy, answer.tokens, prompt_cpu, prompt_wall, score_cpu, score_wall, seed_cpu,
                          seed_wall, score.calibrated))
    return costs


def print_costs(costs: list[Cost], threads: int) -> None:
    tokens = [c.answer_tokens for c in costs]
    honest = sum(c.calibrated == 1.0 for c in costs)
    print(f"verifier cost per challenge / seed's cost to generate the answer ({len(costs)} challenges, answers "
          f"{min(tokens)}–{max(tokens)} tokens, {threads} intra-op thread(s) each, load {os.getloadavg()[0]:.1f}; "
          f"honest answers scoring 1.0: {honest}/{len(costs)}):")
    for mode, chosen in (("greedy", [c for c in costs if c.greedy]), ("sampled", [c for c in costs if not c.greedy])):
        if not chosen:
            continue
        for clock in ("cpu", "wall"):
            def part(cost: Cost, name: str, clock: str = clock) -> float:
                return float(getattr(cost, f"{name}_{clock}")) / float(getattr(cost, f"seed_{clock}"))

            prompt = statistics.median(part(c, "prompt") for c in chosen)
            scoring = statistics.median(part(c, "score") for c in chosen)
            totals = [part(c, "prompt") + part(c, "score") for c in chosen]
            overall = sum(getattr(c, f"prompt_{clock}") + getattr(c, f"score_{clock}") for c in chosen) / sum(
                getattr(c, f"seed_{clock}") for c in chosen)
            seed_s = statistics.median(getattr(c, f"seed_{clock}") for c in chosen)
            print(f"  {mode:7} {clock:4}: prompt {prompt:5.1%} + scoring {scoring:5.1%} (medians); total median "
                  f"{statistics.median(totals):5.1%}, max {max(totals):5.1%}, all challenges {overall:5.1%} "
                  f"(seed median {seed_s * 1000:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", type=int, default=50, help="answers per kind")
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per answer")
    parser.add_argument("--reference", type=Path, default=bundled_model_path())
    parser.add_argument("--other", type=Path, default=ROOT / "tests" / "models" / "gpt2-tiny")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--challenges", type=int, default=16, help="challenges timed for the verifier's cost")
    parser.add_argument("--cost-only", action="store_true", help="only the cost part, on --reference alone")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of the verifier and the seed")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    reference = LanguageModel.load(args.reference, intra_op_threads=args.threads)
    if args.cost_only:
        seed_model = LanguageModel.load(args.reference, intra_op_threads=args.threads)
        print(f"reference {reference.name} (vocab {reference.tokenizer.get_vocab_size()})")
        print_costs(challenge_costs(reference, seed_model, args.challenges, rng), args.threads)
        return
    seed_model = LanguageModel.load(args.reference, intra_op_threads=2)  # an honest seed, other threads
    other = LanguageModel.load(args.other)
    vocab = reference.tokenizer.get_vocab_size()
    canned_ids = list(reference.tokenizer.encode(CANNED, add_special_tokens=False).ids)
    results: dict[str, list[AnswerScore]] = {}

    def add(kind: str, score: AnswerScore) -> None:
        results.setdefault(kind, []).append(score)

    for n, prompt in enumerate(prompts(args.answers, rng)):
        ids = reference.encode(prompt)
        greedy = GenerationParams(max_tokens=args.tokens, sampling=SamplingParams())
        sampling = rng.choice(USER_SAMPLING)
        sampled = GenerationParams(max_tokens=args.tokens, sampling=sampling, seed=n)
        honest = seed_model.generate(ids, greedy)
        add("honest-greedy", score_answer(reference, ids, honest.token_ids, greedy.sampling,
                                          finish_reason=honest.finish_reason, max_tokens=args.tokens))
        drawn = seed_model.generate(ids, sampled)
        add("honest-sampled", score_answer(reference, ids, drawn.token_ids, sampling,
                                           finish_reason=drawn.finish_reason, seed=n, max_tokens=args.tokens))
        fake = other.generate(ids, greedy)
        add("other-greedy", score_answer(reference, ids, fake.token_ids, greedy.sampling,
                                         finish_reason=fake.finish_reason, max_tokens=args.tokens))
        fake = other.generate(ids, sampled)
        add("other-sampled", score_answer(reference, ids, fake.token_ids, sampling,
                                          finish_reason=fake.finish_reason, seed=n, max_tokens=args.tokens))
        # other weights that read the requested temperature and sample cooler, to pass a surprisal test
        cooler = SamplingParams(temperature=sampling.temperature * 0.7, top_k=sampling.top_k, top_p=sampling.top_p)
        fake = other.generate(ids, GenerationParams(max_tokens=args.tokens, sampling=cooler, seed=n))
        add("other-tuned", score_answer(reference, ids, fake.token_ids, sampling,
                                        finish_reason=fake.finish_reason, seed=n, max_tokens=args.tokens))
        add("other-tuned-unseeded", score_answer(reference, ids, fake.token_ids, sampling,
                                                 finish_reason=fake.finish_reason, max_tokens=args.tokens))
        cut = honest.token_ids[: max(1, len(honest.token_ids) // 3)]
        add("truncated-greedy", score_answer(reference, ids, cut, greedy.sampling, finish_reason="eos"))
        add("truncated-length", score_answer(reference, ids, cut, greedy.sampling, finish_reason="length",
                                             max_tokens=args.tokens))
        add("canned-greedy", score_answer(reference, ids, canned_ids, greedy.sampling, finish_reason="eos"))
        add("canned-sampled", score_answer(reference, ids, canned_ids, sampling, finish_reason="eos", seed=n))
        noise = [rng.randrange(4, vocab) for _ in range(args.tokens)]
        add("random-greedy", score_answer(reference, ids, noise, greedy.sampling, finish_reason="length",
                                          max_tokens=args.tokens))
        add("random-sampled", score_answer(reference, ids, noise, sampling, finish_reason="length", seed=n,
                                           max_tokens=args.tokens))

    print(f"reference {reference.name}, other {other.name}, {args.answers} answers per kind, "
          f"≤ {args.tokens} tokens each")
    print(f"{'kind':18} {'paper mean':>10} {'min':>6} {'max':>6} {'<0.4':>5}   "
          f"{'calib mean':>10} {'min':>6} {'max':>6} {'<0.4':>5}")
    for kind, scores in results.items():
        paper = [s.paper for s in scores]
        calib = [s.calibrated for s in scores]
        print(f"{kind:18} {statistics.fmean(paper):10.3f} {min(paper):6.3f} {max(paper):6.3f} "
              f"{sum(p < 0.4 for p in paper) / len(paper):5.0%}   {statistics.fmean(calib):10.3f} "
              f"{min(calib):6.3f} {max(calib):6.3f} {sum(c < 0.4 for c in calib) / len(calib):5.0%}")
    print("epochs of 3 challenges (1 greedy + 2 sampled; C(T) = epoch_credibility, paper = mean 1/PPL):")
    for who in ("honest", "other", "canned", "random"):
        greedy_scores, sampled_scores = results[f"{who}-greedy"], results[f"{who}-sampled"]
        epochs = [
            [greedy_scores[i], sampled_scores[i], sampled_scores[i + 1]]
            for i in range(0, len(sampled_scores) - 1, 2)
        ]
        calib = [epoch_credibility(epoch) for epoch in epochs]
        paper = [statistics.fmean(s.paper for s in epoch) for epoch in epochs]
        print(f"  {who:8} {len(epochs):3} epochs   paper mean {statistics.fmean(paper):.3f} max {max(paper):.3f}   "
              f"calibrated mean {statistics.fmean(calib):.3f} min {min(calib):.3f} max {max(calib):.3f} "
              f"< 0.4: {sum(c < 0.4 for c in calib) / len(calib):.0%}")
    for kind in ("honest-sampled", "other-sampled", "other-tuned-unseeded", "canned-sampled", "random-sampled"):
        zs = [s.typicality_z for s in results[kind]]
        print(f"{kind} z: mean {statistics.fmean(zs):.2f}, sd {statistics.pstdev(zs):.2f}, "
              f"min {min(zs):.2f}, max {max(zs):.2f}")
    gaps = np.concatenate([s.logit_gaps for s in results["honest-greedy"]])
    print(f"honest greedy (threads 2 vs 1): max logit gap to the argmax {gaps.max():.2e}")
    cost_reference = LanguageModel.load(args.reference, intra_op_threads=args.threads)
    cost_seed = LanguageModel.load(args.reference, intra_op_threads=args.threads)
    print_costs(challenge_costs(cost_reference, cost_seed, args.challenges, rng), args.threads)


if __name__ == "__main__":
    main()
