"""Chat examples -> token ids, with the loss on the assistant's replies only.

The text is rendered by the tokenizer's own chat template, the one inference will use,
so the model is trained on exactly the prompt format it will be served with.

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` (the
model shifts them by one inside its loss) and every position that must not be learnt
holds `IGNORE_INDEX`. Learnt are the tokens of each assistant reply *and* the
end-of-turn marker the template writes after it (`<|im_end|>` in ChatML), because
emitting that marker is how the model learns to stop. Not learnt: system and user
turns, the `<|im_start|>assistant\\n` header (the prompt supplies it at inference),
and whitespace the template writes after the marker to separate turns (ChatML's `\\n`:
generation stops at the marker, so that newline is never produced).

How the reply tokens are found: for each assistant message `i`, render
`messages[:i]` with `add_generation_prompt=True` (the prompt, ending in the header)
and `messages[:i+1]` (the prompt plus reply). When the template renders turn by turn,
the first is a prefix of the second and both are prefixes of the full conversation, so
the reply is the character span between their ends. The full text is tokenized once
with offsets, and a token is learnt when any of its characters lie in a reply span.
Templates that rewrite earlier turns (some strip reasoning from past replies) break the
prefix property; that is reported as `ChatTemplateError` rather than guessed around.

Tool calling (formats.py): an example's `tools` go to the template (`tools=`), its
assistant `tool_calls` and `role: "tool"` results are messages like the others: a call
turn is a reply (learnt: the model must learn to call), a result is not (the tool wrote
it). A template that renders no tool list, or drops a call, would train the model on a
prompt that never shows the tools, or on an empty reply: refused (`ChatTemplateError`,
at the example's path:line) with the two ways out: a tool-aware template, or the
conversation pre-rendered as plain turns (the Hermes format, as jarvis_prime does for
SmolLM2's ChatML).

Vision models (`ImageTokens`): the processor's chat template renders every message as
parts, one placeholder (`<image>`) per image; each placeholder is then replaced by the
text the processor expands it into (a block of image tokens per tile, the tile count set
by the image's size), the reply spans shifted accordingly, and the whole tokenized once
as above. The images stay on the example as their `ImagePart`s; pixels are read only
when a batch is collated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reactor_core.data.formats import ChatExample
from reactor_core.data.images import ImagePart
from reactor_core.data.validation import (
    NO_EXAMPLES,
    ON_BAD_EXAMPLE,
    DataIssue,
    DataValidationError,
    OnBadExample,
)

IGNORE_INDEX = -100  # what torch's cross_entropy and HF losses skip

# Issue kinds raised here.
TOO_LONG = "too_long"
TEMPLATE_MISMATCH = "template_mismatch"
HAS_IMAGES = "has_images"


class ChatTemplateError(ValueError):
    """The chat template cannot be split into turns the way labelling needs."""


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation's token ids and labels (same length; IGNORE_INDEX = no loss)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    images: tuple[ImagePart, ...] = ()  # in the order of their image tokens

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ImageTokens:
    """How a vision model's processor turns images into text: its chat template writes
    `placeholder` for each image, and `expand(image)` is what that placeholder becomes
    (the image tokens of every tile). `processor` renders; its `.tokenizer` tokenizes."""

    processor: Any
    placeholder: str
    expand: Callable[[ImagePart], str]


def tokenize_chat(example: ChatExample, tokenizer: Any, images: ImageTokens | None = None) -> TokenizedExample:
    """Render `example` with the tokenizer's chat template and label its replies.

    `tokenizer` is a Hugging Face fast tokenizer (offsets need the Rust backend).
    With `images`, the vision processor renders (module docstring) and the example's
    images may be there. Raises `ChatTemplateError` when the template does not render
    turn by turn, or writes another number of image placeholders than there are images.
    """
    if images is None:
        messages = example.to_dicts()
        tools = example.tool_list
        text = _render(tokenizer, messages, tools=tools)
        if tools or any(m.tool_calls for m in example.messages):
            _check_renders_tools(tokenizer, example, messages, text)
        spans = _reply_spans(tokenizer, messages, text, tools=tools)
    else:
        messages = example.processor_messages()
        text = _render(images.processor, messages)
        spans = _reply_spans(images.processor, messages, text)
        text, spans = _expand_images(text, spans, example.images, images)

    # add_special_tokens=False: the template already wrote every special token it wants
    # (BOS included, where the model has one); adding more would change the format.
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if _overlaps_any(offsets, spans) else IGNORE_INDEX
        for token, offsets in zip(input_ids, encoding["offset_mapping"])
    ]

    if labels[0] != IGNORE_INDEX:
        # Packing relies on this: the last token of one example must never be asked to
        # predict the first token of the next one.
        raise ChatTemplateError(f"{example.source}: the first token is part of a reply")
    if all(label == IGNORE_INDEX for label in labels):
        raise ChatTemplateError(f"{example.source}: no token falls inside an assistant reply")
    return TokenizedExample(input_ids, labels, example.source, example.images if images else ())


def _expand_images(
    text: str, spans: list[tuple[int, int]], parts: tuple[ImagePart, ...], images: ImageTokens
) -> tuple[str, list[tuple[int, int]]]:
    """`text` with each image placeholder replaced by its expansion; `spans` moved along."""
    pieces = text.split(images.placeholder)
    if len(pieces) - 1 != len(parts):
        raise ChatTemplateError(f"the template wrote {len(pieces) - 1} {images.placeholder} placeholder(s) for "
                                f"{len(parts)} image(s)")
    out, shifts, at = [pieces[0]], [], len(pieces[0])  # shifts: (placeholder position, growth)
    for piece, part in zip(pieces[1:], parts):
        expanded = images.expand(part)
        shifts.append((at, len(expanded) - len(images.placeholder)))
        out += [expanded, piece]
        at += len(images.placeholder) + len(piece)
    moved = [(start + sum(g for pos, g in shifts if pos < start), end + sum(g for pos, g in shifts if pos < start))
             for start, end in spans]  # placeholders sit in user turns: never inside a reply span
    return "".join(out), moved


def tokenize_dataset(
    examples: Sequence[ChatExample],
    tokenizer: Any,
    *,
    max_seq_length: int,
    on_bad_example: OnBadExample = "error",
    images: ImageTokens | None = None,
) -> tuple[list[TokenizedExample], list[DataIssue]]:
    """Tokenize every example; report the ones that cannot be trained on.

    An example longer than `max_seq_length` tokens, or one the template cannot split
    into turns, is a `DataIssue` at its `path:line`; so is one with images when no
    vision processor is given (`images`: a text tokenizer cannot render them). Examples
    are never truncated:
    cutting a reply off would teach the model to stop mid-sentence. With "error" all
    issues are raised together as `DataValidationError`; with "skip" the bad examples
    are dropped and their issues returned. Either way an error is raised when examples
    were given but none is left.
    """
    if max_seq_length < 1:
        raise ValueError(f"`max_seq_length` must be positive, got {max_seq_length}")
    if on_bad_example not in ON_BAD_EXAMPLE:
        raise ValueError(
            f"`on_bad_example` must be one of {ON_BAD_EXAMPLE}, got {on_bad_example!r}"
        )
    if not getattr(images.processor if images else tokenizer, "chat_template", None):
        raise ChatTemplateError("the tokenizer has no chat template to render conversations")

    tokenized: list[TokenizedExample] = []
    issues: list[DataIssue] = []
    for example in examples:
        path, line = _split_source(example.source)
        if example.images and images is None:
            reason = (f"{len(example.images)} image(s): text-only training cannot use them; "
                      "they need a vision model's processor")
            issues.append(DataIssue(path, line, reason, HAS_IMAGES))
            continue
        try:
            result = tokenize_chat(example, tokenizer, images)
        except ChatTemplateError as err:
            issues.append(DataIssue(path, line, f"chat template: {err}", TEMPLATE_MISMATCH))
            continue
        if len(result) > max_seq_length:
            reason = (
                f"example is {len(result)} tokens, longer than max_seq_length {max_seq_length}"
            )
            issues.append(DataIssue(path, line, reason, TOO_LONG))
            continue
        tokenized.append(result)

    if issues and on_bad_example == "error":
        raise DataValidationError(issues)
    if examples and not tokenized:
        path, _ = _split_source(examples[0].source)
        issues.append(DataIssue(path, 0, "no usable examples left", NO_EXAMPLES))
        raise DataValidationError(issues)
    return tokenized, issues


# --------------------------------------------------------------------------------------
# Finding the replies in the rendered text
# --------------------------------------------------------------------------------------


PRE_RENDER_HINT = ("use a model whose chat template renders tools (Qwen2.5, Llama 3.1), or pre-render the "
                   "conversations as plain system/user/assistant turns (the Hermes format: "
                   "jarvis_prime.models.tools.hermes_messages)")


def _check_renders_tools(tokenizer: Any, example: ChatExample, messages: list[dict[str, Any]], text: str) -> None:
    """Refuse an example whose tools or calls the chat template does not write."""
    if example.tools and text == _render(tokenizer, messages):
        raise ChatTemplateError(f"the chat template renders no tool list (`tools` changes nothing); {PRE_RENDER_HINT}")
    for i, message in enumerate(example.messages):
        for call in message.tool_calls:
            if call.name not in text:
                raise ChatTemplateError(f"the chat template drops the tool call to {call.name!r} of message {i}; "
                                        f"{PRE_RENDER_HINT}")


def _render(
    tokenizer: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt,
        **({"tools": tools} if tools else {}),
    )
    if not isinstance(text, str):
        raise ChatTemplateError(
            f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str"
        )
    return text


def _reply_spans(
    tokenizer: Any, messages: list[dict[str, Any]], text: str, tools: list[dict[str, Any]] | None = None
) -> list[tuple[int, int]]:
    """Character spans `[start, end)` in `text` of each assistant reply + end marker."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ChatTemplateError(
                "the conversation opens with an assistant turn: no prompt precedes it"
            )
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        turn = _render(tokenizer, messages[: i + 1], tools=tools)
        if not turn.startswith(prompt):
            raise ChatTemplateError(
                f"the prompt for message {i} (rendered with add_generation_prompt=True) is not "
                f"a prefix of the conversation up to that reply: {_first_difference(prompt, turn)}"
            )
        if not text.startswith(turn):
            raise ChatTemplateError(
                f"the conversation up to message {i} is not a prefix of the whole "
                f"conversation: {_first_difference(turn, text)}"
            )
        # Separator whitespace after the end marker is not part of what the model says.
        start, end = len(prompt), len(turn.rstrip())
        if end <= start:
            raise ChatTemplateError(f"message {i}: the template renders nothing for the reply")
        spans.append((start, end))
    return spans


def _overlaps_any(token: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    """Whether any character of the token `[start, end)` lies in one of the spans."""
    start, end = token
    return any(start < span_end and end > span_start for span_start, span_end in spans)


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"they differ at character {i}: {a[i:i + 30]!r} vs {b[i:i + 30]!r}"


def _split_source(source: str) -> tuple[str, int]:
    """`"path:line"` -> (path, line); a source without a line number gets line 0."""
    path, _, line = source.rpartition(":")
    return (path, int(line)) if path and line.isdigit() else (source, 0)
