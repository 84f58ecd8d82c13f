"""Scoring a seed's answer against a reference model: the paper's credibility and a calibrated one.

A verifier holds the reference weights, the challenge's prompt ids, the token ids the seed signed and
the sampling parameters the challenge asked for. `score_answer` runs ONE batched forward pass of the
reference over prompt + answer (`_forward_logits`, never one pass per token) and derives, for
every answer token i (t_i, with raw logits l_i = the reference's logits at the position before it):

- `logprobs[i]` = log softmax(l_i)[t_i]; `ranks[i]` = #{v : l_i[v] > l_i[t_i]} (0 = the argmax);
  `in_top_k[i]` = ranks[i] < 50; `argmax_logprobs[i]` = max log softmax(l_i); `logit_gaps[i]` =
  max l_i − l_i[t_i] (>= 0).
- q_i, the distribution the seed sampled from, built from l_i exactly as `sampling.sample_token`
  does: greedy (temperature 0) is a point mass on the argmax; otherwise l_i / temperature, cut to the
  top_k highest (ties at the cut kept), softmax, then cut to the smallest prefix (by decreasing
  probability) whose cumulative probability reaches top_p, renormalised. `sampling_probs[i]` =
  q_i(t_i), `in_support[i]` (see the tolerances below), `entropies[i]` = H(q_i) and
  `surprisal_variances[i]` = Var_{x~q_i}[−log q_i(x)].

The paper's credibility (paper-notes §4.1), exactly: over the answer's tokens but the last
(i = 0 … m−2), p_i = exp(logprobs[i]) if in_top_k[i] else ε = 1e-5; PPL = exp(−mean_i log p_i);
`paper` = clamp(1/PPL, 0, 1). With m <= 1 there is nothing to score and `paper` = 0.0 (no evidence
earns no credit; challenges ask for many tokens).

The calibrated credibility is a test an honest seed passes exactly, on any model however small or
high-entropy: each token is one an honest seed could have produced or not, and calibrated = 1 −
STRICTNESS × (the fraction it could not have), at least 0, so a tenth of the answer wrong leaves
nothing (an honest seed's fraction is 1: numeric ties sit inside the tolerances):

- greedy (or an unseeded answer cooler than NEAR_GREEDY_T): the token is the reference's argmax up to
  GREEDY_LOGIT_TOL. Seeds compute logits step by step with a KV cache, with other thread counts or on
  other hardware; the verifier's full pass differs from theirs in the last float bits, so an honest
  token can lose the argmax by a hair, never by GREEDY_LOGIT_TOL.
- sampled with a seed (every ask carries one: asker.generate_body): the seed's sampler drew one
  `random()` per token from default_rng(seed) and took the first candidate whose cumulative
  probability exceeds it (sampling.sample_token). The verifier replays the draws against the
  reference's candidates (`sampling.sampling_candidates`): the token is the seed's only if the same
  draw lands in its interval, within REPLAY_TOL. Other weights tuned to pass any distribution test
  (a cooler temperature, say) still land elsewhere on most tokens.
- sampled without a seed (a fallback): the token lies in q_i's support, taken leniently at its edge
  (the cut widened to the prefix reaching top_p + TOP_P_TOL, and a token within GREEDY_LOGIT_TOL of
  the last kept logit counts), times typicality, a z-test of the total surprisal of the in-support
  tokens against its mean and variance under q: z = (Σ −log q_i(t_i) − Σ H(q_i)) / sqrt(Σ Var_i).
  An honest seed's z is roughly N(0, 1); typicality = exp(−(|z| − Z_FREE)² / 2) beyond Z_FREE = 3,
  else 1. This is far weaker than the replay: other weights sampled a little cooler pass it.
- the end: the finish reason must be one a whole answer has (FINISH_REASONS); "length" only with
  exactly `max_tokens` tokens, "context" only when prompt + answer fill the context; "eos" scores the
  end token too (any of the model's end tokens, the likeliest one for the support test; replayed, any
  of them the draw lands on). An end that does not fit (`end_ok` false) makes calibrated 0: this is
  what catches an answer cut short, whatever end it claims. With nothing to score (an empty answer
  that did not end at eos) calibrated = 0.0.
- over an epoch, `epoch_credibility` takes the LOWEST challenge's score (an honest seed scores 1 on
  each, so one failed challenge is evidence, and a seed honest on some asks only does not average its
  way through), times the typicality of the unseeded sampled answers' pooled surprisal.

Invariants: token ids outside the vocabulary raise `ScoreError` before any inference; the pass is one
session run over prompt + answer that fetches the logits alone (no KV-cache outputs); everything after
it is pure numpy on the logits, batched over rows in chunks of _ROWS_PER_CHUNK (no vocabulary-wide
work in a Python loop per token, no [tokens, vocab] float64 array of the whole answer), and gives
exactly what a per-token computation gives (tests/test_score.py keeps one as the reference). The
replay of a sampled answer reads each token's interval without sorting the vocabulary
(`_replay_rows`): scoring costs one forward pass plus a few passes over the logits, the verifier's
share scripts/bench_score.py measures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import GtorrentError, UsageError
from .model import LanguageModel
from .providers import CUDA
from .sampling import SamplingParams

TOP_K = 50  # the paper's TOP_K_LOGPROBS
EPSILON = 1e-5  # the paper's probability floor for a token outside the top-K
GREEDY_LOGIT_TOL = 0.05  # raw-logit tie tolerance; measured thread/cache noise is ~1e-5 (see bench_score)
TOP_P_TOL = 1e-3  # extra cumulative probability admitted at the top-p edge
Z_FREE = 3.0  # |z| up to this many standard deviations is not penalised
REPLAY_TOL = 1e-4  # cumulative-probability slack at a token's interval edges (numeric noise is ~1e-6)
STRICTNESS = 10.0  # calibrated = 1 − STRICTNESS × (fraction of tokens an honest seed could not have made)
FINISH_REASONS = frozenset({"eos", "length", "context"})  # how a whole answer ends
NEAR_GREEDY_T = 1e-3  # below this temperature an unseeded answer is judged as greedy (ties within the tol.)
_ROWS_PER_CHUNK = 64  # bounds the [rows, vocab] float64 temporaries on large vocabularies

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class ScoreError(GtorrentError):
    """An answer that cannot be scored (token ids outside the reference's vocabulary)."""


@dataclass(frozen=True)
class AnswerScore:
    """One answer's scores; per-token arrays have one entry per scored token (answer + eos if any)."""

    sampling: SamplingParams
    answer_tokens: int  # len(answer_ids), without the end token
    scored_eos: bool  # True when the last scored token is the end-of-sequence token
    logprobs: FloatArray  # log-softmax of the raw logits at each scored token
    ranks: IntArray  # number of vocabulary entries with a strictly higher logit (0 = argmax)
    in_top_k: BoolArray  # ranks < TOP_K
    argmax_logprobs: FloatArray
    logit_gaps: FloatArray  # max raw logit − the token's raw logit
    sampling_probs: FloatArray  # q_i(t_i) under the seed's sampling distribution
    in_support: BoolArray  # inside q_i's support, leniently at its edge
    entropies: FloatArray  # H(q_i), nats
    surprisal_variances: FloatArray  # Var[−log q_i], nats²
    perplexity: float  # the paper's PPL (inf when nothing was scored)
    paper: float  # the paper's credibility, 1/PPL clamped to [0, 1]
    support_fraction: float  # greedy: fraction at the argmax up to ties; sampled: inside the support
    surprisal_excess: float  # Σ −log q_i(t_i) − Σ H(q_i) over tokens with q_i(t_i) > 0; 0.0 for greedy
    surprisal_spread: float  # Σ Var_i over the same tokens (the excess's variance for an honest seed)
    typicality_z: float  # 0.0 for greedy
    typicality: float  # 1.0 for greedy
    end_ok: bool  # the answer's end is one an honest seed could have reached (see the module doc)
    replayed: bool  # a seeded sampled answer, checked by replaying the seed's sampler
    replay_fraction: float  # of the scored tokens, those the replayed draw lands on (1.0 when not replayed)
    calibrated: float

    @property
    def scored_tokens(self) -> int:
        return int(self.logprobs.shape[0])


def typicality_factor(z: float) -> float:
    """1 for |z| <= Z_FREE, then exp(−(|z| − Z_FREE)² / 2): smooth, and 0.6 / 0.14 / 0.01 one/two/three
    standard deviations past the free band."""
    excess = abs(z) - Z_FREE
    return 1.0 if excess <= 0 else math.exp(-0.5 * excess * excess)


def paper_credibility(logprobs: FloatArray, in_top_k: BoolArray) -> tuple[float, float]:
    """(PPL, credibility) per the paper over all tokens but the last; (inf, 0.0) with fewer than two."""
    if logprobs.shape[0] < 2:
        return math.inf, 0.0
    floored = np.where(in_top_k[:-1], logprobs[:-1], math.log(EPSILON))
    perplexity = math.exp(-float(floored.mean()))
    return perplexity, min(max(1.0 / perplexity, 0.0), 1.0)


@dataclass
class _Sampled:
    """One chunk's sampling distributions, shared by the support test and the replay."""

    scaled: FloatArray  # logits / temperature
    top_index: IntArray | None  # argpartition(scaled, -top_k)[:, -top_k:] when top_k cuts
    probs: FloatArray  # softmax over the top_k cut, before the top_p cut; [rows, vocab] when top_k is 0
    cumulative: FloatArray | None  # top_p: cumulative sums of the largest `probs`, a prefix long enough
    keep: IntArray | None  # top_p: the nucleus size (in `probs`' descending order)
    q_token: FloatArray  # q(t), after both cuts
    in_support: BoolArray
    entropy: FloatArray
    variance: FloatArray


def _sampling_rows(
    logits: FloatArray, tokens: IntArray, params: SamplingParams
) -> tuple[FloatArray, BoolArray, FloatArray, FloatArray]:
    """(q(t), in support leniently, H(q), Var[−log q]) per row for a sampled (temperature > 0) ask."""
    parts = _sampled(logits, tokens, params)
    return parts.q_token, parts.in_support, parts.entropy, parts.variance


def _sampled(logits: FloatArray, tokens: IntArray, params: SamplingParams) -> _Sampled:
    """q_i for each row (the module doc) and what the replay reuses.

    With a top_k cut and no tie at it, every entry outside the top_k is 0 in every [rows, vocab]
    array: those are computed on the top_k columns alone, and a row sum is taken over the full row
    with the zeros in place (`full_sum`), so that it is the same pairwise sum, bit for bit."""
    rows, vocab = logits.shape
    scaled = logits / params.temperature
    row_index = np.arange(rows)
    k = params.top_k if 0 < params.top_k < vocab else vocab
    top_index: IntArray | None = None
    mask: BoolArray | None = None  # the entries of `values` that are kept; None: all
    if k < vocab:
        # the k-th largest value, from the same argpartition sampling_candidates (and the replay) makes
        top_index = np.argpartition(scaled, -k, axis=1)[:, -k:]
        kth = np.take_along_axis(scaled, top_index[:, :1], axis=1)[:, 0]
        allowed = scaled >= kth[:, None]  # ties at the cut are kept: the seed may have drawn any of them
        allowed_count = allowed.sum(axis=1)
    else:
        kth = scaled.min(axis=1)
        allowed_count = np.full(rows, vocab)
    columns: IntArray | None = None  # the columns `values` holds; None: all of them
    if top_index is not None and bool((allowed_count == k).all()):
        columns = top_index
        values = np.take_along_axis(scaled, columns, axis=1)
    else:
        values = scaled
        mask = allowed if top_index is not None else None
    wide = np.zeros((rows, vocab)) if columns is not None else None

    def full_sum(compact: FloatArray) -> FloatArray:
        if columns is None or wide is None:
            total: FloatArray = compact.sum(axis=1)
            return total
        np.put_along_axis(wide, columns, compact, axis=1)
        total = wide.sum(axis=1)
        np.put_along_axis(wide, columns, 0.0, axis=1)
        return total

    top = values.max(axis=1, keepdims=True)
    weights = np.exp(values - top)
    if mask is not None:
        weights = np.where(mask, weights, 0.0)
    weight_sum = full_sum(weights)
    probs = weights / weight_sum[:, None]
    cut_probs = probs
    lenient_edge = kth  # the lowest scaled logit kept, widened at the edge
    cumulative: FloatArray | None = None
    keep: IntArray | None = None
    if params.top_p < 1.0:
        ordered, cumulative = _largest_prefix(probs, allowed_count, params.top_p + TOP_P_TOL)
        reached = cumulative.shape[1]
        keep = np.minimum(_count_below(cumulative, params.top_p, vocab) + 1, allowed_count)
        keep_lenient = np.minimum(_count_below(cumulative, params.top_p + TOP_P_TOL, vocab) + 1, allowed_count)
        assert int(keep_lenient.max()) <= reached  # _largest_prefix's guarantee
        edge_prob = ordered[row_index, keep - 1]
        # probabilities are monotone in the scaled logit, so the edge translates back to a logit
        lenient_edge = np.log(ordered[row_index, keep_lenient - 1] * weight_sum) + top[:, 0]
        nucleus = probs >= edge_prob[:, None]
        mask = nucleus if mask is None else mask & nucleus
        weights = np.where(mask, weights, 0.0)
        probs = weights / full_sum(weights)[:, None]
    with np.errstate(divide="ignore"):
        if mask is None:
            log_q = np.log(probs)
        else:
            log_q = np.where(mask, np.log(np.where(mask, probs, 1.0)), 0.0)
    weighted = probs * log_q
    entropy = -full_sum(weighted)
    second = full_sum(weighted * log_q)
    variance = np.maximum(second - entropy * entropy, 0.0)
    token_scaled = scaled[row_index, tokens]
    in_support = token_scaled >= lenient_edge - GREEDY_LOGIT_TOL / params.temperature
    if columns is None:
        q_token = probs[row_index, tokens]
    else:
        match = columns == tokens[:, None]
        q_token = np.where(match.any(axis=1), probs[row_index, match.argmax(axis=1)], 0.0)
    return _Sampled(scaled, top_index, cut_probs, cumulative, keep, q_token, in_support, entropy, variance)


_PREFIX_FIRST = 256  # largest probabilities sorted first for a top_p cut; the whole row when not enough


def _largest_prefix(probs: FloatArray, allowed_count: IntArray, reach: float) -> tuple[FloatArray, FloatArray]:
    """(the largest entries of each row in decreasing order, their cumulative sums), as many columns as
    every row needs to reach `reach` or to hold all its allowed (nonzero) entries. The columns are the
    first ones of `-np.sort(-probs)` and of its cumsum, exactly (a cumsum's prefix is the prefix's
    cumsum), at a partition's cost instead of a full sort's when the nucleus is small."""
    vocab = probs.shape[1]
    # _PREFIX_FIRST entries hold at most that many times the largest: a flat row cannot reach with them
    may_reach = (_PREFIX_FIRST * probs.max(axis=1) >= reach) | (allowed_count <= _PREFIX_FIRST)
    if _PREFIX_FIRST < vocab and bool(may_reach.all()):
        largest = np.partition(probs, vocab - _PREFIX_FIRST, axis=1)[:, vocab - _PREFIX_FIRST :]
        ordered = np.sort(largest, axis=1)[:, ::-1]  # the values of -np.sort(-x), without two negations
        cumulative = np.cumsum(ordered, axis=1)
        if bool(((cumulative[:, -1] >= reach) | (allowed_count <= _PREFIX_FIRST)).all()):
            return ordered, cumulative
    ordered = np.sort(probs, axis=1)[:, ::-1]
    return ordered, np.cumsum(ordered, axis=1)


def _count_below(cumulative: FloatArray, value: float, vocab: int) -> IntArray:
    """How many entries of each row's full cumulative sum are below `value`, from a prefix of it: past
    the prefix the sums only grow, and a row that ended below `value` stays there (zeros follow)."""
    count: IntArray = (cumulative < value).sum(axis=1)
    return np.where(cumulative[:, -1] < value, count + (vocab - cumulative.shape[1]), count)


def score_answer(
    model: LanguageModel,
    prompt_ids: list[int],
    answer_ids: list[int],
    sampling: SamplingParams,
    *,
    finish_reason: str | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
) -> AnswerScore:
    """Score `answer_ids`, generated after `prompt_ids` with `sampling`, against `model` (the reference).

    `finish_reason` (from the signed transcript) is checked against the answer (module doc); "eos" also
    scores the end token. `seed`: the sampling seed the request carried, for an exact replay of a
    sampled answer. `max_tokens`: the request's limit, which a "length" answer must have reached."""
    if not prompt_ids:
        raise UsageError("scoring needs a non-empty prompt")
    vocab = _vocab_size(model)
    bad = [token for token in answer_ids if not 0 <= token < vocab]
    if bad:
        raise ScoreError(f"answer token id {bad[0]} is outside the reference's vocabulary of {vocab}")
    scored = list(answer_ids)
    scored_eos = finish_reason == "eos" and bool(model.eos_ids)
    if scored_eos:
        scored.append(min(model.eos_ids))  # a placeholder: the end token is chosen from the logits below
    total = len(prompt_ids) + len(scored)
    if total > model.context_length:  # the seed's doing: it cannot have produced this answer
        raise ScoreError(f"prompt + answer is {total} tokens; model {model.name} holds {model.context_length}")
    end_claim_ok = _end_claim_ok(finish_reason, len(answer_ids), len(prompt_ids) + len(answer_ids),
                                 max_tokens, model.context_length)
    if not scored:
        return _empty_score(sampling)
    # the logits at position j predict token j+1: the last prompt position predicts the first answer
    # token, and the last scored token's own logits are never needed
    logits_all = _forward_logits(model, list(prompt_ids) + scored[:-1])
    start = len(prompt_ids) - 1
    if scored_eos:  # of the model's end tokens, the one the reference finds likeliest there
        end_row = logits_all[start + len(answer_ids)]
        scored[-1] = max(model.eos_ids, key=lambda token: float(end_row[token]))
    tokens = np.asarray(scored, dtype=np.int64)
    replayed = seed is not None and not sampling.greedy
    end_tokens = frozenset(model.eos_ids) if scored_eos else frozenset()
    draws = _draws(seed, len(scored)) if seed is not None and replayed else None
    hits = np.zeros(len(scored), dtype=bool)
    parts: list[tuple[FloatArray, ...]] = []
    # chunk by chunk, the support test and the replay on the same rows, so that no [tokens, vocab] float64
    # array of the whole answer is ever held
    for begin in range(0, len(scored), _ROWS_PER_CHUNK):
        end = begin + _ROWS_PER_CHUNK
        chunk = logits_all[start + begin : start + end].astype(np.float64)
        columns_part, sampled = _score_chunk(chunk, tokens[begin:end], sampling)
        parts.append(columns_part)
        if draws is not None:
            if sampled is None:
                sampled = _sampled_quietly(chunk, tokens[begin:end], sampling)
            hits[begin:end] = _replay_rows(sampled, tokens[begin:end], draws[begin:end], sampling)
    if draws is not None and end_tokens:
        hits[-1] = _replay_end(logits_all[start + len(scored) - 1].astype(np.float64), end_tokens, draws[-1],
                               sampling)
    columns = [np.concatenate([part[n] for part in parts]) for n in range(len(parts[0]))]
    logprobs, ranks_f, argmax_logprobs, gaps, q_token, support_f, entropy, variance = columns
    ranks = ranks_f.astype(np.int64)
    in_top_k = ranks < TOP_K
    in_support = support_f.astype(bool)
    perplexity, paper = paper_credibility(logprobs[: len(answer_ids)], in_top_k[: len(answer_ids)])
    support_fraction = float(in_support.mean())
    excess, spread = 0.0, 0.0
    if not _greedy_like(sampling):
        drawn = q_token > 0.0
        spread = float(variance[drawn].sum())
        excess = float(-np.log(q_token[drawn]).sum() - entropy[drawn].sum())
    z = _z(excess, spread)
    typicality = typicality_factor(z)
    end_ok = end_claim_ok and (bool(in_support[-1]) if scored_eos else True)
    replay_fraction = 1.0
    if replayed:
        replay_fraction = float(hits.mean())
        end_ok = end_claim_ok and (bool(hits[-1]) if scored_eos else True)
        calibrated = _strict(replay_fraction)
    elif _greedy_like(sampling):
        calibrated = _strict(support_fraction)
    else:
        calibrated = _strict(support_fraction) * typicality
    return AnswerScore(
        sampling=sampling,
        answer_tokens=len(answer_ids),
        scored_eos=scored_eos,
        logprobs=logprobs,
        ranks=ranks,
        in_top_k=in_top_k,
        argmax_logprobs=argmax_logprobs,
        logit_gaps=gaps,
        sampling_probs=q_token,
        in_support=in_support,
        entropies=entropy,
        surprisal_variances=variance,
        perplexity=perplexity,
        paper=paper,
        support_fraction=support_fraction,
        surprisal_excess=excess,
        surprisal_spread=spread,
        typicality_z=z,
        typicality=typicality,
        end_ok=end_ok,
        replayed=replayed,
        replay_fraction=replay_fraction,
        calibrated=calibrated if end_ok else 0.0,
    )


def _forward_logits(model: LanguageModel, token_ids: list[int]) -> npt.NDArray[np.float32]:
    """`model.forward` (one full pass, no cache) asking the graph for its logits alone: a KV-cache
    export would otherwise hand back every layer's keys and values for the whole sequence, which
    scoring never reads. On a GPU session (IOBinding) it is `model.forward` itself."""
    if model.provider == CUDA or not model.has_cache:
        return model.forward(token_ids)
    feeds: dict[str, Any] = dict(model._feeds(token_ids, 0))
    feeds.update(zip(model.layout.past_names, model._empty_past(), strict=True))
    logits: npt.NDArray[np.float32] = model.session.run(["logits"], feeds)[0][0]
    return logits


def _greedy_like(sampling: SamplingParams) -> bool:
    """Greedy, or so cool that an unseeded answer is judged like a greedy one (its distribution is a
    point mass up to numeric noise, which a surprisal test would blow up)."""
    return sampling.greedy or sampling.temperature < NEAR_GREEDY_T


def _strict(fraction: float) -> float:
    """Calibrated credibility from the fraction of tokens an honest seed could have produced: an honest
    seed's is 1 (numeric ties are inside the tolerances), so every token beyond them is evidence, and a
    tenth of the answer wrong is enough for 0."""
    return max(0.0, 1.0 - STRICTNESS * (1.0 - fraction))


def _end_claim_ok(reason: str | None, answer_tokens: int, total: int, max_tokens: int | None, context: int) -> bool:
    """Whether the finish reason fits the answer: "length" only at max_tokens, "context" only when the
    context is full, nothing outside FINISH_REASONS (None: not known, e.g. text scored alone)."""
    if reason is None:
        return True
    if reason not in FINISH_REASONS:
        return False
    if reason == "length":
        return max_tokens is None or answer_tokens == max_tokens
    if reason == "context":
        return total >= context
    return True


def _replay(rows: FloatArray, tokens: IntArray, sampling: SamplingParams, seed: int,
            end_tokens: frozenset[int]) -> BoolArray:
    """Replay a seeded sampled answer: the seed's sampler drew one `random()` per token from
    default_rng(seed) (sampling.sample_token) and took the first candidate whose cumulative
    probability exceeds it. Rebuilding each step's candidates from the reference logits, a token is the
    seed's only if that same draw lands in its interval (within REPLAY_TOL, for numeric noise). With
    `end_tokens`, the last token is the end of the answer, and any of them may be the one drawn.

    Batched, with the same outcome per token as `sampling.sampling_candidates` and a loop
    (tests/test_score.py keeps that loop as the reference): see `_replay_rows`. score_answer runs the
    same steps chunk by chunk beside the support test."""
    draws = _draws(seed, tokens.shape[0])
    hits = np.zeros(tokens.shape[0], dtype=bool)
    for begin in range(0, tokens.shape[0], _ROWS_PER_CHUNK):
        end = begin + _ROWS_PER_CHUNK
        parts = _sampled_quietly(rows[begin:end], tokens[begin:end], sampling)
        hits[begin:end] = _replay_rows(parts, tokens[begin:end], draws[begin:end], sampling)
    if end_tokens and tokens.shape[0]:
        hits[-1] = _replay_end(rows[-1], end_tokens, draws[-1], sampling)
    return hits


def _draws(seed: int, count: int) -> FloatArray:
    """The seed's sampler's draws: default_rng(seed).random((count,)) gives the same doubles as `count`
    calls of random(), one per token."""
    draws: FloatArray = np.random.default_rng(seed).random((count,))
    return draws


def _sampled_quietly(rows: FloatArray, tokens: IntArray, sampling: SamplingParams) -> _Sampled:
    """`_sampled` for the replay alone (a near-greedy seeded answer the support test took as greedy):
    its entropies, which a near point mass turns into 0 × log 0, are not used."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _sampled(rows, tokens, sampling)


def _replay_end(row: FloatArray, end_tokens: frozenset[int], draw: float, sampling: SamplingParams) -> bool:
    """Whether the last draw lands on any of the model's end tokens (one row: the exact way)."""
    scores = row[None, :] / sampling.temperature
    return any(bool(_replay_exact(scores, np.asarray([token]), np.asarray([draw]), sampling, None)[0])
               for token in sorted(end_tokens))


REPLAY_MARGIN = 1e-9  # outcomes this close to an edge are recomputed the slow, bit-exact way
REPLAY_MARGIN_PER_TOKEN = 1e-13  # plus this per vocabulary entry (summation order error grows with it)


def _replay_rows(parts: _Sampled, tokens: IntArray, draws: FloatArray, params: SamplingParams) -> BoolArray:
    """Whether each row's draw lands in its token's interval of `sampling_candidates(row, params)`.

    With a top_k cut, `_replay_exact`: the candidates are few. Without one, sampling_candidates sorts
    the whole vocabulary, which costs more than the rest of scoring on large vocabularies; here a
    token's interval is read without sorting: it starts at the probability of the tokens before it in
    that order (higher scores, or equal ones with lower ids, as a stable sort puts them), over the
    total (for top_p, of the nucleus, whose size comes from the sorted prefix `_sampled` built). These
    sums are the same numbers summed in another order: they differ from sampling_candidates' by at
    most ~vocab × 2⁻⁵², far inside REPLAY_MARGIN + REPLAY_MARGIN_PER_TOKEN × vocab, and every row
    whose outcome lies within that margin of changing (the draw near an edge ± REPLAY_TOL, the
    nucleus's cumulative sum near top_p) is recomputed by `_replay_exact`. The outcome is therefore
    the same as the slow path's, token by token."""
    if parts.top_index is not None:
        return _replay_exact(parts.scaled, tokens, draws, params, parts.top_index)
    scaled, probs = parts.scaled, parts.probs
    count, vocab = scaled.shape
    index = np.arange(count)
    token_scores = scaled[index, tokens][:, None]
    earlier = (scaled > token_scores) | ((scaled == token_scores) & (np.arange(vocab)[None, :] < tokens[:, None]))
    before = np.where(earlier, probs, 0.0).sum(axis=1)
    margin = REPLAY_MARGIN + REPLAY_MARGIN_PER_TOKEN * vocab
    present = np.ones(count, dtype=bool)
    unsure = np.zeros(count, dtype=bool)
    if parts.keep is not None and parts.cumulative is not None:
        keep, cumulative = parts.keep, parts.cumulative
        total = cumulative[index, keep - 1]
        previous = np.where(keep > 1, cumulative[index, np.maximum(keep - 2, 0)], -np.inf)
        unsure |= (np.abs(total - params.top_p) <= margin) | (np.abs(previous - params.top_p) <= margin)
        present = earlier.sum(axis=1) < keep
    else:
        total = probs.sum(axis=1)
    low: FloatArray = before / total
    high = (before + probs[index, tokens]) / total
    edge = margin / total
    unsure |= (np.abs(draws - (low - REPLAY_TOL)) <= edge) | (np.abs(draws - (high + REPLAY_TOL)) <= edge)
    hits: BoolArray = present & (low - REPLAY_TOL <= draws) & (draws <= high + REPLAY_TOL)
    if unsure.any():
        again = np.nonzero(unsure)[0]
        hits[again] = _replay_exact(scaled[again], tokens[again], draws[again], params, None)
    return hits


def _replay_exact(scores: FloatArray, tokens: IntArray, draws: FloatArray, params: SamplingParams,
                  top_index: IntArray | None) -> BoolArray:
    """`_replay_rows` the slow way: for rows of `scores` (logits / temperature), the same float
    operations in the same order as sampling_candidates and numpy's `choice`, batched. The candidates
    sorted by decreasing score (top_k: `argpartition`, given as `top_index`, then a stable sort, as
    there; no top_k: every token, ties in id order, so a token's place is counted rather than looked
    up), probabilities normalised by their pairwise sum in that order, the top_p prefix renormalised by
    its own sum, the interval read off the cumulative sum divided by its last entry."""
    count, vocab = scores.shape
    index = np.arange(count)
    present = np.ones(count, dtype=bool)
    if 0 < params.top_k < vocab:
        candidates = top_index if top_index is not None else np.argpartition(scores, -params.top_k, axis=1)[
            :, -params.top_k :]
        cand_scores = np.take_along_axis(scores, candidates, axis=1)
        order = np.argsort(-cand_scores, axis=1, kind="stable")
        candidates = np.take_along_axis(candidates, order, axis=1)
        cand_scores = np.take_along_axis(cand_scores, order, axis=1)
        match = candidates == tokens[:, None]
        present = match.any(axis=1)
        position = match.argmax(axis=1)
    else:
        cand_scores = -np.sort(-scores, axis=1)  # the values a stable argsort puts in this order
        token_scores = scores[index, tokens][:, None]
        earlier_ties = (scores == token_scores) & (np.arange(vocab)[None, :] < tokens[:, None])
        position = (scores > token_scores).sum(axis=1) + earlier_ties.sum(axis=1)
    probs = np.exp(cand_scores - cand_scores[:, :1])
    probs /= probs.sum(axis=1, keepdims=True)
    width = probs.shape[1]
    keep = np.full(count, width)
    if params.top_p < 1.0:
        # searchsorted on a non-decreasing cumulative sum is the count of entries below top_p
        keep = np.minimum((np.cumsum(probs, axis=1) < params.top_p).sum(axis=1) + 1, width)
        # each prefix is renormalised by its own pairwise sum, as sampling_candidates does (a sum over
        # the padded row would round differently)
        sums = np.array([probs[row, : keep[row]].sum() for row in range(count)])
        probs = probs / sums[:, None]
        present &= position < keep
    cumulative = np.cumsum(probs, axis=1)  # sequential: each prefix's entries are the prefix's own
    total = cumulative[index, keep - 1]
    place = np.minimum(position, keep - 1)
    high = cumulative[index, place] / total
    low = np.where(place > 0, cumulative[index, np.maximum(place - 1, 0)] / total, 0.0)
    hits: BoolArray = present & (low - REPLAY_TOL <= draws) & (draws <= high + REPLAY_TOL)
    return hits


def epoch_credibility(scores: list[AnswerScore]) -> float:
    """C(T) from one epoch's scores: the lowest calibrated score of its challenges, times the typicality
    of the unseeded sampled answers' pooled surprisal (module doc). The lowest, not the mean: an honest
    seed scores 1 on every challenge, so one failed challenge is evidence, and a seed that answers
    honestly only on some asks must not average its way past the threshold. No scores: 0.0."""
    if not scores:
        return 0.0
    unseeded = [s for s in scores if not s.replayed and not s.sampling.greedy]
    pooled = _z(sum(s.surprisal_excess for s in unseeded), sum(s.surprisal_spread for s in unseeded))
    lowest = min(s.calibrated if s.replayed or s.sampling.greedy else _strict(s.support_fraction) * float(s.end_ok)
                 for s in scores)
    return lowest * typicality_factor(pooled)


def _z(excess: float, spread: float) -> float:
    return excess / math.sqrt(spread) if spread > 0.0 else 0.0


def credibility_of(
    model: LanguageModel,
    prompt: str | list[int],
    answer_text: str,
    sampling: SamplingParams,
    *,
    chat: bool = False,
    finish_reason: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
) -> AnswerScore:
    """`score_answer` for an answer known only as text: it is re-tokenized with the reference's
    tokenizer (no special tokens), the paper's way. A detokenize/retokenize round trip may not give the
    seed's ids back, so prefer the signed token ids where the transcript carries them. `messages`: the
    prompt is that conversation (a generate's `messages`), rendered by the model's chat template."""
    if messages is not None:
        prompt_ids = model.encode_messages(messages)
    else:
        prompt_ids = prompt if isinstance(prompt, list) else model.encode(prompt, chat=chat)
    answer_ids = list(model.tokenizer.encode(answer_text, add_special_tokens=False).ids)
    return score_answer(model, prompt_ids, answer_ids, sampling, finish_reason=finish_reason)


def _score_rows(logits: FloatArray, tokens: IntArray, sampling: SamplingParams) -> tuple[FloatArray, ...]:
    return _score_chunk(logits, tokens, sampling)[0]


def _score_chunk(logits: FloatArray, tokens: IntArray,
                 sampling: SamplingParams) -> tuple[tuple[FloatArray, ...], _Sampled | None]:
    """The per-token columns of one chunk of rows, and its sampling distributions (None: greedy-like)."""
    rows = np.arange(logits.shape[0])
    token_logits = logits[rows, tokens]
    top = logits.max(axis=1)
    # sampling.log_softmax without its [rows, vocab] result: only the token's entry and the row's
    # largest (0.0 − log Σ exp, the argmax's shifted logit being exactly 0.0) are kept, same floats
    shifted = logits - top[:, None]
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    ranks = (logits > token_logits[:, None]).sum(axis=1).astype(np.float64)
    gaps = top - token_logits
    parts: _Sampled | None = None
    if _greedy_like(sampling):
        tie = gaps <= GREEDY_LOGIT_TOL
        zeros = np.zeros(rows.shape[0], dtype=np.float64)
        q_token, support, entropy, variance = tie.astype(np.float64), tie, zeros, zeros
    else:
        parts = _sampled(logits, tokens, sampling)
        q_token, support, entropy, variance = parts.q_token, parts.in_support, parts.entropy, parts.variance
    return (
        shifted[rows, tokens] - log_norm,
        ranks,
        0.0 - log_norm,
        gaps,
        q_token,
        support.astype(np.float64),
        entropy,
        variance,
    ), parts


def _vocab_size(model: LanguageModel) -> int:
    shape = model.session.get_outputs()[0].shape
    declared = shape[-1] if shape and isinstance(shape[-1], int) else None
    return declared or int(model.config.get("vocab_size") or model.tokenizer.get_vocab_size())


def _empty_score(sampling: SamplingParams) -> AnswerScore:
    empty_f = np.zeros(0, dtype=np.float64)
    empty_b = np.zeros(0, dtype=bool)
    return AnswerScore(
        sampling=sampling,
        answer_tokens=0,
        scored_eos=False,
        logprobs=empty_f,
        ranks=np.zeros(0, dtype=np.int64),
        in_top_k=empty_b,
        argmax_logprobs=empty_f,
        logit_gaps=empty_f,
        sampling_probs=empty_f,
        in_support=empty_b,
        entropies=empty_f,
        surprisal_variances=empty_f,
        perplexity=math.inf,
        paper=0.0,
        support_fraction=0.0,
        surprisal_excess=0.0,
        surprisal_spread=0.0,
        typicality_z=0.0,
        typicality=1.0,
        end_ok=True,
        replayed=False,
        replay_fraction=1.0,
        calibrated=0.0,
    )
