"""Reading the final answer off a model's reply, one way for everyone (a leaf).

The reasoning model's recipe scores its held-out set with it, `jarvis.reasoning` votes
with it, and `benchmarks/reasoning.py` compares rows with it: a figure only means
something if every model's reply is read the same way. It lives here, below both,
because jarvis_prime may not import jarvis.
"""

from __future__ import annotations

import re

# The instruction that asks a chat model for visible steps and a final answer line.
STEP_BY_STEP = (
    "Solve the problem step by step, showing your reasoning briefly. "
    "Then give the final answer on the last line as 'Answer: <answer>'."
)
THINK_START, THINK_END = "<think>", "</think>"

_ANSWER_LINE = re.compile(r"answer[ \t]*(?:is|:)[ \t]*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise(answer: str) -> str:
    """Comparable form of an answer: one that starts with a number is that number as a
    plain decimal ("$1,200.00 total" -> "1200"), else lowercase words without articles
    or punctuation ("The Cat." -> "cat")."""
    text = answer.strip().strip("*").strip()
    number = re.match(r"\$?\s*(-?\d[\d,]*(?:\.\d+)?)(?![\d/:])", text)
    if number:
        value = float(number.group(1).replace(",", ""))
        return str(int(value)) if value.is_integer() else str(value)
    words = re.sub(r"[^\w\s-]", "", text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def extract_answer(reply: str) -> str | None:
    """The final answer in a reply: the last 'Answer: X' line, else the last number.

    A reply that thinks (`<think>...</think>`) is read after its last `</think>`, so a
    step inside the thinking ("the answer is ..." said on the way) never counts; a reply
    whose thinking never closes is read whole.
    """
    if THINK_END in reply:
        reply = reply.rsplit(THINK_END, 1)[1]
    matches = [m.strip() for m in _ANSWER_LINE.findall(reply) if m.strip()]
    if matches:
        return normalise(matches[-1])
    numbers = _NUMBER.findall(reply)
    return normalise(numbers[-1]) if numbers else None
