"""The model runtime on real ONNX Runtime sessions over the committed models.

Two layouts: the bundled Llama-style demo (inputs input_ids, attention_mask, position_ids, past…;
external weights in model.onnx_data; chat template) and a GPT-2-style export (input_ids, past…,
attention_mask, position_ids), plus the same GPT-2 weights exported without a KV cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from gtorrent.errors import (
    MissingTokenizerError,
    ModelNotFoundError,
    NotACausalLMError,
    UnsupportedModelError,
    UsageError,
)
from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams, locate_model, model_id
from gtorrent.runtime.detok import IncrementalDetokenizer
from gtorrent.runtime.sampling import log_softmax

from .conftest import DEMO, GPT2, GPT2_NOCACHE, MODELS

PROMPT = "The for statement"


@pytest.fixture(scope="module")
def demo() -> LanguageModel:
    return LanguageModel.load(DEMO)


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel.load(GPT2)


@pytest.fixture(scope="module")
def gpt2_nocache() -> LanguageModel:
    return LanguageModel.load(GPT2_NOCACHE)


def greedy(max_tokens: int = 24, **kwargs: object) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, stop_at_eos=False, **kwargs)  # type: ignore[arg-type]


def test_layouts_are_bound_by_name(demo: LanguageModel, gpt2: LanguageModel) -> None:
    demo_inputs = [i.name for i in demo.session.get_inputs()]
    gpt2_inputs = [i.name for i in gpt2.session.get_inputs()]
    assert demo_inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert gpt2_inputs[1].startswith("past_key_values.") and gpt2_inputs[-2:] == ["attention_mask", "position_ids"]
    assert demo.has_cache and gpt2.has_cache
    assert demo.files.external_data and demo.files.external_data[0].name == "model.onnx_data"
    assert demo.provider == "CPUExecutionProvider"
    for lm in (demo, gpt2):
        result = lm.generate(PROMPT, greedy(16))
        assert result.tokens == 16 and result.text.strip()


@pytest.mark.parametrize("which", ["demo", "gpt2"])
def test_kv_cache_greedy_equals_full_recomputation(which: str, request: pytest.FixtureRequest) -> None:
    lm: LanguageModel = request.getfixturevalue(which)
    cached = lm.generate(PROMPT, greedy(40))
    full = lm.generate(PROMPT, greedy(40, use_cache=False))
    assert cached.token_ids == full.token_ids
    assert cached.text == full.text


def test_export_without_cache_matches_cached_export(gpt2: LanguageModel, gpt2_nocache: LanguageModel) -> None:
    assert not gpt2_nocache.has_cache
    assert gpt2_nocache.generate(PROMPT, greedy(30)).token_ids == gpt2.generate(PROMPT, greedy(30)).token_ids


def test_greedy_is_deterministic(demo: LanguageModel) -> None:
    assert demo.generate(PROMPT, greedy()).token_ids == demo.generate(PROMPT, greedy()).token_ids


def test_sampling_is_reproducible_with_a_seed(demo: LanguageModel) -> None:
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    runs = [demo.generate(PROMPT, greedy(32, sampling=sampling, seed=seed)).token_ids for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stops_at_eos_and_max_tokens(demo: LanguageModel) -> None:
    eos = next(iter(demo.eos_ids))
    # a prompt ending in EOS-likely text is not guaranteed, so check the mechanics on the token stream
    result = demo.generate(PROMPT, GenerationParams(max_tokens=5))
    assert result.tokens <= 5 and result.finish_reason in ("eos", "length")
    assert eos not in result.token_ids
    long = demo.generate(PROMPT, GenerationParams(max_tokens=300, stop_at_eos=True))
    if long.finish_reason == "eos":
        assert long.tokens < 300
    else:
        assert long.tokens == 300


def test_streamed_text_equals_final_text(demo: LanguageModel) -> None:
    pieces: list[str] = []
    sampling = SamplingParams(temperature=1.6)  # hot: produces odd byte tokens, incomplete characters
    for seed in range(6):
        pieces.clear()
        result = demo.generate("Größe 日本 ", greedy(48, sampling=sampling, seed=seed), on_text=pieces.append)
        assert "".join(pieces) == result.text == demo.decode(result.token_ids)


def test_detokenizer_never_splits_multibyte_characters(demo: LanguageModel) -> None:
    text = "naïve café — 日本語のテキスト 🎉🚀 Ωμέγα"
    ids = demo.tokenizer.encode(text, add_special_tokens=False).ids
    # the byte-level tokenizer splits these characters across tokens
    assert any("\ufffd" in demo.tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(demo.tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_score_equals_log_softmax_of_a_full_forward_pass(demo: LanguageModel) -> None:
    prompt_ids = demo.encode(PROMPT)
    continuation = demo.generate(prompt_ids, greedy(12)).token_ids
    scores = demo.score_ids(prompt_ids, continuation)
    # reference: the raw session, fed by hand, no cache
    session = demo.session
    ids = np.asarray([prompt_ids + continuation], dtype=np.int64)
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None, :],
    }
    heads, head_dim = demo.layout.past_shape
    for name in demo.layout.past_names:
        feeds[name] = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
    logits = session.run(["logits"], feeds)[0][0]
    expected = [log_softmax(logits[len(prompt_ids) - 1 + i])[tok] for i, tok in enumerate(continuation)]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)
    assert scores.shape == (12,) and np.all(scores <= 0)
    # greedy tokens are the argmax, so their log-prob is the row maximum
    assert np.all(scores > np.log(1e-6))
    text_scores = demo.score(PROMPT, demo.decode(continuation))
    assert text_scores.shape[0] > 0 and np.all(text_scores <= 0)


def test_chat_template(demo: LanguageModel, gpt2: LanguageModel) -> None:
    assert demo.chat_template is not None
    ids = demo.encode("What is a list?", chat=True)
    rendered = demo.tokenizer.decode(ids, skip_special_tokens=False)
    assert "What is a list?" in rendered and rendered.rstrip().endswith("<|assistant|>")
    with pytest.raises(UsageError, match="no chat template"):
        gpt2.encode("hi", chat=True)


def test_model_id_is_cached_and_content_addressed(tmp_path: Path) -> None:
    files = locate_model(GPT2)
    first = model_id(files, tmp_path)
    assert len(first) == 64
    assert (tmp_path / "model-hashes.json").is_file()
    assert model_id(files, tmp_path) == first
    copy = tmp_path / "copy"
    shutil.copytree(GPT2, copy)
    assert model_id(locate_model(copy), tmp_path) == first  # same bytes, same id
    with (copy / "config.json").open("a") as handle:
        handle.write("\n")
    assert model_id(locate_model(copy), tmp_path) != first


def test_model_may_be_named_by_file_or_folder() -> None:
    assert locate_model(GPT2 / "model.onnx") == locate_model(GPT2)


def test_context_overflow_and_empty_prompt(gpt2: LanguageModel) -> None:
    with pytest.raises(UsageError, match="prompt is"):
        gpt2.generate(list(range(5)) * 1000, greedy(4))
    with pytest.raises(UsageError, match="empty"):
        gpt2.generate([], greedy(4))
    room = gpt2.context_length - 10
    result = gpt2.generate([5] * room, greedy(50))
    assert result.tokens == 10 and result.finish_reason == "context"


def test_bad_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        LanguageModel.load(tmp_path / "missing")
    with pytest.raises(NotACausalLMError, match="not a causal language model"):
        LanguageModel.load(MODELS / "not-an-lm")
    with pytest.raises(UnsupportedModelError, match="use_cache_branch"):
        LanguageModel.load(MODELS / "legacy-merged")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    shutil.copy(GPT2 / "model.onnx", no_tok / "model.onnx")
    with pytest.raises(MissingTokenizerError):
        LanguageModel.load(no_tok)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.onnx").write_bytes(b"\x00not a protobuf" * 10)
    shutil.copy(GPT2 / "tokenizer.json", garbage / "tokenizer.json")
    with pytest.raises(NotACausalLMError, match="cannot load"):
        LanguageModel.load(garbage)


def test_sampling_params_are_validated() -> None:
    with pytest.raises(UsageError):
        SamplingParams(temperature=-1)
    with pytest.raises(UsageError):
        SamplingParams(top_p=0)
    with pytest.raises(UsageError):
        GenerationParams(max_tokens=0)
