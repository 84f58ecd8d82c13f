"""Verification challenges: the prompts, sampling parameters and send times a verifier asks with.

Pure: every draw takes the caller's `rng` (verifier.py passes `secrets.SystemRandom`, as anything a
seed could exploit by predicting it must be unpredictable), and the reference model enters only as
its word list and an optional `extend` callable.

A challenge must look like a user's ask to the seed, which sees only the request (the private path
hides who sends it). So:

- prompts are generated, never taken from a short list a seed could enumerate: `draw_prompt` picks 2
  to 5 words at random from the reference's own vocabulary (tens of thousands of word tokens: the
  number of distinct openings is of the order of 10^9 and more), with the capitalisation and spacing
  users type, and `extend` (the verifier samples EXTEND_TOKENS, 2 to 8, tokens from the reference
  model after them) turns the opening into text of the kind the model itself writes. A seed cannot
  recognise a challenge by its prompt without recognising every prompt the same distribution can
  produce, and the distribution covers text users send (short fragments to continue, as with a base
  model). The count of distinct prompts rests on the openings, and each sampled token multiplies it;
  the continuation's part is to end every prompt in the model's own words, which two tokens do.
  What remains distinguishable, documented rather than hidden: a seed that logs prompts sees
  fragments whose statistics are those of the model's own text (a seed answering only "fluent
  model-like" fragments honestly would pass more challenges than a seed answering only
  human-written ones), and chat-formatted asks are not drawn here (`chat=False`);
- sampling parameters are drawn from the settings users actually pass (greedy or temperature 0.6 to
  1.0, with or without top-k 40/50 and top-p 0.9/0.95), with at least one greedy challenge per seed
  and epoch: runtime/score.py's greedy test is the sharpest (a token off the reference's argmax is a
  lie, one answer can suffice), the sampled ones catch a seed that treats greedy asks alone honestly;
- answers are long: at least `min_tokens` (default 128; runtime/score.py measures the tests' power at
  that length) when the model's context allows, with a random length above it as users ask;
- send times are uniform over the epoch, so a seed cannot tell challenges by when they come.

Cost: the continuation is the one part of a prompt that costs the verifier model steps, one per token,
each as dear as one token of the seed's answer. EXTEND_TOKENS keeps it to 5 on average, about 3 % of
an answer of 128 to 256 tokens (it was 4 to 16 tokens, twice that); scripts/bench_score.py measures
the verifier's CPU per challenge, prompt and scoring, against the seed's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .runtime.sampling import SamplingParams

DEFAULT_MIN_TOKENS = 128  # runtime/score.py: the scores separate honest from cheating answers at this length
MAX_EXTRA_TOKENS = 128  # answers ask for min_tokens .. min_tokens + this many
MIN_WORD_CHARS = 3  # vocabulary entries kept as words: letters only, at least this long
MIN_WORD_START_POOL = 100  # word-initial tokens needed to draw from them alone
GREEDY_SHARE = 0.4  # of challenges beyond the one greedy challenge per epoch
TEMPERATURES = (0.6, 0.7, 0.7, 0.8, 0.8, 0.9, 1.0, 1.0)  # as users set them: repeats weigh the usual ones
TOP_KS = (0, 0, 0, 40, 50)
TOP_PS = (1.0, 1.0, 0.9, 0.95)
OPENING_WORDS = (2, 5)  # words drawn from the vocabulary for one prompt, inclusive
EXTEND_TOKENS = (2, 8)  # tokens the reference adds after them, inclusive (the module doc: cost)

Extend = Callable[[str, int, int], str]  # (opening text, tokens to add, sampling seed) -> text added


@dataclass(frozen=True)
class Challenge:
    prompt: str
    sampling: SamplingParams
    max_tokens: int
    send_at_s: float  # seconds after the epoch's start


def vocabulary_words(pieces: Sequence[str]) -> list[str]:
    """The word-like entries of a vocabulary (each token decoded alone), stripped and deduplicated, in
    a stable order: the pool prompts are drawn from. Tokens that begin a word (decoded with a leading
    space, as byte-level BPE vocabularies write them) are whole words more often than fragments: they
    are the pool when there are at least MIN_WORD_START_POOL of them."""

    def word(text: str) -> bool:
        return len(text) >= MIN_WORD_CHARS and text.isascii() and text.isalpha()

    starts = {piece.strip() for piece in pieces if piece.startswith(" ") and word(piece.strip())}
    if len(starts) >= MIN_WORD_START_POOL:
        return sorted(starts)
    return sorted({piece.strip() for piece in pieces if word(piece.strip())})


def draw_prompt(words: Sequence[str], rng: random.Random, extend: Extend | None = None) -> str:
    """A fresh prompt: a few vocabulary words, typed as users type them, continued by `extend`."""
    if not words:
        raise ValueError("no words to draw prompts from")
    count = rng.randint(*OPENING_WORDS)
    chosen = [rng.choice(words) for _ in range(count)]
    style = rng.random()
    if style < 0.4:
        chosen[0] = chosen[0].capitalize()
    elif style < 0.5:
        chosen = [word.lower() for word in chosen]
    text = " ".join(chosen)
    if extend is not None:
        added = rng.randint(*EXTEND_TOKENS)
        if added:
            text += extend(text, added, rng.getrandbits(32))
    return text.rstrip() or chosen[0]


def draw_sampling(rng: random.Random, *, greedy: bool | None = None) -> SamplingParams:
    """Sampling parameters as users set them; `greedy` forces the choice (None: drawn)."""
    if greedy is None:
        greedy = rng.random() < GREEDY_SHARE
    if greedy:
        return SamplingParams()
    return SamplingParams(temperature=rng.choice(TEMPERATURES), top_k=rng.choice(TOP_KS), top_p=rng.choice(TOP_PS))


def answer_tokens(rng: random.Random, room: int, min_tokens: int = DEFAULT_MIN_TOKENS) -> int:
    """Tokens to ask for: min_tokens or more, random above it, within `room` (the context left)."""
    wanted = min_tokens + rng.randint(0, MAX_EXTRA_TOKENS // 4) * 4
    return max(1, min(wanted, room))


def plan_challenges(
    count: int,
    epoch_s: float,
    words: Sequence[str],
    rng: random.Random,
    *,
    context_length: int,
    prompt_tokens: Callable[[str], int],
    extend: Extend | None = None,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    send_within: float = 1.0,
) -> list[Challenge]:
    """`count` challenges for one seed and epoch, in send order: at least one greedy, the others drawn,
    send times uniform over the first `send_within` of the epoch (the rest leaves time to answer)."""
    if count < 1:
        return []
    greedy_index = rng.randrange(count)
    plans = []
    for index in range(count):
        prompt = draw_prompt(words, rng, extend)
        room = context_length - prompt_tokens(prompt)
        sampling = draw_sampling(rng, greedy=True if index == greedy_index else None)
        send_at = rng.uniform(0.0, epoch_s * send_within)
        plans.append(Challenge(prompt, sampling, answer_tokens(rng, room, min_tokens), send_at))
    return sorted(plans, key=lambda challenge: challenge.send_at_s)


PROBATION_FACTOR = 3  # a seed this verifier has not judged yet gets this many times the challenges
UNTRUSTED_EPOCH_SHARE = 1 / 3  # an untrusted seed is challenged in this share of epochs (drawn)


def challenge_count(state: str, per_epoch: int, draw: float, *, probation: int = PROBATION_FACTOR) -> int:
    """Challenges for a seed in this trust state over one epoch; `draw` is uniform in [0, 1) from the
    verifier's unpredictable rng.

    - unverified (this verifier has not judged it): `probation` × per_epoch. A fresh identity, a caught
      cheater's perhaps, gets no user asks while trusted seeds exist and is judged on one heavy epoch:
      a seed honest on half of its asks escapes 9 challenges with probability 2^-9, against 2^-3 with
      3, and one escaped first epoch lifts R to 0.8, from where the paper's rule needs two caught
      epochs in a row (the bench measures both);
    - untrusted: per_epoch, in a random UNTRUSTED_EPOCH_SHARE of epochs (none in the others, which
      leave its R as it is). The rate is a third, so a fixed seed earns its way back, but each epoch
      that can lift it holds the full count: a lucky single honest answer is not enough;
    - trusted: per_epoch."""
    if state == "unverified":
        return per_epoch * probation
    if state == "untrusted":
        return per_epoch if draw < UNTRUSTED_EPOCH_SHARE else 0
    return per_epoch


__all__ = [
    "PROBATION_FACTOR",
    "UNTRUSTED_EPOCH_SHARE",
    "Challenge",
    "answer_tokens",
    "challenge_count",
    "draw_prompt",
    "draw_sampling",
    "plan_challenges",
    "vocabulary_words",
]
