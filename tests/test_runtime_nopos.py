"""An export without a `position_ids` input (as some optimum exports of GPT-2 and others have):
the graph derives positions from the past length. `tests/models/gpt2-tiny-nopos` holds the
gpt2-tiny weights exported that way, so with no padding it must behave exactly like gpt2-tiny.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from gtorrent.runtime import GenerationParams, LanguageModel

from .conftest import GPT2, MODELS

NOPOS = MODELS / "gpt2-tiny-nopos"
PROMPTS = ["The for statement", 'The "while" statement is used for repeated execution']


@pytest.fixture(scope="module")
def nopos() -> LanguageModel:
    return LanguageModel.load(NOPOS)


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel.load(GPT2)


def greedy(max_tokens: int = 30, **kwargs: object) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, stop_at_eos=False, **kwargs)  # type: ignore[arg-type]


def test_inputs_have_no_position_ids(nopos: LanguageModel) -> None:
    names = [i.name for i in nopos.session.get_inputs()]
    assert "position_ids" not in names
    assert names == [
        "input_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
        "attention_mask",
    ]
    assert nopos.session.get_outputs()[0].name == "logits"
    assert nopos.has_cache


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_export_with_position_ids(
    nopos: LanguageModel, gpt2: LanguageModel, prompt: str
) -> None:
    got = nopos.generate(prompt, greedy(30))
    want = gpt2.generate(prompt, greedy(30))
    assert got.tokens == 30
    assert got.token_ids == want.token_ids
    assert got.text == want.text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_kv_cache_greedy_equals_full_recomputation(nopos: LanguageModel, prompt: str) -> None:
    cached = nopos.generate(prompt, greedy(30))
    full = nopos.generate(prompt, greedy(30, use_cache=False))
    assert cached.token_ids == full.token_ids


def test_logits_match_with_past_and_multi_token_chunks(gpt2: LanguageModel) -> None:
    """Straight onnxruntime, no gtorrent: a 4-token prefill, then a 3-token chunk and a 1-token
    step on top of the cache. Positions come from the past length, so the logits equal those of
    gpt2-tiny fed explicit positions (same weights, attention_mask all ones)."""
    ids = gpt2.encode(PROMPTS[1])[:8]
    assert len(ids) == 8
    sessions = {
        d.name: ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        for d in (GPT2, NOPOS)
    }
    pasts: dict[str, dict[str, np.ndarray]] = {}
    for name, sess in sessions.items():
        shape = sess.get_inputs()[1].shape
        pasts[name] = {
            i.name: np.zeros((1, shape[1], 0, shape[3]), np.float32)
            for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")
        }
    start = 0
    for chunk in (ids[:4], ids[4:7], ids[7:]):
        end = start + len(chunk)
        logits = {}
        for name, sess in sessions.items():
            feeds = {
                "input_ids": np.array([chunk], np.int64),
                "attention_mask": np.ones((1, end), np.int64),
                **pasts[name],
            }
            if any(i.name == "position_ids" for i in sess.get_inputs()):
                feeds["position_ids"] = np.arange(start, end, dtype=np.int64)[None]
            out_names = [o.name for o in sess.get_outputs()]
            out = dict(zip(out_names, sess.run(None, feeds), strict=True))
            logits[name] = out["logits"]
            pasts[name] = {
                k.replace("present.", "past_key_values."): v for k, v in out.items() if k != "logits"
            }
            assert out["present.0.key"].shape[2] == end
        assert logits[NOPOS.name].shape == logits[GPT2.name].shape == (1, len(chunk), 1024)
        np.testing.assert_allclose(logits[NOPOS.name], logits[GPT2.name], rtol=0, atol=1e-5)
        start = end
