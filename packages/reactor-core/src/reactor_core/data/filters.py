"""Record filters and the PII scrub of the data pipeline: pure functions of one record.

Validation (`formats.py`) already rejects records that cannot train (no reply, an empty
one, unknown roles). These catch records that would train the wrong thing:

    too_long         more than `max_chars` characters in the messages (a pasted log)
    short_reply      fewer than `min_reply_chars` characters across the replies
    repetitive       a reply whose word 3-grams mostly repeat (a model stuck in a loop);
                     share = 1 - distinct / total, over replies of 20 words or more

The scrub replaces personal data with a placeholder in every string of the record
(the raw JSON, so the kept line keeps its own format): e-mail addresses, API keys and
tokens, US social security numbers, payment-card numbers (13-19 digits passing Luhn's
check, so an order number is left alone), IPv4 addresses and phone numbers, by the
same rules as JARVIS's export scrub.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from reactor_core.data.pipeline_config import FilterConfig

TOO_LONG = "too_long"
SHORT_REPLY = "short_reply"
REPETITIVE = "repetitive"

REPETITION_MIN_WORDS = 20

# The rules of JARVIS's own export scrub (`jarvis/feedback.py`, which cannot import this
# package: layers), kept the same so a record scrubbed by either reads alike. Order
# matters: specific shapes first, so a card or SSN is not half-eaten by the phone
# pattern. Phone numbers need a "+country" prefix, parentheses or the usual 3-3-4 / 3-4
# groupings, so dates (2024-01-15), versions (2.10.15) and plain numbers stay.
PII_PATTERNS: list[tuple[str, str, re.Pattern[str]]] = [
    ("email", "[EMAIL]", re.compile(r"\b[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")),
    ("secret", "[SECRET]", re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\b(?:ghp|gho|ghs|hf|xox[abp])_[A-Za-z0-9]{16,}"
                                      r"|\bAKIA[A-Z0-9]{16}\b")),
    ("ssn", "[SSN]", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("card", "[CARD]", re.compile(r"\b\d(?:[ -]?\d){12,18}\b")),  # and passes Luhn's check
    ("ip", "[IP]", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")),
    ("phone", "[PHONE]", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"
                                    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\b\d{3}[ .-]\d{3}[ .-]\d{4}|\b\d{3}-\d{4})(?![\w-])")),
]


# What every pattern above needs somewhere in the text: one C-speed pass rules most texts out.
_MAYBE_PII = re.compile(r"[\d@_-]|AKIA")


def check_record(texts: list[tuple[str, str]], config: FilterConfig) -> tuple[str, str] | None:
    """(kind, reason) of the first filter `texts` ((role, text) per message) fails, or None."""
    total = sum(len(text) for _, text in texts)
    if total > config.max_chars:
        return TOO_LONG, f"{total} characters in the messages (max_chars {config.max_chars})"
    replies = [text for role, text in texts if role == "assistant"]
    reply_chars = sum(len(text.strip()) for text in replies)
    if reply_chars < config.min_reply_chars:
        return SHORT_REPLY, f"{reply_chars} characters of reply (min_reply_chars {config.min_reply_chars})"
    if config.max_repetition < 1.0:
        for i, reply in enumerate(replies):
            share = repetition(reply)
            if share > config.max_repetition:
                return REPETITIVE, f"reply {i}: {share:.0%} of its word 3-grams repeat (max_repetition {config.max_repetition})"
    return None


def repetition(text: str) -> float:
    """Share of the word 3-grams of `text` that repeat an earlier one; 0 below
    REPETITION_MIN_WORDS words (too short to judge)."""
    words = text.lower().split()
    if len(words) < REPETITION_MIN_WORDS:
        return 0.0
    grams = Counter(zip(words, words[1:], words[2:]))
    total = len(words) - 2
    return 1.0 - len(grams) / total


def scrub(value: Any, counts: Counter[str]) -> Any:
    """`value` (any JSON) with personal data replaced in every string; `counts` gains
    one per replacement, by kind. Dict keys are left alone."""
    if isinstance(value, str):
        return scrub_text(value, counts)
    if isinstance(value, list):
        return [scrub(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v, counts) for k, v in value.items()}
    return value


def scrub_text(text: str, counts: Counter[str]) -> str:
    if not _MAYBE_PII.search(text):  # nothing any pattern needs: the common case
        return text
    for kind, placeholder, pattern in PII_PATTERNS:
        def replace(m: re.Match[str], kind: str = kind, placeholder: str = placeholder) -> str:
            if kind == "card" and not luhn(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return placeholder
        text = pattern.sub(replace, text)
    return text


def luhn(number: str) -> bool:
    """Luhn's checksum over the digits of `number` (what payment-card numbers pass)."""
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
