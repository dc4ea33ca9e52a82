"""ChatTemplate: a checkpoint's Jinja chat template (chat_template.jinja or tokenizer_config.json), rendered the
way transformers' apply_chat_template renders it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that does not load, or messages it refuses (its raise_exception, a render error)."""


class ChatTemplate:
    """Turns chat messages into one prompt string, ending with the assistant's turn opened."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise ChatTemplateError(f"chat template does not parse: {err}") from err
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a checkpoint directory, or None when it has none."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ChatTemplateError(f"{config_file}: not valid JSON ({err})") from err
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        if not source:
            return None
        if not isinstance(source, str):
            raise ChatTemplateError(
                f"{config_file}: chat_template must be a string, got {type(source).__name__}"
            )
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                special[name] = token
        return cls(source, special)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{"role": ..., "content": ...}, ...])."""
        try:
            return self._template.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except (jinja2.TemplateError, TypeError, ValueError) as err:
            raise ChatTemplateError(f"chat template failed on these messages: {err}") from err


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)
