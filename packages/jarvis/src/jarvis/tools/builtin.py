"""JARVIS's built-in tools: the calculator, the clock, search of past conversations, memory.

The calculator and the clock are plain functions. The others act on the conversation store,
so `builtin_tools(context)` makes them for one conversation (`ToolContext`): search leaves out
the conversation asking and every private one; `remember` does not write at once but adds to
`context.facts`, which the `Chatbot` saves once the turn is stored, with the ids of the
conversation and of the user message the fact came from (neither exists before). A private
conversation never feeds memory: `remember` says so to the model and saves nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field

from jarvis.memory import MAX_FACT_CHARS, ConversationStore, normalize_fact
from jarvis.tools.calculator import evaluate, format_number

SEARCH_RESULTS = 5
RECALL_RESULTS = 5


def calculator(expression: Annotated[str, Field(description="arithmetic with numbers, parentheses and "
                                                             "+ - * / // % ** (e.g. (12.5 * 7) / 3)")]) -> str:
    """Exact arithmetic. Call it for any calculation instead of working it out yourself."""
    return format_number(evaluate(expression))


def current_datetime(timezone: Annotated[str | None, Field(description="an IANA time zone such as Europe/Paris; "
                                                                        "default: the user's own")] = None) -> str:
    """The current date, time and weekday. Call it for anything about today, now or dates relative to today."""
    if timezone:
        try:
            now = datetime.now(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}: give an IANA name such as Europe/Paris or "
                             "America/New_York") from None
    else:
        now = datetime.now().astimezone()  # the machine's local zone
    offset = now.strftime("%z")
    return f"{now:%A %d %B %Y, %H:%M:%S} {now.tzname()} (UTC{offset[:3]}:{offset[3:]}){f', {timezone}' if timezone else ''}"


@dataclass
class ToolContext:
    """The conversation the tools act for. `conversation` is read when a tool runs (a new
    conversation gets its id only when its first turn is stored)."""

    store: ConversationStore
    conversation: Callable[[], str | None]
    facts: list[str] = field(default_factory=list)  # what `remember` was asked to save this turn

    def private(self) -> bool:
        cid = self.conversation()
        return cid is not None and self.store.get(cid).private


def builtin_tools(context: ToolContext | None) -> list[Callable[..., str]]:
    """The built-ins; without a store (`--no-save`), only the calculator and the clock."""
    if context is None:
        return [calculator, current_datetime]

    def search_conversations(query: Annotated[str, Field(description="words to look for")]) -> str:
        """Search the user's past conversations (not this one) for what was said about something."""
        hits = context.store.search_messages(query, SEARCH_RESULTS, exclude=context.conversation())
        if not hits:
            return f"nothing about {query!r} in past conversations"
        return "\n".join(f"- {time.strftime('%Y-%m-%d', time.localtime(h.created))}, \"{h.title}\", {h.role}: "
                         f"{h.snippet}" for h in hits)

    def remember(fact: Annotated[str, Field(description="the fact, in one short sentence, e.g. "
                                                         "\"The user's sister's birthday is 3 May.\"")]) -> str:
        """Save a lasting fact about the user that they want remembered in later conversations."""
        if context.private():
            return "not saved: this conversation is private, and private conversations never feed memory"
        if len(fact) > MAX_FACT_CHARS:
            raise ValueError(f"a fact is at most {MAX_FACT_CHARS} characters")
        known = {normalize_fact(f.text) for f in context.store.facts()} | {normalize_fact(f) for f in context.facts}
        if normalize_fact(fact) in known:
            return "already remembered"
        context.facts.append(fact)
        return "saved"

    def recall(query: Annotated[str, Field(description="what to look for in memory")]) -> str:
        """Look up facts the user asked you to remember."""
        facts = context.store.recall(query, RECALL_RESULTS)
        return "\n".join(f"- {f.text}" for f in facts) if facts else "nothing remembered about that"

    return [calculator, current_datetime, search_conversations, remember, recall]
