"""The models people have: the ONNX Runtime GenAI layout, chat templates in chat_template.jinja, and
templates that call transformers' helpers (strftime_now, tojson, loop controls).

tests/models/llama-genai is a real onnxruntime_genai.models.builder export (scripts/build_genai_model.py):
GroupQueryAttention, a symbolic KV head size, no position_ids, no config.json, the template saved by
transformers 5 as chat_template.jinja; expected.json holds onnxruntime-genai's own greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gtorrent.errors import UnsupportedModelError
from gtorrent.runtime import GenerationParams, LanguageModel, SamplingParams, locate_model
from gtorrent.runtime.chat import find_chat_template, render_chat
from gtorrent.runtime.model import config_from_genai
from gtorrent.runtime.prefix_cache import PrefixCache

from .conftest import MODELS

GENAI = MODELS / "llama-genai"
LLAMA_SMALL = MODELS / "llama-small"
USER_TURN = "<|user|>\nhi<|end|>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def genai() -> LanguageModel:
    return LanguageModel.load(GENAI)


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GENAI / "expected.json").read_text(encoding="utf-8"))
    return doc


def greedy(n: int, **kwargs: Any) -> GenerationParams:
    return GenerationParams(max_tokens=n, sampling=SamplingParams(temperature=0.0), stop_at_eos=False, **kwargs)


# ----------------------------------------------------------------- the GenAI layout


def test_genai_layout_loads_from_genai_config(genai: LanguageModel) -> None:
    assert not (GENAI / "config.json").exists()  # the fixture really is the GenAI layout
    assert genai.has_cache and "position_ids" not in genai.layout.input_names
    assert genai.layout.past_shape == (2, 16)  # KV heads from the graph, head size from genai_config.json
    assert genai.context_length == 512 and genai.eos_ids == frozenset({0})


def test_genai_greedy_matches_onnxruntime_genai(genai: LanguageModel, expected: dict[str, Any]) -> None:
    prompt_ids = genai.encode(expected["prompt"])
    assert prompt_ids == expected["prompt_ids"]
    n = len(expected["greedy_ids"])
    assert genai.generate(prompt_ids, greedy(n)).token_ids == expected["greedy_ids"]
    # GroupQueryAttention also runs as a plain full pass each step (no past), with the same tokens
    assert genai.generate(prompt_ids, greedy(n, use_cache=False)).token_ids == expected["greedy_ids"]


def test_genai_layout_with_prefix_cache_and_io_binding(expected: dict[str, Any]) -> None:
    model = LanguageModel.load(GENAI, prefix_cache=PrefixCache(1 << 20), io_binding=True)
    prompt_ids = expected["prompt_ids"] * 5  # 25 tokens: two whole chunks go to the prefix cache
    first = model.generate(prompt_ids, greedy(8))
    again = model.generate(prompt_ids, greedy(8))
    assert again.cached_tokens > 0 and again.token_ids == first.token_ids
    plain = LanguageModel.load(GENAI).generate(prompt_ids, greedy(8))
    assert plain.token_ids == first.token_ids


def test_genai_files_are_part_of_the_model() -> None:
    names = {p.name for p in locate_model(GENAI).all_files}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "chat_template.jinja", "tokenizer.json"} <= names


def test_genai_config_names_the_graph(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(GENAI, folder)
    shutil.copyfile(folder / "model.onnx", folder / "decoder.onnx")
    config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    config["model"]["decoder"]["filename"] = "decoder.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert locate_model(folder).onnx_path.name == "decoder.onnx"
    # a name that leaves the folder is not followed
    config["model"]["decoder"]["filename"] = "../decoder.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert locate_model(folder).onnx_path.name == "model.onnx"


def test_config_from_genai_reads_the_builders_schema() -> None:
    doc = {
        "model": {
            "bos_token_id": 1, "eos_token_id": [2, 32007], "pad_token_id": 2, "context_length": 4096,
            "vocab_size": 32064, "type": "phi3",
            "decoder": {"filename": "model.onnx", "head_size": 96, "hidden_size": 3072,
                        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8},
        },
        "search": {"max_length": 4096, "past_present_share_buffer": True},
    }
    config = config_from_genai(doc)
    assert config["head_dim"] == 96 and config["num_key_value_heads"] == 8
    assert config["max_position_embeddings"] == 4096 and config["eos_token_id"] == [2, 32007]
    assert config_from_genai({}) == {} and config_from_genai({"model": "x"}) == {}
    assert config_from_genai({"model": {"decoder": 3, "context_length": 64}}) == {"max_position_embeddings": 64}


# ----------------------------------------------------------------- chat_template.jinja


def test_chat_template_jinja_of_a_fresh_export(genai: LanguageModel) -> None:
    # transformers 5 saved the template to chat_template.jinja and left tokenizer_config.json without one
    assert "chat_template" not in json.loads((GENAI / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids = genai.encode("hi", chat=True)
    assert genai.tokenizer.decode(ids, skip_special_tokens=False) == USER_TURN


def test_chat_template_moved_to_jinja_file(tmp_path: Path) -> None:
    folder = tmp_path / "llama-small"
    shutil.copytree(LLAMA_SMALL, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "chat_template.jinja").write_text(config.pop("chat_template"), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    model = LanguageModel.load(folder)
    assert model.tokenizer.decode(model.encode("hi", chat=True), skip_special_tokens=False) == USER_TURN
    assert "chat_template.jinja" in {p.name for p in model.files.all_files}  # hashed into the model id


def test_chat_template_file_wins_over_tokenizer_config(tmp_path: Path) -> None:
    config = {"chat_template": "from-config"}
    assert find_chat_template(tmp_path, config) == "from-config"
    (tmp_path / "chat_template.jinja").write_text("from-file", encoding="utf-8")
    assert find_chat_template(tmp_path, config) == "from-file"  # as transformers' tokenizer loading
    (tmp_path / "chat_template.jinja").write_text(" \n", encoding="utf-8")
    assert find_chat_template(tmp_path, config) == "from-config"  # an empty file is no template
    assert find_chat_template(tmp_path, {}) is None


# ----------------------------------------------------------------- transformers' template helpers


def test_strftime_now_renders_the_clock() -> None:
    fixed = datetime(2026, 11, 25, 1, 2, 3)
    assert render_chat("{{ strftime_now('%d %b %Y %H:%M') }}", [], {}, now=lambda: fixed) == "25 Nov 2026 01:02"


def test_llama3_date_line_is_today() -> None:
    # the preamble of Llama 3.1/3.2/3.3's template: without strftime_now it silently prints 26 Jul 2024
    template = (
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
        "{%- endif %}{%- endif %}Today Date: {{ date_string }}"
    )
    before = datetime.now().strftime("%d %b %Y")
    rendered = render_chat(template, [], {})
    after = datetime.now().strftime("%d %b %Y")  # local time, like transformers' datetime.now()
    assert rendered in (f"Today Date: {before}", f"Today Date: {after}")


def test_tojson_and_loop_controls_as_transformers() -> None:
    messages = [{"role": "user", "content": "<a & 'b'>"}, {"role": "user", "content": "second"}]
    assert render_chat("{{ messages[0]['content'] | tojson }}", messages, {}) == "\"<a & 'b'>\""
    assert render_chat("{{ messages[0] | tojson(indent=1) }}", messages[:1], {}) == json.dumps(messages[0], indent=1)
    looped = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    assert render_chat(looped, messages, {}) == "<a & 'b'>"


@pytest.mark.parametrize("template", ["{{ 'a' + 1 }}", "{{ strftime_now(3) }}", "{{ raise_exception('no') }}"])
def test_a_failing_template_is_the_models_error(template: str) -> None:
    with pytest.raises(UnsupportedModelError, match="chat template failed to render"):
        render_chat(template, [], {})


def test_run_chat_on_the_genai_layout(cli) -> None:  # type: ignore[no-untyped-def]
    result = cli("run", "hi", "--chat", "-n", "4", "--json", "--model", str(GENAI))
    assert result.code == 0, result
    assert json.loads(result.out)["tokens"] >= 1
