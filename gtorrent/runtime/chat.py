"""Chat formatting with the model's own template (`chat_template` in tokenizer_config.json).

Templates are Jinja, as in Hugging Face transformers; they come with the model, so they are rendered
in Jinja's sandbox, which refuses attribute access that could reach Python internals.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import UnsupportedModelError


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...} in some configs
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def chat_template_of(tokenizer_config: dict[str, Any]) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def render_chat(template: str, messages: list[dict[str, str]], tokenizer_config: dict[str, Any]) -> str:
    """Render `messages` with the template, ending with the assistant's turn opened."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
        )
    except TemplateError as exc:
        raise UnsupportedModelError(
            f"the model's chat template failed to render ({exc})", hint="run without --chat"
        ) from exc
