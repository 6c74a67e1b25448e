"""The request bodies `prime serve` accepts (OpenAI's, less what it cannot honour).

Unknown fields are ignored, as OpenAI clients send many; parameters this server
cannot honour are refused by `check_supported`, never silently ignored.

Two extras of this server: `truncate` (chat: drop the oldest turns that are not system
messages until the prompt and max_tokens fit the context, instead of a 400), and
`reasoning_budget` / `max_thinking_tokens` for thinking models.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jarvis_prime.errors import ImageInputError
from jarvis_prime.models.base import GenerationParams
from jarvis_prime.models.content import check_image_role
from jarvis_prime.serving.errors import APIError, image_error
from jarvis_prime.serving.settings import DEFAULT_MAX_TOKENS


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    """OpenAI's `image_url`: a `data:` URL, or an http(s) URL on a server that fetches them
    (`--allow-remote-images`). `detail` is accepted for OpenAI clients that
    send it; the model's own processor decides how an image is tiled, whatever it says."""

    model_config = ConfigDict(extra="ignore")
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str = "{}"


class ToolCallItem(BaseModel):
    """An assistant message's earlier tool call, sent back with the conversation."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[tuple[int, ImagePart]]:
        """(index in content, part) for every image part."""
        return [] if self.content is None or isinstance(self.content, str) else [
            (j, p) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]

    def template_content(self) -> str | list[dict[str, Any]]:
        """The content as `PrimeModel.encode_chat` takes it: text joined, or the parts when images are there."""
        if not self.images():
            return self.text()
        return [p.model_dump(exclude_none=True) for p in self.content]  # type: ignore[union-attr]


def base64_decoded_size(payload: str) -> int:
    """How many bytes a base64 payload decodes to, without decoding it (limits come first)."""
    payload = payload.strip()
    return len(payload) * 3 // 4 - payload[-2:].count("=")


def check_image_part(part: ImagePart, where: str, max_image_bytes: int, remote: bool = False) -> None:
    """A part's URL is a `data:` URL no larger than the limit, checked before anything is
    decoded, or with `remote` an http(s) URL (fetched later, within limits of its own).
    Anything else is refused: without `remote` a remote URL is never fetched (the server
    would make requests for its clients), and a bare string is never read as a server-side path."""
    url = part.image_url.url
    if url.startswith(("http://", "https://")):
        if remote:
            return
        raise APIError(400, f"{where}: remote image URLs are not fetched by this server (--allow-remote-images is "
                       "off); send the image inline as a data: URL (data:image/png;base64,...)", param=where,
                       code="remote_image_url")
    if not url.startswith("data:"):
        raise APIError(400, f"{where}: an image_url must be a data: URL (data:image/png;base64,...)", param=where,
                       code="invalid_image_url")
    size = base64_decoded_size(url.partition(",")[2])
    if size > max_image_bytes:
        raise APIError(413, f"{where}: the image is {size} bytes, over this server's limit of {max_image_bytes} "
                       "bytes per image (--max-image-bytes)", param=where, code="image_too_large")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both endpoints share. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None  # chat: a bool (with top_logprobs); completions: an int (0..5 in OpenAI's API)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Thinking models: the most tokens of reasoning before the model is made to answer.
    # Two spellings: `max_thinking_tokens`, and llama.cpp server's `reasoning_budget` (-1: no limit).
    max_thinking_tokens: int | None = Field(default=None, ge=0, le=1_000_000)
    reasoning_budget: int | None = Field(default=None, ge=-1, le=1_000_000)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop sequences")
        return stops

    def check_supported(self) -> None:
        """Parameters this server cannot honour are refused, never silently ignored."""
        budgets = {self.max_thinking_tokens, self.reasoning_budget} - {None, -1}
        if self.max_thinking_tokens is not None and self.reasoning_budget is not None and len(budgets) > 1:
            raise APIError(400, f"max_thinking_tokens ({self.max_thinking_tokens}) and reasoning_budget "
                           f"({self.reasoning_budget}) disagree; send one", param="reasoning_budget",
                           code="invalid_value")

    def thinking_budget(self) -> int | None:
        """The reasoning budget asked for, whichever its spelling; None: no limit."""
        budget = self.max_thinking_tokens if self.max_thinking_tokens is not None else self.reasoning_budget
        return None if budget is None or budget < 0 else budget


    def top_alternatives(self) -> int | None:
        """How many alternatives per token to report; None: no logprobs (GenerationParams.logprobs)."""
        raise NotImplementedError

    def max_new_tokens(self, room: int) -> int:
        return self.max_completion_tokens or self.max_tokens or min(DEFAULT_MAX_TOKENS, room)

    def sampling_options(self, prompt_tokens: int, context_length: int) -> dict[str, Any]:
        """The model's generation options; a prompt and max_tokens that overflow the context are a 400."""
        room = context_length - prompt_tokens
        wanted = self.max_completion_tokens or self.max_tokens
        if room < 1 or (wanted is not None and wanted > room):
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({wanted}) exceeds the context "
                           f"length ({context_length}); shorten the prompt or max_tokens{self.overflow_hint}",
                           param="max_tokens" if room >= 1 else "messages", code="context_length_exceeded")
        return {"max_new_tokens": self.max_new_tokens(room), "temperature": self.temperature,
                "top_p": self.top_p, "stop": self.stop or None, "seed": self.seed,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logprobs": self.top_alternatives(), "thinking_budget": self.thinking_budget()}

    overflow_hint: ClassVar[str] = ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    truncate: bool = False  # this server's extra: drop the oldest non-system turns to fit the context

    overflow_hint: ClassVar[str] = ", or send truncate: true to drop the oldest turns"

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise APIError(400, "logprobs: a chat completion takes true or false (and top_logprobs for alternatives)",
                           param="logprobs", code="invalid_value")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and self.response_format.json_schema is None:
            raise APIError(400, "response_format.json_schema is required when type is 'json_schema'",
                           param="response_format.json_schema", code="invalid_value")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise APIError(400, f"tool_choice {self.tool_choice_name() or self.tool_choice!r} needs `tools`",
                           param="tool_choice", code="invalid_value")
        named = self.tool_choice_name()
        if named is not None and named not in [t.function.name for t in self.tools or []]:
            raise APIError(400, f"tool_choice names {named!r}, which is not among tools "
                           f"{[t.function.name for t in self.tools or []]}", param="tool_choice.function.name",
                           code="invalid_value")
        for i, message in enumerate(self.messages):
            if message.content is None and not (message.role == "assistant" and message.tool_calls):
                raise APIError(400, f"messages[{i}].content: required (only an assistant message with tool_calls "
                               "may leave it out)", param=f"messages[{i}].content", code="invalid_value")

    def top_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def needs_own_loop(self, grammar: str | None) -> bool:
        """Whether this request asks for what only the batcher's loop does on transformers
        (`GenerationParams.asks_extras`: penalties, logprobs, a grammar), which takes no images."""
        return GenerationParams(presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                grammar=grammar, logprobs=self.top_alternatives()).asks_extras

    def tool_choice_name(self) -> str | None:
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools the model is shown: none with tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def grammar(self) -> str | None:
        """GBNF that the reply must match: a forced tool call (tool_choice required or a
        named function), else the response_format's JSON; None: free text."""
        from jarvis_prime.models.grammar import GrammarError, json_schema_gbnf
        from jarvis_prime.models.tools import call_grammar

        tools = self.active_tools()
        try:
            if tools and (self.tool_choice == "required" or self.tool_choice_name()):
                return call_grammar(tools, self.tool_choice_name())
            if self.response_format is None or self.response_format.type == "text":
                return None
            schema = self.response_format.json_schema.schema_ if self.response_format.json_schema else None
            return json_schema_gbnf(schema if self.response_format.type == "json_schema" else None)
        except GrammarError as err:
            param = "tools" if tools else "response_format.json_schema.schema"
            raise APIError(400, f"{param}: {err}", param=param, code="invalid_schema") from None

    def check_images(self, max_images: int, max_image_bytes: int, remote: bool = False) -> None:
        """The image limits, before any image is fetched or decoded: how many, in which turns,
        and each one's URL and size."""
        parts = [(f"messages[{i}].content[{j}]", m.role, part) for i, m in enumerate(self.messages)
                 for j, part in m.images()]
        if len(parts) > max_images:
            raise APIError(400, f"{len(parts)} images in one request; this server takes at most {max_images} "
                           "(--max-images)", param="messages", code="too_many_images")
        for where, role, part in parts:
            try:
                check_image_role(role, where)
            except ImageInputError as err:
                raise image_error(err) from None
            check_image_part(part, where, max_image_bytes, remote)

    def remote_images(self) -> bool:
        """Whether any image part is an http(s) URL (to fetch)."""
        return any(p.image_url.url.startswith(("http://", "https://")) for m in self.messages for _, p in m.images())

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them ("developer" is OpenAI's newer "system");
        tool calls and results kept for `PrimeModel.encode_chat`."""
        out = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.template_content()}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise APIError(400, "exactly one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt

    def top_alternatives(self) -> int | None:
        if isinstance(self.logprobs, bool) or self.logprobs is None:
            return 0 if self.logprobs else None
        if not 0 <= self.logprobs <= 20:
            raise APIError(400, f"logprobs must be in [0, 20], got {self.logprobs}", param="logprobs",
                           code="invalid_value")
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        self.top_alternatives()
        if self.echo or self.suffix:
            param = "echo" if self.echo else "suffix"
            raise APIError(400, f"{param} is not supported", param=param, code="unsupported_parameter")


class SwapRequest(BaseModel):
    """POST /admin/models: a catalog or store name (a directory only with --allow-model-paths)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=4096)
    quantization: Literal["8bit", "4bit"] | None = None
    backend: Literal["auto", "llamacpp", "transformers"] = "auto"
