"""Chat examples as typed messages, and one converter per source format.

Everything downstream (validation, templating, packing) sees only `ChatExample`:
a tuple of `Message(role, content)` plus the `path:line` it came from, so a problem
found at any later stage can still point at the line a person has to fix.

Three JSONL record shapes are accepted; `parse_record` recognises them by their keys:

    chat SFT  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt"|..., "value": str}, ...]}
    Alpaca    {"instruction": str, "input": str (optional), "output": str}

Each converter checks the record as it converts it and raises `DataFormatError` with a
reason a person can act on and a `kind` the report counts by. A record is rejected
(never repaired) when a role is unknown, a content is not a string (or, in `messages`,
a list of parts), an assistant turn is empty, or there is no assistant turn at all:
training on it would either crash later or teach the model nothing.

Tool calling (OpenAI's shape, as TRL reads it): a `messages` record may carry `tools`
(OpenAI's function list, `[{"type": "function", "function": {"name", ...}}]`), assistant
turns with `tool_calls` (`[{"id"?, "type": "function", "function": {"name": str,
"arguments": JSON object, or a string holding one}}]`, content then optional) and `role:
"tool"` turns (the results, string content, `tool_call_id` optional) that follow such a
turn. The tokenizer's chat template renders them with `tools=` (tokenize.py), the loss on
the assistant turns, calls included, never on the results. Refused with the place named:
a call whose arguments are not a JSON object, a tool message with no call before it, a
`tool_call_id` no call has, `tools` that are not function objects.

Multimodal chat: in the `messages` format a content may also be a list of OpenAI-style
parts, `{"type": "text", "text": str}` and image parts (`images.py` lists their three
forms and checks each one). Images are allowed in user turns only (a model is never
trained to emit one, and a system image has no place in any chat template), at most
`ImageLimits.max_images_per_example` per example. A part list without images becomes
the plain string it spells (its texts joined as the processor templates join them:
directly), so text data written that way trains as text; a turn with images keeps
its parts in order, `str` for text and `ImagePart` for each image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

from PIL import Image

from reactor_core.data.images import ImageError, ImagePart, ImageReader, open_rgb

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)

# ShareGPT dumps name speakers in several ways; these are the ones with an unambiguous
# meaning. Anything else ("tool", "function_call", ...) is reported, not guessed at.
SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
}

# Issue kinds: the keys of `DataReport.counts`.
BAD_FORMAT = "bad_format"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
EMPTY_ASSISTANT = "empty_assistant"
NO_ASSISTANT = "no_assistant"
BAD_PART = "bad_content_part"
MISPLACED_IMAGE = "misplaced_image"
TOO_MANY_IMAGES = "too_many_images"
BAD_TOOL_CALL = "bad_tool_call"

# A turn's parts, in order: text as `str`, each image as a checked `ImagePart`.
Part = Union[str, ImagePart]


class DataFormatError(ValueError):
    """A record that cannot become a chat example; `str(err)` is the reason."""

    def __init__(self, reason: str, kind: str = BAD_FORMAT) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True)
class ToolCall:
    """One call an assistant turn makes; `arguments` is the JSON object as canonical text
    (a record stays hashable, so duplicates are found)."""

    name: str
    arguments: str
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape with the arguments as an object, what tool-aware templates
        (Qwen2.5, Llama 3.1) serialise with `tojson`."""
        call = {"type": "function", "function": {"name": self.name, "arguments": json.loads(self.arguments)}}
        return {**({"id": self.id} if self.id else {}), **call}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, already in the roles chat templates understand."""

    role: Role
    content: str | tuple[Part, ...]  # a tuple only in a user turn that holds images
    tool_calls: tuple[ToolCall, ...] = ()  # assistant turns only
    tool_call_id: str | None = None  # tool turns only

    @property
    def images(self) -> tuple[ImagePart, ...]:
        if isinstance(self.content, str):
            return ()
        return tuple(part for part in self.content if isinstance(part, ImagePart))


@dataclass(frozen=True)
class ChatExample:
    """A checked conversation with at least one non-empty assistant turn.

    `source` is `"path:line"` of the JSONL line it came from, so tokenization can still
    point at the line to fix.
    """

    messages: tuple[Message, ...]
    source: str
    tools: tuple[str, ...] = ()  # the record's `tools`, each function object as canonical JSON text

    @property
    def tool_list(self) -> list[dict[str, Any]] | None:
        """`tools` as `apply_chat_template(tools=...)` takes them (None: the record has none)."""
        return [json.loads(t) for t in self.tools] or None

    @property
    def images(self) -> tuple[ImagePart, ...]:
        """Every image of the conversation, in the order a processor consumes them."""
        return tuple(image for m in self.messages for image in m.images)

    def to_dicts(self) -> list[dict[str, str]]:
        """The `[{"role", "content"}, ...]` list `tokenizer.apply_chat_template` takes.

        Text only: a text tokenizer's template would print an image part's repr into
        the prompt, so an example with images raises and goes through
        `processor_inputs` instead.
        """
        if self.images:
            raise ValueError(f"{self.source}: the example holds {len(self.images)} image(s); "
                             "a text tokenizer cannot render it (use processor_inputs)")
        out: list[dict[str, Any]] = []
        for m in self.messages:
            message: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                message["tool_calls"] = [call.to_dict() for call in m.tool_calls]
            if m.tool_call_id:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out

    def processor_messages(self) -> list[dict[str, Any]]:
        """Every message as a part list, each image a `{"type": "image"}` placeholder (no
        image is read: what a vision processor's chat template renders)."""
        messages: list[dict[str, Any]] = []
        for m in self.messages:
            parts = (m.content,) if isinstance(m.content, str) else m.content
            messages.append({"role": m.role, "content": [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": "image"}
                for p in parts]})
        return messages

    def processor_inputs(self) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """(messages, images) for a Hugging Face vision processor's chat template.

        Every content becomes a part list (Idefics3's template iterates the content, so a
        bare string would be read character by character), each image a `{"type":
        "image"}` placeholder; the images follow in placeholder order, decoded to RGB.
        Raises `ImageError`, at this example's `path:line`, when an image file changed or
        vanished since validation.
        """
        try:
            return self.processor_messages(), [open_rgb(image) for image in self.images]
        except ImageError as err:
            raise ImageError(f"{self.source}: {err.reason}", err.kind) from None


# --------------------------------------------------------------------------------------
# One converter per source format
# --------------------------------------------------------------------------------------


def messages_from_chat(
    record: Mapping[str, Any], images: ImageReader | None = None
) -> tuple[Message, ...]:
    """`{"messages": [{"role", "content"}, ...]}`: the native format, checked as is.

    A content may be a list of parts (module docstring); `images` reads the image parts,
    relative to the data file's folder. Without it (a record not read from a file) an
    image part is refused: there is no folder its path could be relative to.
    """
    turns = _list_of_objects(record["messages"], "messages")
    messages: list[Message] = []
    count = 0
    for i, turn in enumerate(turns):
        role = turn.get("role")
        calls = _tool_calls(turn, i) if role == "assistant" and turn.get("tool_calls") else ()
        for key in ("role",) if calls else ("role", "content"):
            if key not in turn:
                raise DataFormatError(f"messages[{i}] has no {key!r}")
        if role not in ROLES:
            raise DataFormatError(
                f"messages[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                UNKNOWN_ROLE,
            )
        where = f"messages[{i}].content"
        content = "" if calls and turn.get("content") is None else turn["content"]
        if role == "tool":
            message = Message(role, _content(content, where), tool_call_id=_answered_call(turn, i, messages))
        elif isinstance(content, list):
            message = Message(role, _parts(content, where, role, images, count), calls)
        else:
            message = Message(role, _content(content, where), calls)
        count += len(message.images)
        messages.append(message)
    return _checked(messages, lambda i: f"messages[{i}]")


def messages_from_sharegpt(record: Mapping[str, Any]) -> tuple[Message, ...]:
    """`{"conversations": [{"from", "value"}, ...]}`: speaker names mapped to roles."""
    turns = _list_of_objects(record["conversations"], "conversations")
    messages = []
    for i, turn in enumerate(turns):
        for key in ("from", "value"):
            if key not in turn:
                raise DataFormatError(f"conversations[{i}] has no {key!r}")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataFormatError(
                f"conversations[{i}]: unknown role {speaker!r} "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})",
                UNKNOWN_ROLE,
            )
        messages.append(Message(role, _content(turn["value"], f"conversations[{i}].value")))
    return _checked(messages, lambda i: f"conversations[{i}]")


def messages_from_alpaca(record: Mapping[str, Any]) -> tuple[Message, ...]:
    """`{"instruction", "input"?, "output"}`: one user turn, one assistant turn.

    A non-empty `input` follows the instruction after a blank line, the usual way the
    Alpaca prompt is written out when there is no template field for it.
    """
    for key in ("instruction", "output"):
        if key not in record:
            raise DataFormatError(f"Alpaca record has no {key!r}")
    instruction = _content(record["instruction"], "instruction")
    extra = record.get("input")
    extra = "" if extra is None else _content(extra, "input")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _content(record["output"], "output")
    return _checked([Message("user", prompt), Message("assistant", output)], lambda i: "output")


def _tool_calls(turn: Mapping[str, Any], i: int) -> tuple[ToolCall, ...]:
    """An assistant turn's `tool_calls`, each checked: a function name, arguments that are a
    JSON object (or a string holding one)."""
    calls = _list_of_objects(turn["tool_calls"], f"messages[{i}].tool_calls")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        function = call.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataFormatError(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                  f"\"arguments\": {{...}}}}}}", BAD_TOOL_CALL)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}.function.arguments: not JSON ({err.msg} at character {err.pos})",
                                      BAD_TOOL_CALL) from None
        if not isinstance(arguments, Mapping):
            raise DataFormatError(f"{where}.function.arguments: must be a JSON object, got {_json_type(arguments)}",
                                  BAD_TOOL_CALL)
        call_id = call.get("id")
        out.append(ToolCall(function["name"], json.dumps(arguments, sort_keys=True, ensure_ascii=False),
                            call_id if isinstance(call_id, str) else None))
    return tuple(out)


def _answered_call(turn: Mapping[str, Any], i: int, before: list[Message]) -> str | None:
    """A tool result's `tool_call_id`, checked against the calls of the assistant turn it
    answers (the nearest one before it, only tool results in between)."""
    k = len(before) - 1
    while k >= 0 and before[k].role == "tool":
        k -= 1
    if k < 0 or before[k].role != "assistant" or not before[k].tool_calls:
        raise DataFormatError(f"messages[{i}]: a tool result with no assistant tool_calls before it", BAD_TOOL_CALL)
    call_id = turn.get("tool_call_id")
    if call_id is not None and call_id not in {c.id for c in before[k].tool_calls}:
        raise DataFormatError(f"messages[{i}].tool_call_id: {call_id!r} answers none of the calls of "
                              f"messages[{k}]", BAD_TOOL_CALL)
    return call_id


def record_tools(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """A `messages` record's `tools`, each a function object kept as canonical JSON text."""
    tools = obj.get("tools")
    if tools is None:
        return ()
    if "messages" not in obj:
        raise DataFormatError("'tools' goes with the 'messages' format only", BAD_TOOL_CALL)
    if not isinstance(tools, list):
        raise DataFormatError(f"'tools' must be a list, got {_json_type(tools)}", BAD_TOOL_CALL)
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise DataFormatError(f"tools[{j}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                  "\"parameters\": {...}}}", BAD_TOOL_CALL)
    return tuple(json.dumps(t, sort_keys=True, ensure_ascii=False) for t in tools)


def parse_chat(obj: Any, images: ImageReader | None = None) -> tuple[tuple[Message, ...], tuple[str, ...]]:
    """`parse_record`, and the record's `tools` (`record_tools`): what a chat example is made of."""
    messages = parse_record(obj, images)
    return messages, record_tools(obj)


# Checked in this order; the first key present picks the converter.
_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], tuple[Message, ...]]] = {
    "messages": messages_from_chat,
    "conversations": messages_from_sharegpt,
    "instruction": messages_from_alpaca,
}


def parse_record(obj: Any, images: ImageReader | None = None) -> tuple[Message, ...]:
    """Turn one decoded JSONL object, in any accepted format, into checked messages.

    Raises `DataFormatError` (a `ValueError`) whose message is the reason and whose
    `kind` names the problem. A record carrying the keys of two formats is rejected
    rather than read one way silently. `images` reads image parts (chat format only).
    """
    if not isinstance(obj, Mapping):
        raise DataFormatError(f"expected a JSON object, got {_json_type(obj)}")
    present = [key for key in _CONVERTERS if key in obj]
    if not present:
        raise DataFormatError(
            "unknown record format: expected a 'messages', 'conversations' or "
            "'instruction'/'output' key"
        )
    if len(present) > 1:
        raise DataFormatError(f"ambiguous record: has both {present[0]!r} and {present[1]!r}")
    if present[0] == "messages":
        return messages_from_chat(obj, images)
    return _CONVERTERS[present[0]](obj)


# --------------------------------------------------------------------------------------
# Checks shared by the converters
# --------------------------------------------------------------------------------------


def _list_of_objects(value: Any, field: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{field!r} must be a non-empty list, got {_json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise DataFormatError(f"{field}[{i}] must be an object, got {_json_type(item)}")
    return value


def _parts(
    value: list[Any], where: str, role: str, images: ImageReader | None, seen: int
) -> str | tuple[Part, ...]:
    """A content part list -> its text (no images) or its parts; `seen`: images so far."""
    if not value:
        raise DataFormatError(f"{where} must be a string or a non-empty list of parts", BAD_PART)
    parts: list[Part] = []
    for j, part in enumerate(value):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if "text" not in part:
                raise DataFormatError(f"{here} has no 'text'", BAD_PART)
            parts.append(_content(part["text"], f"{here}.text"))
        elif kind in ("image", "image_url"):
            parts.append(_image(part, here, role, images,
                                seen + sum(isinstance(p, ImagePart) for p in parts)))
        elif not isinstance(part, Mapping):
            raise DataFormatError(f"{here} must be an object, got {_json_type(part)}", BAD_PART)
        else:
            raise DataFormatError(f"{here}: unknown part type {kind!r} (expected 'text', "
                                  "'image' or 'image_url')", BAD_PART)
    if not any(isinstance(p, ImagePart) for p in parts):
        return "".join(parts)  # type: ignore[arg-type]
    return tuple(parts)


def _image(part: Mapping[str, Any], where: str, role: str, images: ImageReader | None,
           seen: int) -> ImagePart:
    """One image part, checked where it is, how many came before it, then read."""
    if role != "user":
        raise DataFormatError(f"{where}: an image part in the {role} turn; images belong in user turns",
                              MISPLACED_IMAGE)
    if images is None:
        raise DataFormatError(f"{where}: image parts are read only from a data file (their "
                              "paths are relative to its folder)", BAD_PART)
    limit = images.limits.max_images_per_example
    if seen >= limit:
        raise DataFormatError(f"{where}: image {seen + 1} of the example, over "
                              f"max_images_per_example {limit}", TOO_MANY_IMAGES)
    try:
        return images.read(part, where)
    except ImageError as err:
        raise DataFormatError(err.reason, err.kind) from None


def _content(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(
            f"{where} must be a string, got {_json_type(value)}", NON_STRING_CONTENT
        )
    return value


def _checked(messages: list[Message], where: Callable[[int], str]) -> tuple[Message, ...]:
    """Reject conversations that would teach nothing: no reply, or an empty one.

    `where(i)` names message `i` in the record's own terms, for the reason text.
    """
    replies = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if not replies:
        raise DataFormatError("no assistant turn", NO_ASSISTANT)
    for i in replies:
        if not messages[i].content.strip() and not messages[i].tool_calls:
            raise DataFormatError(f"{where(i)}: empty assistant turn", EMPTY_ASSISTANT)
    return tuple(messages)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    for python_type, name in names.items():
        if isinstance(value, python_type):
            return name
    return "number" if isinstance(value, (int, float)) else type(value).__name__
