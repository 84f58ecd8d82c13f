"""Streaming detokenization (gtorrent/runtime/detok.py): the streamed pieces joined equal the tokenizer's
full decode, on every committed model's tokenizer and on SentencePiece-style byte-fallback tokenizers
built here, with characters split across tokens, special tokens, invalid byte sequences and the
prompt/answer boundary. One known exception, inherent to streaming: a byte-fallback run that turns out
invalid after part of it was released (the last test)."""

from __future__ import annotations

import functools
import hashlib
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams
from gtorrent.runtime.detok import IncrementalDetokenizer

from .conftest import DEMO, MODELS

TEXT = "naïve café — 日本語のテキスト 🎉🚀 Ωμέγα, the end."
SPECIALS = ["<unk>", "<s>", "</s>"]
MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("e", "n"), ("▁", "e"), ("n", "d")]


@functools.cache
def demo_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


def committed_tokenizers() -> dict[str, Path]:
    """One tokenizer.json per distinct content among the bundled demo and tests/models/*."""
    found: dict[str, Path] = {}
    for path in [DEMO / "tokenizer.json", *sorted(MODELS.glob("*/tokenizer.json"))]:
        found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return {path.parent.name: path for path in found.values()}


@functools.cache
def sentencepiece_style_tokenizer(style: str = "llama") -> Tokenizer:
    """A SentencePiece-style tokenizer (BPE over '▁' for spaces, byte fallback for characters outside
    the vocabulary) whose vocabulary is ASCII only, so every other character becomes 2-4 <0xNN> byte
    tokens. `style` "llama" is Llama 2's (a '▁' prepended to the text and stripped again by the decoder
    chain Replace, ByteFallback, Fuse, Strip); "gemma" prepends nothing and strips nothing."""
    pieces = [*SPECIALS, *(f"<0x{byte:02X}>" for byte in range(256)), "▁"]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces += [left + right for left, right in MERGES]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab, MERGES, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    chain = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence([*chain, decoders.Strip(" ", 1, 0)])
    else:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
        tokenizer.decoder = decoders.Sequence(chain)
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detok.push(token) for token in ids]
    pieces.append(detok.flush())
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("name", sorted(committed_tokenizers()))
def test_stream_equals_the_full_decode_on_each_committed_tokenizer(name: str) -> None:
    tokenizer = Tokenizer.from_file(str(committed_tokenizers()[name]))
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    # the byte-level vocabulary splits these characters across tokens
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing was left to flush


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_byte_fallback_characters_split_across_tokens_come_out_whole(style: str) -> None:
    tokenizer = sentencepiece_style_tokenizer(style)
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    tokens = [tokenizer.id_to_token(token) for token in ids]
    assert tokens[tokens.index("<0xE6>") : tokens.index("<0xE6>") + 3] == ["<0xE6>", "<0x97>", "<0xA5>"]  # 日
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert "日" in pieces and "🎉" in pieces  # each released whole, once its last byte arrived


def test_an_incomplete_character_at_the_end_is_held_then_flushed_as_the_full_decode_has_it() -> None:
    tokenizer = demo_tokenizer()
    ids = tokenizer.encode("ok 日", add_special_tokens=False).ids
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the last token completes 日
    detok = IncrementalDetokenizer(tokenizer)
    pushed = [detok.push(token) for token in ids[:-1]]
    assert "".join(pushed) == tokenizer.decode(ids[:-1]).rstrip("\ufffd")  # 日's first bytes are held
    tail = detok.flush()
    assert "".join(pushed) + tail == tokenizer.decode(ids[:-1]) and tail.endswith("\ufffd")
    assert detok.flush() == ""
    # after a flush the detokenizer starts afresh
    assert detok.push(ids[-1]) + detok.flush() == tokenizer.decode(ids[-1:])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept_as_the_full_decode_does(skip: bool) -> None:
    tokenizer = demo_tokenizer()
    user, end = tokenizer.token_to_id("<|user|>"), tokenizer.token_to_id("<|end|>")
    half = tokenizer.encode("日本", add_special_tokens=False).ids
    ids = [user, *half[:1], end, *half[1:], *tokenizer.encode(" fine", add_special_tokens=False).ids, end]
    pieces = stream(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|user|>" in "".join(pieces)) is not skip


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(min_value=0, max_value=demo_tokenizer().get_vocab_size() - 1), max_size=60),
    skip=st.booleans(),
)
def test_any_id_sequence_streams_to_the_full_decode_on_the_demo_tokenizer(ids: list[int], skip: bool) -> None:
    """Random ids: lone continuation bytes, truncated characters, special tokens anywhere."""
    tokenizer = demo_tokenizer()
    pieces = stream(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert not any(piece.endswith("\ufffd") for piece in pieces[:-1])  # only the flush may end mid-character


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=40),
    style=st.sampled_from(["llama", "gemma"]),
)
def test_any_text_streams_to_its_full_decode_on_a_byte_fallback_tokenizer(text: str, style: str) -> None:
    tokenizer = sentencepiece_style_tokenizer(style)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any(piece.endswith("\ufffd") for piece in pieces)


def test_answer_continues_the_prompt_without_repeating_or_dropping_text() -> None:
    """The stream is the answer alone (its own decode): for byte-level BPE that is exactly the text the
    prompt's decode is continued by, leading space included. A SentencePiece-style decoder drops the
    first answer token's leading space, as decode(answer_ids) does."""
    model = LanguageModel.load(DEMO)
    prompt_ids = model.encode("Größe 日本 and the")
    for seed in range(3):
        pieces: list[str] = []
        params = GenerationParams(max_tokens=24, sampling=SamplingParams(temperature=1.6), seed=seed)
        result = model.generate(prompt_ids, params, on_text=pieces.append)
        assert "".join(pieces) == result.text == model.decode(result.token_ids)
        assert model.decode(prompt_ids) + result.text == model.decode(prompt_ids + result.token_ids)
    spm = sentencepiece_style_tokenizer()
    prompt = spm.encode("the capital is").ids
    answer = spm.encode("Paris, the end", add_special_tokens=False).ids
    assert spm.id_to_token(answer[0]) == "▁"  # the answer starts with a space token
    assert spm.decode(prompt + answer) == "the capital is Paris, the end"
    assert "".join(stream(spm, answer)) == spm.decode(answer) == "Paris, the end"


def test_a_byte_run_that_turns_invalid_after_part_of_it_was_released_does_not_break_the_stream() -> None:
    """ByteFallback decodes a run of <0xNN> tokens as one: when the run is not valid UTF-8, every byte
    of it becomes U+FFFD, the ASCII ones too. So a later byte can rewrite text already released, which
    DecodeStream refuses ("Invalid prefix"); the stream cannot take text back, and goes on after the
    old text's length, as the hand-written detokenizer did."""
    tokenizer = sentencepiece_style_tokenizer("gemma")
    ids = [tokenizer.token_to_id("<0x61>"), tokenizer.token_to_id("<0xEB>"), tokenizer.token_to_id("b")]
    assert tokenizer.decode(ids[:1]) == "a" and tokenizer.decode(ids) == "\ufffd\ufffdb"
    assert stream(tokenizer, ids) == ["a", "", "\ufffdb", ""]
