"""Record filters and the PII scrub of the data pipeline: pure functions of one record.

Validation (`formats.py`) already rejects records that cannot train (no reply, an empty
one, unknown roles). These catch records that would train the wrong thing:

    too_long         more than `max_chars` characters in the messages (a pasted log)
    short_reply      fewer than `min_reply_chars` characters across the replies
    repetitive       a reply whose word 3-grams mostly repeat (a model stuck in a loop);
                     share = 1 - distinct / total, over replies of 20 words or more

The scrub replaces personal data with a placeholder in every string of the record
(the raw JSON, so the kept line keeps its own format): e-mail addresses, phone numbers,
IPv4 addresses and payment-card numbers (13-19 digits passing Luhn's check, so an order
number is left alone).
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

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
# +country code or a leading 0/(area), then groups: 7+ digits in all, as phone numbers are written
PHONE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w.])")

PLACEHOLDERS: dict[str, str] = {"email": "<EMAIL>", "card": "<CARD_NUMBER>", "ip": "<IP_ADDRESS>", "phone": "<PHONE>"}


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
    if not any(c.isdigit() or c == "@" for c in text):  # the common case, cheaply
        return text

    def sub(kind: str, pattern: re.Pattern[str], text: str, keep: Any = None) -> str:
        def replace(m: re.Match[str]) -> str:
            if keep is not None and keep(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        return pattern.sub(replace, text)

    text = sub("email", EMAIL, text)
    text = sub("card", CARD, text, keep=lambda s: not luhn(s))
    text = sub("ip", IPV4, text)
    return sub("phone", PHONE, text, keep=lambda s: not 7 <= sum(c.isdigit() for c in s) <= 15)  # E.164: <= 15


def luhn(number: str) -> bool:
    """Luhn's checksum over the digits of `number` (what payment-card numbers pass)."""
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
