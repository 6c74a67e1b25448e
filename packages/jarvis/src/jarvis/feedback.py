"""Feedback -> training data: what `jarvis export-data` writes for reactor-core.

Every assistant reply the user reacted to becomes an example, with the conversation
up to it as context (corrections applied, the conversation's system prompt first):

- SFT (`{"messages": [...]}`): replies rated thumbs-up, and corrected replies (with
  the correction as the reply).
- DPO (`{"prompt": [...], "chosen": ..., "rejected": ...}`): a correction is chosen
  over the original reply; in a group of regenerations, a reply rated thumbs-up is
  chosen over each alternative that was not.

A reply that called tools is written in OpenAI's tool-calling shape, the one Reactor
Core trains on: the record carries `tools` (the schemas JARVIS offers: the built-ins and
the user's tools), and the reply becomes the assistant turn with its `tool_calls`, one
`role: "tool"` message per result, then the answer. A DPO pair about such a reply is
left out (counted): Reactor Core's preference data compares two answers to one prompt,
and the calls between them would be lost.

A user turn that carried images becomes a multimodal chat message: its images as
`{"type": "image", "path": "images/<sha256>.<png|jpeg|gif|bmp>"}` parts (the stored
bytes, written beside the JSONL), then its text: what Reactor Core's chat format reads
(`reactor_core.data.images`). Reactor Core's preference data is text only, so a DPO pair
whose prompt holds an image is left out (counted).

Private conversations are never exported. `scrub=True` replaces e-mail addresses,
phone and card numbers, IP addresses and secrets-looking tokens with placeholders
(regular expressions: good for the formats they know, not a guarantee; review the
files before sharing them).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from jarvis.memory import ConversationStore, StoredMessage
from jarvis.tools.builtin import ToolContext, builtin_tools
from jarvis.tools.registry import ToolRegistry, user_tools
from jarvis_prime.files import atomic_write

Message = dict[str, Any]

IMAGES_DIR = "images"  # beside the JSONL; records point into it with relative paths

def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(int(c) for c in reversed(digits)):
        total += d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2)
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


# Order matters: specific shapes first, so a card or SSN is not half-eaten by the
# phone pattern. Phone numbers need a "+country" prefix, parentheses or the usual
# 3-3-4 / 3-4 groupings, so dates (2024-01-15), versions (2.10.15) and plain numbers stay.
PII_PATTERNS: list[tuple[str, re.Pattern[str], object]] = [
    ("[EMAIL]", re.compile(r"\b[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b"), None),
    ("[SECRET]", re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\b(?:ghp|gho|ghs|hf|xox[abp])_[A-Za-z0-9]{16,}"
                            r"|\bAKIA[A-Z0-9]{16}\b"), None),
    ("[SSN]", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), None),
    ("[CARD]", re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), _card),
    ("[IP]", re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"), None),
    ("[PHONE]", re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"
                           r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\b\d{3}[ .-]\d{3}[ .-]\d{4}|\b\d{3}-\d{4})(?![\w-])"), None),
]


def scrub_pii(text: str) -> str:
    """Replace the personal data `PII_PATTERNS` recognise with placeholders."""
    for placeholder, pattern, replace in PII_PATTERNS:
        text = pattern.sub(replace or placeholder, text)
    return text


@dataclass
class ExportReport:
    sft: int = 0
    dpo: int = 0
    conversations: int = 0
    private_skipped: int = 0
    duplicates: int = 0
    unusable: int = 0  # blank replies, pairs with nothing to prefer
    image_records_skipped: int = 0  # DPO pairs about an image (and, without images=True, SFT records too)
    tool_pairs_skipped: int = 0  # DPO pairs about a reply that called tools
    images: int = 0  # image files written
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FeedbackTurn:
    """One assistant reply with feedback, and everything needed to learn from it."""

    conversation_id: str
    context: list[Message]  # system prompt + the conversation before the reply
    reply: StoredMessage
    alternatives: list[StoredMessage]  # the other replies to the same prompt (regenerations)


def feedback_turns(store: ConversationStore, *, include_private: bool = False,
                   report: ExportReport | None = None) -> Iterator[FeedbackTurn]:
    """Every reply the user rated, corrected or regenerated, oldest first."""
    report = report if report is not None else ExportReport()
    for conversation in reversed(store.list()):
        if conversation.private and not include_private:
            report.private_skipped += 1
            continue
        system = store.system_prompt(conversation.id)
        everything = store.stored_messages(conversation.id, include_inactive=True)
        groups: dict[int, list[StoredMessage]] = {}
        for m in everything:
            if m.role == "assistant":
                groups.setdefault(m.group_id, []).append(m)
        used = False
        for group_id, replies in groups.items():
            # the context is what the model saw: active messages before the first reply
            context = [_training_message(store, m) for m in everything if m.active and m.id < group_id]
            if system:
                context = [{"role": "system", "content": system}] + context
            for reply in replies:
                if reply.rating is None and not reply.corrected and len(replies) == 1:
                    continue
                used = True
                yield FeedbackTurn(conversation.id, context, reply, [r for r in replies if r.id != reply.id])
        report.conversations += used


def image_path(sha256: str, kind: str) -> str:
    """Where an exported image goes, relative to the JSONL: one file per image, named by its hash."""
    return f"{IMAGES_DIR}/{sha256}.{kind}"


def _training_message(store: ConversationStore, m: StoredMessage) -> Message:
    """A stored message as Reactor Core's chat format has it: images as relative path parts."""
    if not m.images:
        return m.as_chat()
    parts: list[dict[str, str]] = [{"type": "image", "path": image_path(sha, store.image(sha).format)}
                                   for sha in m.images]
    if m.content:
        parts.append({"type": "text", "text": m.content})
    return {"role": m.role, "content": parts}


def _image_paths(data: dict) -> list[str]:
    messages = data.get("messages") or (data["prompt"] if isinstance(data.get("prompt"), list) else [])
    return [p["path"] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]


def tool_turns(reply: StoredMessage) -> list[Message]:
    """The tools a reply called, as the messages JARVIS's tool loop sent the model: one
    assistant turn with the `tool_calls`, then each result (`role: tool`), in order."""
    if not reply.tool_calls:
        return []
    calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
             for c in reply.tool_calls]
    results = [{"role": "tool", "tool_call_id": c["id"],
                "content": c["result"] if c.get("error") is None else f"error: {c['error']}"} for c in reply.tool_calls]
    return [{"role": "assistant", "content": "", "tool_calls": calls}, *results]


def offered_tools(store: ConversationStore) -> list[dict[str, Any]]:
    """The tool schemas JARVIS offers a model with a conversation store (built-ins, the user's)."""
    return ToolRegistry([*builtin_tools(ToolContext(store, lambda: None)), *user_tools()]).schemas()


def training_examples(turn: FeedbackTurn, tools: list[dict[str, Any]] | None = None) -> tuple[list[dict], list[dict]]:
    """(SFT records, DPO records) that one reply with feedback yields; `tools`: the schemas a
    record about a reply that called tools carries."""
    reply, context = turn.reply, turn.context
    sft: list[dict] = []
    dpo: list[dict] = []
    if reply.corrected or reply.rating == 1:
        calls = tool_turns(reply)
        record = {"messages": context + calls + [{"role": "assistant", "content": reply.content}]}
        sft.append({"tools": tools or [], **record} if calls else record)
    if reply.corrected:
        dpo.append({"prompt": context, "chosen": reply.content, "rejected": reply.original})
    elif reply.rating == 1:
        for other in turn.alternatives:
            if other.rating != 1 and not other.corrected:
                dpo.append({"prompt": context, "chosen": reply.content, "rejected": other.original})
    return sft, dpo


def _scrubbed(record: dict) -> dict:
    def clean(value):
        if isinstance(value, str):
            return scrub_pii(value)
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) if k not in ("role", "type", "path", "id", "tool_call_id") else v
                    for k, v in value.items()}
        return value

    return clean(record)


@dataclass(frozen=True)
class Record:
    """One training record and where it came from: `key` (conversation:reply group) is
    the same for every record one reply yields, so splits never separate them."""

    key: str
    kind: str  # "sft" | "dpo"
    data: dict

    @property
    def images(self) -> list[str]:
        """The image files (paths relative to the JSONL) the record points to."""
        return _image_paths(self.data)


def collect(store: ConversationStore, *, scrub: bool = False, include_private: bool = False,
            report: ExportReport | None = None, images: bool = True) -> list[Record]:
    """Every training record the feedback yields, de-duplicated, blank replies dropped.
    `images=False` leaves out every record about an image (a text model's training data)."""
    report = report if report is not None else ExportReport()
    records: list[Record] = []
    seen: set[str] = set()
    tools: list[dict[str, Any]] | None = None
    for turn in feedback_turns(store, include_private=include_private, report=report):
        if turn.reply.tool_calls and tools is None:
            tools = offered_tools(store)
        turn_sft, turn_dpo = training_examples(turn, tools)
        if turn.reply.tool_calls or any(a.tool_calls for a in turn.alternatives):
            report.tool_pairs_skipped += len(turn_dpo)
            turn_dpo = []
        key = f"{turn.conversation_id}:{turn.reply.group_id}"
        for kind, found in (("sft", turn_sft), ("dpo", turn_dpo)):
            for data in found:
                data = _scrubbed(data) if scrub else data
                if not _usable(kind, data):
                    report.unusable += 1
                    continue
                if _image_paths(data) and (kind == "dpo" or not images):
                    report.image_records_skipped += 1
                    continue
                identity = kind + json.dumps(data, sort_keys=True)
                if identity in seen:
                    report.duplicates += 1
                    continue
                seen.add(identity)
                records.append(Record(key, kind, data))
    report.sft = sum(r.kind == "sft" for r in records)
    report.dpo = sum(r.kind == "dpo" for r in records)
    return records


def _usable(kind: str, data: dict) -> bool:
    """Reactor Core rejects blank replies and pairs with nothing to prefer (e.g. an empty
    reply the user corrected, or two replies the scrub made equal)."""
    if kind == "sft":
        return bool(data["messages"][-1]["content"].strip())  # a reply: always text
    chosen, rejected = data["chosen"].strip(), data["rejected"].strip()
    return bool(chosen) and bool(rejected) and chosen != rejected


def export_data(store: ConversationStore, *, sft_path: str | os.PathLike | None = None,
                dpo_path: str | os.PathLike | None = None, scrub: bool = False,
                include_private: bool = False) -> ExportReport:
    """Write the SFT and/or DPO JSONL files; each is written to a temp file and renamed,
    so an interrupted export never leaves half a file where the last good one was."""
    if sft_path is None and dpo_path is None:
        raise ValueError("nothing to write: give an SFT path, a DPO path or both")
    report = ExportReport()
    records = collect(store, scrub=scrub, include_private=include_private, report=report)
    for path, kind in ((sft_path, "sft"), (dpo_path, "dpo")):
        if path is not None:
            mine = [r for r in records if r.kind == kind]
            report.images += write_images(store, Path(path).parent, mine)
            write_jsonl(Path(path), [r.data for r in mine])
            report.files.append(str(path))
    return report


def write_images(store: ConversationStore, folder: Path, records: list[Record]) -> int:
    """The stored images `records` point to, as files under `folder` (before the JSONL that
    names them, so a JSONL on disk never points to a missing image); returns how many."""
    written = 0
    for relative in dict.fromkeys(p for r in records for p in r.images):
        sha = Path(relative).stem
        target = folder / relative
        data = store.image(sha).data
        if not target.is_file() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        written += 1
    return written


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
