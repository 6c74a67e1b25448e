"""`PrimeModel`: one interface for a PRIME model, whichever backend runs it.

    model = PrimeModel.from_pretrained("smollm2-135m-instruct", quantization="4bit")
    print(model.runtime.describe())   # what was picked, and why
    model.chat([{"role": "user", "content": "What is the capital of France?"}])    # -> str
    vision.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},  # path, bytes,
                                              {"type": "text", "text": "What colour?"}]}])  # PIL image
    model.generate("What is machine learning?")               # a chat model answers it as one user turn
    model.generate("Once upon a time", raw=True, stream=True)  # plain continuation -> text pieces

Three ways to generate, each with `stream=`: `generate` (a prompt) and `chat`
(messages) give text; `complete` takes a prompt from `encode` / `encode_chat` and
gives what a server reports (finish reason, token usage). `generate` on a chat model
(one with a chat template) is `chat` with the prompt as the one user turn, so it answers
and stops where the assistant's turn ends; `raw=True`, or a base model without a
template, continues the text as written.

A thinking model (`thinking` markers in prime.json) answers `chat` and `generate` with
the answer alone; `complete` gives its reasoning beside it (`Generation.reasoning`,
`Chunk.reasoning`), split by `jarvis_prime.thinking`, and honours `thinking_budget`:

    model.complete(model.encode_chat(messages), thinking_budget=512)  # -> Generation(text, ..., reasoning)

Every file the chosen backend reads is checked against the sha256 in `prime.json`
before it is loaded, and a weight file `prime.json` does not list stops the load. Chats are formatted with the model's own Jinja chat template.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import closing, contextmanager
from pathlib import Path
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Mapping, Sequence, TypedDict, overload

from typing_extensions import Unpack

from jarvis_prime.errors import ImageNotSupportedError, ManifestError
from jarvis_prime.hardware import detect_hardware, detect_libraries
from jarvis_prime.manifest import PrimeManifest, projector_for, refuse_unlisted_weights, verify_files
from jarvis_prime.models.base import Backend, Chunk, Generation, GenerationParams, collect
from jarvis_prime.models.chat_template import ChatTemplate
from jarvis_prime.models.content import Media, has_images, split_images
from jarvis_prime.models.memory import gb, kv_slots, read_config
from jarvis_prime.models.tools import ToolCall, ToolCallStream, call_grammar, hermes_messages
from jarvis_prime.models.selection import (
    DEFAULT_CONTEXT_CAP,
    BackendName,
    Device,
    Quantization,
    Runtime,
    plan_runtime,
)
from jarvis_prime.store import LocalModel, resolve
from jarvis_prime.thinking import ReasoningSplitter, ReplyParts, ThinkingMarkers, opens_thinking, split_reasoning

log = logging.getLogger("jarvis_prime")

Messages = Sequence[Mapping[str, Any]]


class SamplingOptions(TypedDict, total=False):
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: Sequence[str] | None
    seed: int | None
    presence_penalty: float  # OpenAI's penalties, GBNF grammar and logprobs: see GenerationParams
    frequency_penalty: float
    grammar: str | None
    logprobs: int | None
    thinking_budget: int | None  # thinking models: most tokens of reasoning before the answer (see `complete`)


def _params(options: SamplingOptions, extra_stop: Sequence[str] = ()) -> GenerationParams:
    options = dict(options)
    stop = tuple(options.pop("stop", None) or ()) + tuple(s for s in extra_stop if s)
    return GenerationParams(**options, stop=tuple(dict.fromkeys(stop)))


@dataclass(frozen=True)
class Prompt:
    """Token ids ready to decode, and the stop strings that belong with them.

    A prompt with images also carries them (`media`): its ids then hold a placeholder per
    image embedding, so `len(ids)` is what the prompt takes of the context.

    A thinking model's chat prompt carries its markers (`thinking`), and whether the chat
    template already opened the reasoning (`opened`: the reply then starts mid-thought)."""

    ids: list[int]
    stop: tuple[str, ...] = field(default=())
    media: Media | None = None
    thinking: ThinkingMarkers | None = None
    opened: bool = False


def _text(result: Generation | Iterator[Chunk]) -> str | Iterator[str]:
    """A `complete` result as plain text: the whole text, or the stream's text pieces."""
    return result.text if isinstance(result, Generation) else _pieces(result)


def _pieces(chunks: Iterator[Chunk]) -> Iterator[str]:
    with closing(chunks):  # closing the pieces closes the decode, which frees the model
        for chunk in chunks:
            if chunk.text:
                yield chunk.text


def _split(chunks: Iterator[Chunk], markers: ThinkingMarkers, opened: bool) -> Iterator[Chunk]:
    """A thinking model's raw pieces as reasoning and answer pieces (`jarvis_prime.thinking`)."""
    splitter = ReasoningSplitter(markers, opened)
    with closing(chunks):
        for chunk in chunks:
            parts = splitter.feed(chunk.text)
            if chunk.finish_reason is not None:
                last = splitter.flush()
                parts = ReplyParts(parts.reasoning + last.reasoning, parts.content + last.content)
                yield Chunk(parts.content, chunk.finish_reason, parts.reasoning)
            elif parts.reasoning or parts.content:
                yield Chunk(parts.content, None, parts.reasoning)


def _files_read(manifest: PrimeManifest, runtime: Runtime) -> list[str]:
    """The manifest files a backend opens: its weights, tokenizer and template."""
    if runtime.weights_format == "gguf":
        names = [runtime.weights, "chat_template.jinja", *([runtime.mmproj] if runtime.mmproj else [])]
    else:
        names = [f for f in manifest.files if not f.startswith(("gguf/", "adapter/"))]
    return [f for f in names if f in manifest.files or f == runtime.weights]


class PrimeModel:
    def __init__(self, path: Path, manifest: PrimeManifest, runtime: Runtime, backend: Backend, context_length: int):
        self.path = path
        self.manifest = manifest
        self.runtime = runtime
        self.context_length = context_length
        self._backend = backend
        self._lock = threading.Lock()  # one generation at a time per loaded model
        self._batcher = None  # set by enable_batching
        self._owner: int | None = None  # thread holding it, to refuse a self-deadlock
        template = path / "chat_template.jinja"
        self._template = (
            ChatTemplate(template.read_text(encoding="utf-8"), {"bos_token": backend.bos_token, "eos_token": backend.eos_token})
            if template.is_file() else None
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        quantization: Quantization = None,
        device: Device = "auto",
        backend: BackendName = "auto",
        *,
        context_length: int | None = None,
    ) -> "PrimeModel":
        """Load a PRIME model by catalog/store name or directory.

        quantization: None (the model's weights as shipped, most precise available, if
            they fit the free memory; else the most precise of "8bit", "4bit" that does),
            "8bit" or "4bit" (on CPU and Apple Silicon: GGUF q8_0 and q4_k_m).
            device: "auto", "cpu", "cuda" or "mps".
            backend: "auto", "llamacpp" or "transformers" (see `selection.plan_runtime`).
        context_length: tokens of context to allocate; default min(model's, 4096).

        A model that cannot fit this machine's memory raises `InsufficientMemoryError`
        before anything loads; one that will swap loads with a warning.
        """
        local = resolve(name_or_path, log=log.info)
        runtime = plan_runtime(
            local.manifest, quantization=quantization, device=device, backend=backend,
            hardware=detect_hardware(), libraries=detect_libraries(),
            model_config=read_config(local.path), n_ctx=context_length,
        )
        log.info("%s: %s", local.manifest.name, runtime.describe())
        if runtime.memory is not None and runtime.memory.verdict == "slow":
            log.warning("%s will be slow here at %s (%s): %s", local.manifest.name,
                        runtime.quantization or "full precision", runtime.export or runtime.weights,
                        runtime.memory.describe())
        if runtime.export:
            log.warning("%s: exporting %s GGUF for llama.cpp (once)", local.manifest.name, runtime.export)
            from jarvis_prime.export import export_gguf  # the exporter (llama.cpp's converter, numpy), only when exporting

            local = LocalModel(local.path, export_gguf(local.path, [runtime.export], log=log.info))
            # a vision model's export also wrote the projector the new file runs with
            runtime = replace(runtime, mmproj=projector_for(local.manifest, runtime.weights))
        return cls.load(local.path, local.manifest, runtime, context_length=context_length)

    @classmethod
    def load(cls, path: Path, manifest: PrimeManifest, runtime: Runtime, *, context_length: int | None = None,
             scoring: bool = False) -> "PrimeModel":
        """Load exactly `runtime` (a planned or hand-built choice of backend and file).

        `scoring=True` keeps every position's logits on llama.cpp, for `token_logprobs`.
        """
        refuse_unlisted_weights(path, manifest)
        verify_files(path, manifest, _files_read(manifest, runtime))
        n_ctx = context_length or min(manifest.context_length, DEFAULT_CONTEXT_CAP)
        if runtime.backend == "llamacpp":
            from jarvis_prime.models.llamacpp import LlamaCppBackend

            loaded: Backend = LlamaCppBackend(path / runtime.weights, n_ctx=n_ctx, gpu_offload=runtime.device != "cpu",
                                              scoring=scoring, mmproj=path / runtime.mmproj if runtime.mmproj else None)
        else:
            from jarvis_prime.models.transformers_backend import TransformersBackend

            loaded = TransformersBackend(path, device=runtime.device, quantization=runtime.quantization,
                                         vision=manifest.task == "vision")
        return cls(path, manifest, runtime, loaded, n_ctx)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    # -- prompts ------------------------------------------------------------------------

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The prompt text the model's own chat template makes of `messages` (and `tools`,
        OpenAI's function list: see `models/tools.py` for templates that know none)."""
        if self._template is None:
            raise ManifestError(f"{self.path}: no chat_template.jinja; this model cannot chat, only generate")
        if not self._template.knows_tools and (tools or any(m.get("role") == "tool" or m.get("tool_calls")
                                                            for m in messages)):
            messages, tools = hermes_messages(messages, tools), None
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def count_tokens(self, text: str) -> int:
        return len(self._backend.tokenize(text, add_special=False))

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._backend.tokenize(text, add_special=add_special)

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 (llama.cpp needs `load(..., scoring=True)`)."""
        with self._exclusive():
            return self._backend.token_logprobs(ids)

    def encode(self, prompt: str) -> Prompt:
        """`prompt` as the token ids `complete` decodes (the tokenizer's BOS included)."""
        return Prompt(self._backend.tokenize(prompt, add_special=True))

    def encode_chat(self, messages: Messages, tools: Sequence[Mapping[str, Any]] | None = None) -> Prompt:
        """`messages` through the chat template, as token ids, with the model's end-of-turn
        stop strings, so a reply ends where the assistant's turn does. `tools`: OpenAI's
        function list, shown to the model (`apply_chat_template`).

        Content may be OpenAI-style parts (`models/content.py`); images go to a model that
        sees them, and anywhere else are an ImageNotSupportedError, never dropped."""
        if has_images(messages) and not self.sees_images:
            raise ImageNotSupportedError(self._why_blind())
        rendered, images = split_images(messages, getattr(self._backend, "image_part", {"type": "image"}))
        text = self.apply_chat_template(rendered, tools=tools)
        markers = self.manifest.thinking
        thinking = dict(thinking=markers, opened=opens_thinking(text, markers)) if markers else {}
        if images:
            media = Media(text, tuple(images))
            return Prompt(self._backend.tokenize_media(media), tuple(self.manifest.stop), media, **thinking)
        # The template writes the special tokens itself, so none are added here.
        return Prompt(self._backend.tokenize(text, add_special=False), tuple(self.manifest.stop), **thinking)

    @property
    def sees_images(self) -> bool:
        """Whether this loaded model answers image parts (a vision model with its projector)."""
        return bool(getattr(self._backend, "sees_images", False))

    def _why_blind(self) -> str:
        if self.manifest.task != "vision":
            return (f"{self.name} is a {self.manifest.task} model and cannot see images; "
                    "ask a vision model (task 'vision') about them")
        if self.runtime.backend == "llamacpp":
            return (f"{self.name}: {self.runtime.weights} has no projector (`mmproj`) recorded in prime.json, "
                    "so llama.cpp cannot encode images with it")
        return f"{self.name}: the {self.runtime.backend} backend cannot take images for this model"

    # -- generation ---------------------------------------------------------------------

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The model for this generation alone. Other threads wait; the thread that still
        holds an unfinished stream gets an error instead of waiting on itself forever."""
        if self._owner == threading.get_ident():
            raise RuntimeError(f"{self.name}: a stream from this model is still open in this thread; "
                               "finish or close() it before generating again")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def enable_batching(self, max_batch: int = 8, on_batch: Callable[[int], None] | None = None) -> bool:
        """Decode concurrent text requests together. Meant for servers: many threads calling
        this one model. On llama.cpp, continuous batching (models/llamacpp_batching.py:
        `max_batch` sequences in one context, requests joining and leaving at token
        boundaries, each keeping its KV for its conversation's next turn); on transformers,
        static batches (models/batching.py). Image prompts still run one at a time.
        True once batching is on.
        """
        if self._batcher is not None:
            return True
        if self.runtime.backend == "llamacpp":
            slots = kv_slots(self.runtime.memory, max_batch)  # each slot holds a full context's KV cache
            if slots < max_batch:
                log.warning("%s: %d sequences decoded together, not %d: each holds a %d-token KV cache (%s), and "
                            "the memory left holds %d (%s)", self.name, slots, max_batch, self.context_length,
                            gb(self.runtime.memory.need.kv_cache), slots, self.runtime.memory.describe())
            self._batcher = self._backend.batcher(self._lock, slots, self.context_length, on_batch=on_batch)
            return True
        from jarvis_prime.models.batching import Batcher

        self._batcher = Batcher(self._backend, self._lock, max_batch, on_batch=on_batch)
        return True

    def _generate(self, ids: list[int], params: GenerationParams, media: Media | None = None) -> Generation:
        if media is not None:  # one image prompt at a time: the batcher takes token ids only
            with self._exclusive():
                return self._backend.generate(ids, params, media=media)
        if self._batcher is None:
            with self._exclusive():
                return self._backend.generate(ids, params)
        text, finish, logprobs = collect(list(self._batcher.stream(ids, params)), params.logprobs is not None)
        return Generation(text, finish, len(ids), self.count_tokens(text), logprobs=logprobs)

    @property
    def calls_tools(self) -> bool:
        """Whether the model was made to call tools: its chat template renders a tool list
        (Qwen2.5/3, Llama 3.1), or its prime.json says it was trained to (`tools: true`).
        Any chat model *can* be offered tools (`chat_with_tools`, in the Hermes format), but
        one never trained on them answers worse with a tool list in its prompt and calls
        nothing (the 135M models: 0 of 6 unforced calls, see the README), so JARVIS offers
        tools only to models for which this is true."""
        return self.manifest.tools or (self._template is not None and self._template.knows_tools)

    def chat_with_tools(self, messages: Messages, tools: Sequence[Mapping[str, Any]], *,
                        tool_choice: str | Mapping[str, Any] = "auto",
                        **options: Unpack[SamplingOptions]) -> Iterator[Chunk | ToolCall]:
        """The next reply when the model may call `tools` (OpenAI's function list): its text
        (and a thinking model's reasoning) as `Chunk`s while it streams, then each `ToolCall`
        it asked for, read from its `<tool_call>` blocks (`models/tools.py`). `tool_choice` as
        OpenAI's: "auto", "none" (the tools are not shown), "required" or {"type": "function",
        "function": {"name": ...}}: a forced call is decoded under a grammar, so it parses
        and its arguments match the function's schema. `prime serve` answers the same
        request the same way; JARVIS's tool loop drives this."""
        shown = [] if tool_choice == "none" else list(tools)
        named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, Mapping) else None
        if shown and (tool_choice == "required" or named):
            options = {**options, "grammar": call_grammar(shown, named)}
        calls = ToolCallStream()
        for chunk in self.complete(self.encode_chat(messages, tools=shown or None), stream=True, **options):
            text = calls.feed(chunk.text)
            if text or chunk.reasoning:
                yield Chunk(text, reasoning=chunk.reasoning, logprobs=chunk.logprobs)
        rest, found = calls.finish()
        if rest:
            yield Chunk(rest)
        yield from found

    @property
    def is_chat(self) -> bool:
        """Whether `generate` answers a prompt as a user turn: the model has a chat template."""
        return self._template is not None

    @overload
    def generate(self, prompt: str, *, raw: bool = False, stream: Literal[False] = False,
                 **options: Unpack[SamplingOptions]) -> str: ...

    @overload
    def generate(self, prompt: str, *, raw: bool = False, stream: Literal[True],
                 **options: Unpack[SamplingOptions]) -> Iterator[str]: ...

    def generate(self, prompt: str, *, raw: bool = False, stream: bool = False,
                 **options: Unpack[SamplingOptions]) -> str | Iterator[str]:
        """The model's reply to `prompt`: the text, or with `stream=True` its pieces as decoded.

        A chat model (`is_chat`) answers `prompt` as one user turn, exactly as
        `chat([{"role": "user", "content": prompt}])`: its chat template and end-of-turn
        stop strings applied, so a chat model answers instead of rambling on. `raw=True`
        continues `prompt` as written (no template, the tokenizer's BOS added), which is
        also what a model without a chat template (a base model) always does.
        """
        if raw or not self.is_chat:
            return _text(self.complete(self.encode(prompt), stream=stream, **options))
        return self.chat([{"role": "user", "content": prompt}], stream=stream, **options)

    @overload
    def chat(self, messages: Messages, *, stream: Literal[False] = False,
             **options: Unpack[SamplingOptions]) -> str: ...

    @overload
    def chat(self, messages: Messages, *, stream: Literal[True], **options: Unpack[SamplingOptions]) -> Iterator[str]: ...

    def chat(self, messages: Messages, *, stream: bool = False, **options: Unpack[SamplingOptions]) -> str | Iterator[str]:
        """The assistant's next reply to `messages`: the text, or with `stream=True` its pieces.

        A thinking model's reasoning is not in it (its answer only); `complete` gives both."""
        return _text(self.complete(self.encode_chat(messages), stream=stream, **options))

    @overload
    def complete(self, prompt: Prompt, *, stream: Literal[False] = False,
                 **options: Unpack[SamplingOptions]) -> Generation: ...

    @overload
    def complete(self, prompt: Prompt, *, stream: Literal[True], **options: Unpack[SamplingOptions]) -> Iterator[Chunk]: ...

    def complete(self, prompt: Prompt, *, stream: bool = False,
                 **options: Unpack[SamplingOptions]) -> Generation | Iterator[Chunk]:
        """Decode an encoded prompt (`encode` / `encode_chat`), with the details a server
        reports: a `Generation` (text, finish reason, token usage), or with `stream=True`
        `Chunk`s whose last one carries the finish reason.

        The prompt is encoded by the caller so it can count its tokens (and refuse one
        that leaves no room) without tokenizing twice.

        A thinking model's chat prompt (`Prompt.thinking`) gives the answer as `text` and
        the reasoning apart (`Generation.reasoning`, `Chunk.reasoning`). `thinking_budget`
        caps the reasoning at that many tokens, then makes the model answer (`_budgeted`);
        None lets it think up to `max_new_tokens`, 0 answers without thinking.
        """
        options = dict(options)
        budget = options.pop("thinking_budget", None)
        params = _params(options, prompt.stop)
        if prompt.thinking is None:
            if stream:
                return self._chunks(prompt.ids, params, prompt.media)
            return self._generate(prompt.ids, params, prompt.media)
        if budget is None:
            if stream:
                return _split(self._chunks(prompt.ids, params, prompt.media), prompt.thinking, prompt.opened)
            result = self._generate(prompt.ids, params, prompt.media)
            split = split_reasoning(result.text, prompt.thinking, prompt.opened)
            return replace(result, text=split.content, reasoning=split.reasoning)
        if budget < 0:
            raise ValueError(f"`thinking_budget` must be >= 0 (or None: no limit), got {budget}")
        if prompt.media is not None:
            raise ValueError("`thinking_budget` works on text prompts only (this one has images)")
        chunks = _split(self._budgeted(prompt, params, budget), prompt.thinking, prompt.opened)
        return chunks if stream else self._gather(prompt, chunks)

    @staticmethod
    def _thought(prompt: Prompt, text: str) -> bool:
        """Whether a raw reply to `prompt` has reasoning: opened by the template, or by the model."""
        return prompt.opened or text.lstrip().startswith(prompt.thinking.start)

    def _gather(self, prompt: Prompt, chunks: Iterator[Chunk]) -> Generation:
        reasoning, content, finish = [], [], "stop"
        for chunk in chunks:
            reasoning.append(chunk.reasoning)
            content.append(chunk.text)
            finish = chunk.finish_reason or finish
        thought, answer = "".join(reasoning), "".join(content)
        return Generation(answer, finish, len(prompt.ids), self.count_tokens(thought) + self.count_tokens(answer),
                          thought)

    def _budgeted(self, prompt: Prompt, params: GenerationParams, budget: int) -> Iterator[Chunk]:
        """A thinking reply whose reasoning stops at `budget` tokens (raw text, markers included).

        How (both backends, as llama.cpp's server does with `reasoning_budget`): decode at most
        `budget` tokens with the end marker as a stop string. If the reasoning ended by then,
        or the budget ran out first, the end marker and a newline are written into the reply
        and decoding goes on from there (the prompt plus the reply so far, re-tokenized) for
        the answer, within what is left of `max_new_tokens`. A reply that did not start
        thinking is left as it came (continued past the budget if it was cut there). Budget 0
        writes an empty reasoning (start and end markers) before the model says anything.
        """
        markers, text = prompt.thinking, ""
        if budget == 0:
            forced = ("" if prompt.opened else markers.start) + markers.end + "\n"
        else:
            first = replace(params, max_new_tokens=min(budget, params.max_new_tokens), stop=params.stop + (markers.end,))
            pieces, finish = [], "stop"
            with closing(self._chunks(prompt.ids, first)) as chunks:
                for chunk in chunks:
                    if chunk.text:
                        pieces.append(chunk.text)
                        yield Chunk(chunk.text)
                    finish = chunk.finish_reason or finish
            text = "".join(pieces)
            thought = self._thought(prompt, text)
            if not thought and (finish == "stop" or budget >= params.max_new_tokens):
                yield Chunk("", finish)  # an answer without thinking, whole
                return
            forced = markers.end + "\n" if thought else ""
        left = params.max_new_tokens - (self.count_tokens(text) if text else 0)
        if left < 1:
            yield Chunk("", "length")
            return
        if forced:
            yield Chunk(forced)
        ids = list(prompt.ids) + self._backend.tokenize(text + forced, add_special=False)
        with closing(self._chunks(ids, replace(params, max_new_tokens=left))) as chunks:
            yield from chunks

    def _chunks(self, ids: list[int], params: GenerationParams, media: Media | None = None) -> Iterator[Chunk]:
        if media is not None:
            with self._exclusive():
                yield from self._backend.stream(ids, params, media=media)
            return
        if self._batcher is not None:
            yield from self._batcher.stream(ids, params)
            return
        with self._exclusive():
            yield from self._backend.stream(ids, params)

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
        with self._exclusive():
            self._backend.close()

    def __enter__(self) -> "PrimeModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PrimeModel({self.name}-{self.version}, {self.runtime.describe()})"


async def iterate_in_thread(make: Callable[[], Iterator[Any]], executor=None) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread, handing items to the event loop.

    Closing the async iterator (a consumer that stops early, a client that hung up)
    stops the worker after its current item, which releases the model."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    cancelled = threading.Event()

    def work() -> None:
        iterator = make()
        try:
            for item in iterator:
                if cancelled.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as err:
            loop.call_soon_threadsafe(queue.put_nowait, err)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # a generator's `finally` (the model's lock) runs now, in this thread
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = loop.run_in_executor(executor, work)
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        await worker
