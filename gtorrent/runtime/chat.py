"""Chat formatting with the model's own template, found and rendered as Hugging Face transformers does.

The template is `chat_template.jinja` beside the model (where transformers 4.57 and 5.x and optimum-cli
save it, even when the source had it in tokenizer_config.json) or else `chat_template` in
tokenizer_config.json; when both exist the file wins, as in transformers' tokenizer loading.

Templates are Jinja; they come with the model, so they are rendered in Jinja's sandbox, which refuses
attribute access that could reach Python internals. The environment matches transformers'
(`chat_template_utils._compile_jinja_template`): trim_blocks/lstrip_blocks, the loopcontrols
extension, `raise_exception`, `strftime_now` (the local date and time, as `datetime.now()`; Llama 3.x
templates print today's date with it) and a `tojson` that does not HTML-escape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UnsupportedModelError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...} in some configs
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    # transformers' filter: Jinja's own escapes <, >, & and ' for HTML, which a prompt must not get
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def find_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The model's chat template: `chat_template.jinja` in `folder`, else tokenizer_config.json's."""
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UnsupportedModelError(
                f"cannot read the chat template {path} ({exc})", hint="run without --chat"
            ) from exc
        if text.strip():
            return text
    return chat_template_of(tokenizer_config)


def chat_template_of(tokenizer_config: dict[str, Any]) -> str | None:
    """The template inside tokenizer_config.json (`chat_template`: a string or named templates)."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    tokenizer_config: dict[str, Any],
    *,
    now: Callable[[], datetime] = datetime.now,
) -> str:
    """Render `messages` with the template, ending with the assistant's turn opened. `now` is the clock
    behind `strftime_now` (local time, as in transformers)."""

    def strftime_now(fmt: str) -> str:
        return now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
        )
    except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as exc:
        # the template is the model's code: `'a' + 1`, a bad strftime format or a missing key is its fault
        raise UnsupportedModelError(
            f"the model's chat template failed to render ({exc})", hint="run without --chat"
        ) from exc
