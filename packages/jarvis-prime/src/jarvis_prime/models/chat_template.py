"""Render a model's own Jinja chat template, the way transformers does, without torch.

Both backends format chats through this one renderer, so a conversation becomes the
same prompt (and the same token ids) on llama.cpp and on transformers. The Jinja
environment mirrors `transformers.utils.chat_template_utils` (sandboxed, trim_blocks,
lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`); a test
checks the output against `tokenizer.apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # what a template that knows tools reads beside role and content


class ChatTemplateError(ValueError):
    """Messages the template cannot render, or a template that raised."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _parts(content: Any) -> bool:
    """Content parts as a vision template reads them (`models.content.split_images` makes them)."""
    return isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") in ("text", "image")
                                             for p in content)


def validate_messages(messages: Sequence[Mapping[str, Any]], tools: bool = False) -> list[dict[str, Any]]:
    """Plain {'role', 'content'} dicts, or a ChatTemplateError naming the bad message.

    Content is a string, or a list of text / image parts for a vision model's template.
    With `tools` (a template that knows them), `role: tool` messages and an assistant's
    `tool_calls` pass through too (an assistant turn that only calls has content "")."""
    if not messages:
        raise ChatTemplateError("messages: at least one message is required")
    roles = ROLES + ("tool",) if tools else ROLES
    clean = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in roles:
            raise ChatTemplateError(f"messages[{i}].role: must be one of {roles}, got {role!r}")
        if tools and content is None and message.get("tool_calls"):
            content = ""
        if not isinstance(content, str) and not _parts(content):
            raise ChatTemplateError(f"messages[{i}].content: must be a string or text/image parts, "
                                    f"got {type(content).__name__}")
        extra = {k: message[k] for k in TOOL_KEYS if tools and message.get(k) is not None}
        clean.append({"role": role, "content": content, **extra})
    return clean


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)  # bos_token, eos_token, ...

    @property
    def knows_tools(self) -> bool:
        """Whether the template renders a tool list itself (it reads `tools`); if not, tool
        calls and results are written into plain turns first (`models/tools.py`)."""
        return "tools" in self.source

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        clean = validate_messages(messages, tools=self.knows_tools)
        extra = {"tools": list(tools)} if tools else {}
        try:
            return _compile(self.source).render(
                messages=clean, add_generation_prompt=add_generation_prompt, **extra, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"chat template: {err}") from err
