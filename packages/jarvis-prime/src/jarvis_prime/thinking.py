"""Reasoning and answer apart: the one place a thinking model's reply is split (issue #22).

A model that thinks writes its reasoning between its own markers, then the answer:

    <think>
    17 is prime, 4 is not ...
    </think>

    The answer is 17.

The markers are the model's, recorded in `prime.json` and in its catalog entry as
`"thinking": {"start": "<think>", "end": "</think>"}` (absent: the model does not think).
`ReasoningSplitter` reads a reply piece by piece (markers may be cut across pieces) and
hands out reasoning and answer apart; `split_reasoning` is the same splitter fed the whole
text at once, so a streamed reply and a whole one always split alike.

Three shapes of reply are handled:

- start marker, reasoning, end marker, answer: the usual one;
- reasoning, end marker, answer: the chat template opened the start marker itself in the
  prompt (Qwen3's and DeepSeek-R1's do in some modes), so the reply begins mid-thought
  (`opened=True`; `PrimeModel.encode_chat` sees it in the rendered prompt);
- reasoning and no end marker: the reply ran out of tokens while thinking; all of it is
  reasoning, the answer is empty and `truncated` says so.

A reply that opens with neither (a thinking model asked not to think) is all answer.
Whitespace around the markers is dropped (Qwen3 writes "\\n\\n" after `</think>`).

Leaf module: imports nothing of jarvis_prime, so the manifest, the catalog, the models
and the server all use it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ThinkingMarkers(BaseModel):
    """The strings a thinking model opens and closes its reasoning with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: str = Field(min_length=1, description="Opens the reasoning, e.g. '<think>'.")
    end: str = Field(min_length=1, description="Closes it; the answer follows, e.g. '</think>'.")

    @model_validator(mode="after")
    def _distinct(self) -> "ThinkingMarkers":
        if not self.start.strip() or not self.end.strip():
            raise ValueError(f"markers must not be blank, got start={self.start!r} end={self.end!r}")
        if self.start == self.end:
            raise ValueError(f"start and end markers must differ, both are {self.start!r}")
        return self


@dataclass(frozen=True)
class ReplyParts:
    """A piece of a reply (or a whole one) split: reasoning and answer text."""

    reasoning: str = ""
    content: str = ""


@dataclass(frozen=True)
class SplitReply:
    """A whole reply split. `reasoning` is None when the reply did not think at all;
    `truncated` when it ended inside the reasoning (no end marker, no answer)."""

    reasoning: str | None
    content: str
    truncated: bool


State = Literal["before", "thinking", "answer"]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is the start of `marker` (it may yet become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Splits a streamed reply as it arrives, holding back only what may still be a marker.

    feed("<thi") gives nothing yet; feed("nk>Let me") gives reasoning "Let me"; a later
    "</think>\\n\\nParis" gives answer "Paris". `flush()` at the end gives what was held.
    """

    def __init__(self, markers: ThinkingMarkers, opened: bool = False) -> None:
        self.markers = markers
        self.state: State = "thinking" if opened else "before"
        self.thought = opened  # whether the reply has reasoning (opened, or its start marker seen)
        self._buffer = ""
        self._leading = True  # whitespace at the start of the reasoning or the answer is dropped

    @property
    def truncated(self) -> bool:
        """Whether the reply, as far as fed, is still inside its reasoning."""
        return self.state == "thinking"

    def feed(self, piece: str) -> ReplyParts:
        self._buffer += piece
        reasoning = content = ""
        while True:  # one marker may end the state and the rest of the piece belongs to the next
            if self.state == "before":
                text = self._buffer.lstrip()
                if text.startswith(self.markers.start):
                    self._buffer, self.state, self.thought = text[len(self.markers.start):], "thinking", True
                    self._leading = True
                    continue
                if self.markers.start.startswith(text):  # empty, or a start marker being cut across pieces
                    return ReplyParts(reasoning, content)
                self.state = "answer"
                continue
            if self.state == "thinking":
                reasoning += self._thinking()
                if self.state == "thinking":
                    return ReplyParts(reasoning, content)
                continue
            content += self._answer()
            return ReplyParts(reasoning, content)

    def _thinking(self) -> str:
        if self._leading:
            self._buffer = self._buffer.lstrip()
            self._leading = not self._buffer
        at = self._buffer.find(self.markers.end)
        if at != -1:
            out, self._buffer = self._buffer[:at].rstrip(), self._buffer[at + len(self.markers.end):]
            self.state, self._leading = "answer", True
            return out
        keep = _partial_suffix(self._buffer, self.markers.end)
        safe = self._buffer[:len(self._buffer) - keep]
        out = safe.rstrip()  # whitespace just before the end marker is held: it is dropped if the marker comes
        self._buffer = self._buffer[len(out):]
        return out

    def _answer(self) -> str:
        if self._leading:
            self._buffer = self._buffer.lstrip()
            self._leading = not self._buffer
        out, self._buffer = self._buffer, ""
        return out

    def flush(self) -> ReplyParts:
        """What is still held at the end of the reply."""
        held, self._buffer = self._buffer, ""
        if self.state == "thinking":
            return ReplyParts(reasoning=held.strip() if self._leading else held.rstrip())
        if self.state == "before":  # a reply that is only (part of) a start marker, or nothing
            self.state = "answer"
            return ReplyParts(content=held.strip())
        return ReplyParts(content=held.lstrip() if self._leading else held)


def split_reasoning(text: str, markers: ThinkingMarkers, opened: bool = False) -> SplitReply:
    """A whole reply as (reasoning, answer): the streaming splitter fed it at once."""
    splitter = ReasoningSplitter(markers, opened)
    first, last = splitter.feed(text), splitter.flush()
    truncated = splitter.thought and splitter.state == "thinking"
    return SplitReply(first.reasoning + last.reasoning if splitter.thought else None,
                      first.content + last.content, truncated)


def opens_thinking(prompt: str, markers: ThinkingMarkers) -> bool:
    """Whether a rendered chat prompt leaves the reasoning open: it ends with the start marker
    (and whitespace), as templates that think by default write the generation prompt."""
    return prompt.rstrip().endswith(markers.start)
