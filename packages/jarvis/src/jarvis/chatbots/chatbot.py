"""`Chatbot`: JARVIS's conversation loop on a PRIME model.

It keeps the session's history, puts the persona first, trims the oldest turns when
the conversation outgrows the model's context window, and formats everything with
the model's own chat template (through `PrimeModel`), never a hand-made
"User:/Assistant:" layout.

A turn may carry images (`stream(text, images=[...])`). While images are in what the
model is sent, the turn goes to a model that sees: the chat model when it does, else
the vision model (`jarvis.vision.pick_vision_model`), loaded on first need.

A thinking model's reasoning comes apart from its answer (`jarvis_prime.thinking`, through
`PrimeModel.complete` or a server's `reasoning_content`): `stream` yields it as `Thought`
pieces, for the terminal and the page to show folded; the history and the training data
hold the answer alone, and the store keeps the reasoning beside it.

Tools and memory (issue #24). A model with `chat_with_tools` (`jarvis.tools.calls.ToolModel`: a
remote endpoint, or a local `PrimeModel` made to call tools, `PrimeModel.calls_tools`) answers
through the tool loop (`jarvis.tool_loop`) with the built-in tools and the user's (`jarvis.tools`);
each call comes out as a `ToolUse` piece (one line: `⚙ calculator(expression="12*7") → 84`) and is
stored with the reply. The shipped 135M models were not trained on tools, so a local chat on them
runs without. With a store, the facts JARVIS remembers that best match the user's
message (FTS5 bm25, the top `memory_facts`) join the system message, and what the `remember`
tool saved this turn is stored with the turn's ids (never from a private conversation).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

from jarvis.memory import ConversationStore, Fact, PrivateConversationError
from jarvis.reasoning import REASONING_MODEL_ENV, Reasoned, ask_reasoning_model, pick_reasoning_model, self_consistency
from jarvis.tool_loop import DEFAULT_MAX_STEPS, run_tool_loop
from jarvis.tools.builtin import ToolContext, builtin_tools
from jarvis.tools.calls import ToolModel, ToolResult
from jarvis.tools.registry import DEFAULT_TIMEOUT_S, Tool, ToolRegistry, user_tools
from jarvis.vision import MAX_IMAGES_PER_MESSAGE, VISION_MODEL_ENV, has_images, message_text, pick_vision_model, user_message
from jarvis_prime import PrimeModel
from jarvis_prime.persona import JARVIS_SYSTEM_PROMPT

DEFAULT_MODEL = "prime-135m-chat-v1"  # the JARVIS chat model; offline, see jarvis-prime
DEFAULT_PERSONA = JARVIS_SYSTEM_PROMPT

Message = dict[str, Any]  # content: a string, or parts with images (`jarvis.vision.user_message`)


class Thought(str):
    """A piece of a thinking model's reasoning among `Chatbot.stream`'s answer pieces (plain
    `str`): shown folded, never part of the answer."""


class ToolUse(str):
    """A tool call and its result among `Chatbot.stream`'s pieces; the string is its one-line
    form (`⚙ calculator(expression="12*7") → 84`), `result` the whole `ToolResult`."""

    result: ToolResult

    def __new__(cls, result: ToolResult) -> "ToolUse":
        piece = super().__new__(cls, result.line())
        piece.result = result
        return piece


MEMORY_HEADER = "What you remember about the user from earlier conversations:"


def _default_model() -> str:
    return os.environ.get("JARVIS_MODEL") or DEFAULT_MODEL


def _default_vision_model() -> str | None:
    return os.environ.get(VISION_MODEL_ENV) or None


def _default_reasoning_model() -> str | None:
    return os.environ.get(REASONING_MODEL_ENV) or None


@dataclass
class ChatbotConfig:
    """How JARVIS talks. `model` defaults to $JARVIS_MODEL, then the offline default."""

    model: str = field(default_factory=_default_model)
    backend: Literal["auto", "llamacpp", "transformers"] = "auto"
    quantization: Literal["8bit", "4bit"] | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # None: no system message. The default model, prime-135m-chat-v1, is JARVIS without
    # one (that is what it was trained for); give other models DEFAULT_PERSONA.
    system_prompt: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy: the most reliable answers from small models
    top_p: float = 1.0
    seed: int | None = None
    reasoning_samples: int = 5  # k for self-consistency (`reason`, /think, --reasoning)
    # Thinking models: most tokens of reasoning before the answer (None: up to max_new_tokens;
    # /think on a reasoning model: 3 x max_new_tokens, the answer keeps max_new_tokens).
    thinking_budget: int | None = None
    # The model /think asks; None: the catalog's reasoning model that is installed (`pick_reasoning_model`).
    reasoning_model: str | None = field(default_factory=_default_reasoning_model)
    # The model for image turns when `model` cannot see; None: picked (`jarvis.vision.pick_vision_model`).
    vision_model: str | None = field(default_factory=_default_vision_model)
    tools: bool = True  # offer the tools to a model that can call them (`ToolModel`)
    max_tool_steps: int = DEFAULT_MAX_STEPS  # rounds of tool calls in one reply before JARVIS stops the model
    tool_timeout: float = DEFAULT_TIMEOUT_S  # seconds one tool call may take; past it the model gets an error
    memory_facts: int = 3  # remembered facts put into the system message (best bm25 matches); 0: none

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "llamacpp", "transformers"):
            raise ValueError(f"`backend` must be auto, llamacpp or transformers; got {self.backend!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {self.temperature}")
        if self.reasoning_samples < 1:
            raise ValueError(f"`reasoning_samples` must be >= 1, got {self.reasoning_samples}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"`thinking_budget` must be >= 0, got {self.thinking_budget}")
        if self.max_tool_steps < 1:
            raise ValueError(f"`max_tool_steps` must be >= 1, got {self.max_tool_steps}")
        if self.tool_timeout <= 0:
            raise ValueError(f"`tool_timeout` must be > 0, got {self.tool_timeout}")
        if self.memory_facts < 0:
            raise ValueError(f"`memory_facts` must be >= 0, got {self.memory_facts}")


class Chatbot:
    """A conversation with JARVIS. The model loads on first use unless one is given."""

    def __init__(self, config: ChatbotConfig | None = None, model: PrimeModel | None = None,
                 store: ConversationStore | None = None, conversation: str | None = None,
                 vision: PrimeModel | Callable[[], PrimeModel] | None = None,
                 extra_tools: Sequence[Tool | Callable[..., Any]] | None = None) -> None:
        """`store` persists every turn (SQLite); `conversation` resumes one of its conversations.
        `vision`: the vision model, or a function that gives it when an image turn first needs it
        (default: loaded from `config.vision_model`). `extra_tools`: tools beside the built-ins
        (default: the user's, `jarvis.tools.registry.user_tools`)."""
        self.config = config or ChatbotConfig()
        self._model = model
        self._vision = vision
        self.store = store
        self.conversation = conversation
        self.history: list[Message] = []
        self.last_reply_id: int | None = None  # the stored id of the newest reply, for feedback
        self.last_thinking: str | None = None  # the newest reply's reasoning (a thinking model), for /show-thinking
        self._reasoner: PrimeModel | None = None  # the reasoning model /think loaded
        self._extra_tools = extra_tools
        self.last_facts: list[Fact] = []  # the remembered facts the newest turn was given
        if store is not None and conversation is not None:
            stored = [m for m in store.stored_messages(conversation) if m.role != "system"]
            self.history = [store.chat_message(m) for m in stored]
            self.last_reply_id = stored[-1].id if stored and stored[-1].role == "assistant" else None

    @property
    def model(self) -> PrimeModel:
        if self._model is None:
            c = self.config
            self._model = PrimeModel.from_pretrained(c.model, quantization=c.quantization, device=c.device, backend=c.backend)
        return self._model

    @property
    def vision_model(self) -> PrimeModel:
        """The model for image turns the chat model cannot see (loaded on first use)."""
        if callable(self._vision):
            self._vision = self._vision()
        if self._vision is None:
            c = self.config
            self._vision = PrimeModel.from_pretrained(pick_vision_model(c.vision_model), device=c.device,
                                                      backend=c.backend)
        return self._vision

    def _answering(self, messages: list[Message]):
        """The model for these messages: the chat model unless they hold images it cannot see."""
        if has_images(messages) and not getattr(self.model, "sees_images", False):
            return self.vision_model
        return self.model

    def reset(self) -> None:
        """Forget the conversation (the persona stays); with a store, the next turn starts a new one."""
        self.history.clear()
        self.conversation = None
        self.last_reply_id = None

    @staticmethod
    def _model_label(model) -> str:
        return f"{model.name}@{model.version}"

    def _save(self, user: Message, reply: Message, after: int | None, model, images: Sequence[bytes] = (),
              thinking: str | None = None, tools: Sequence[ToolResult] = (), facts: Sequence[str] = ()) -> None:
        """Both messages in one transaction, refused if the conversation moved on meanwhile; then
        the facts the model asked to remember, from the user message."""
        if self.store is None:
            return
        if self.conversation is None:
            self.conversation = self.store.create(model=self.config.model, system_prompt=self.config.system_prompt)
        user_id, self.last_reply_id = self.store.add_exchange(
            self.conversation, message_text(user), reply["content"], model=self._model_label(model), after=after,
            images=images, thinking=thinking, tool_calls=[t.as_json() for t in tools])
        self._save_facts(facts, user_id)

    def _save_facts(self, facts: Sequence[str], message_id: int | None) -> None:
        for fact in facts:
            try:
                self.store.remember(fact, source="model", conversation_id=self.conversation, message_id=message_id)
            except (PrivateConversationError, ValueError):
                pass  # the tool checked both before saying "saved"; a conversation made private meanwhile wins

    def remember(self, text: str) -> tuple[Fact, bool]:
        """/remember: the user saves a fact, from this conversation (its newest message) if any.
        Refused in a private conversation (PrivateConversationError); without a store, ValueError."""
        if self.store is None:
            raise ValueError("memory needs the conversation store (without --no-save)")
        return self.store.remember(text, source="user", conversation_id=self.conversation,
                                   message_id=self._last_stored_id())

    def _tool_context(self) -> ToolContext | None:
        return ToolContext(self.store, lambda: self.conversation) if self.store is not None else None

    def _tools(self, context: ToolContext | None) -> ToolRegistry:
        """The built-ins (for this turn's `context`) and the extra tools, loaded once."""
        if self._extra_tools is None:
            self._extra_tools = user_tools()
        return ToolRegistry([*builtin_tools(context), *self._extra_tools], timeout=self.config.tool_timeout)

    def _uses_tools(self, model, messages: list[Message]) -> bool:
        """Tools on, a model that can call them, and no images (image turns go to a vision model as they are).
        A local model must also have been made to call tools (`PrimeModel.calls_tools`): one that was not
        calls nothing and answers worse with a tool list in its prompt. A remote model says nothing of it."""
        return (self.config.tools and isinstance(model, ToolModel) and getattr(model, "calls_tools", True)
                and not has_images(messages))

    def ask(self, text: str, images: Sequence[bytes] = ()) -> str:
        """Send one user message (with `images`, encoded files); return the whole reply (the
        answer: a thinking model's reasoning is in `last_thinking`, the tools it called in the store)."""
        return "".join(p for p in self.stream(text, images) if not isinstance(p, (Thought, ToolUse)))

    def user_turn(self, text: str, images: Sequence[bytes] = ()) -> Message:
        """The user message `text` and `images` make, checked (what `stream` sends)."""
        if not text.strip() and not images:
            raise ValueError("message is empty")
        if len(images) > MAX_IMAGES_PER_MESSAGE:
            raise ValueError(f"{len(images)} images in one message; at most {MAX_IMAGES_PER_MESSAGE}")
        return user_message(text.strip(), list(images))

    def stream(self, text: str, images: Sequence[bytes] = ()) -> Iterator[str]:
        """Send one user message, with `images` (encoded files: `jarvis.vision.read_image`);
        yield the reply as it is generated: text pieces of the answer, and `Thought` pieces
        of a thinking model's reasoning before it.

        The turn enters the history once the reply ends (or is interrupted, keeping
        what was said so far).
        """
        user = self.user_turn(text, images)
        kept, messages, model = self._fit_context(user)  # raises before touching the history
        after = self._last_stored_id()

        def done(reply: Message, thinking: str | None, tools: list[ToolResult], facts: list[str]) -> None:
            self.history = kept + [user, reply]
            self._save(user, reply, after, model, images, thinking, tools, facts)

        yield from self._generate(model, messages, done)

    @property
    def reasoning_model(self) -> PrimeModel | None:
        """The model /think asks: the chat model if it thinks itself, else the configured or
        installed catalog reasoning model (loaded on first use), else None (self-consistency)."""
        if getattr(getattr(self.model, "manifest", None), "thinking", None) is not None:
            return self.model
        if self._reasoner is None:
            name = pick_reasoning_model(self.config.reasoning_model)
            if name is None:
                return None
            c = self.config
            self._reasoner = PrimeModel.from_pretrained(name, device=c.device, backend=c.backend)
        return self._reasoner

    def reason(self, text: str) -> Reasoned:
        """Answer a question with a checkable answer: by the reasoning model when there is one
        (it thinks, then answers), else by self-consistency on the chat model (k step-by-step
        samples, majority vote). `Reasoned.method` says which. The answer enters the
        conversation; a reasoning model's thinking is stored beside it."""
        if not text.strip():
            raise ValueError("message is empty")
        user = {"role": "user", "content": text}
        kept, messages, model = self._fit_context(user)
        c = self.config
        thinker = self.reasoning_model
        if thinker is not None:
            budget = c.thinking_budget if c.thinking_budget is not None else 3 * c.max_new_tokens
            result = ask_reasoning_model(thinker, messages, max_new_tokens=c.max_new_tokens + budget,
                                         thinking_budget=budget, seed=c.seed)
            model = thinker
        else:
            result = self_consistency(model, messages, k=c.reasoning_samples, max_new_tokens=c.max_new_tokens,
                                      seed=c.seed or 0)
        self.last_thinking = result.thinking
        if not result.reply:  # it ran out of tokens while thinking: no answer to keep
            return result
        reply = {"role": "assistant", "content": result.reply}
        after = self._last_stored_id()
        self.history = kept + [user, reply]
        self._save(user, reply, after, model, thinking=result.thinking)
        return result

    def _last_stored_id(self) -> int | None:
        if self.store is None or self.conversation is None:
            return None
        return self.store.last_id(self.conversation)

    def regenerate(self) -> Iterator[str]:
        """Answer the last user message again; the new reply replaces the last one.

        With a store, the old reply is kept as an alternative (a regeneration is a
        preference signal: see `jarvis.feedback`).
        """
        if len(self.history) < 2 or self.history[-1]["role"] != "assistant":
            raise ValueError("there is no reply to regenerate yet")
        user = self.history[-2]
        kept, messages, model = self._fit_context(user, history=self.history[:-2])
        previous = self.last_reply_id

        def done(reply: Message, thinking: str | None, tools: list[ToolResult], facts: list[str]) -> None:
            self.history = kept + [user, reply]
            if self.store is not None and previous is not None:
                self.last_reply_id = self.store.add_alternative(previous, reply["content"],
                                                                model=self._model_label(model), thinking=thinking,
                                                                tool_calls=[t.as_json() for t in tools])
                asked = [m for m in self.store.stored_messages(self.conversation) if m.role == "user"]
                self._save_facts(facts, asked[-1].id if asked else None)

        yield from self._generate(model, messages, done)

    def _generate(self, model, messages: list[Message], done) -> Iterator[str]:
        """The reply's pieces: answer text, `Thought`s of a thinking model's reasoning, as
        `complete` splits them (a remote model: from the server's `reasoning_content`), and
        `ToolUse`s of the tools it called (the tool loop, when the model can call tools)."""
        c = self.config
        pieces: list[str] = []
        thoughts: list[str] = []
        used: list[ToolResult] = []
        failed = False
        options = dict(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=c.seed)
        if c.thinking_budget is not None:
            options["thinking_budget"] = c.thinking_budget
        self.last_thinking = None
        context = self._tool_context()
        if self._uses_tools(model, messages):
            replies = run_tool_loop(model, messages, self._tools(context),
                                    max_steps=c.max_tool_steps, **options)
        else:
            replies = model.complete(model.encode_chat(messages), stream=True, **options)
        try:
            for chunk in replies:
                if isinstance(chunk, ToolResult):
                    used.append(chunk)
                    yield ToolUse(chunk)
                    continue
                if chunk.reasoning:
                    thoughts.append(chunk.reasoning)
                    yield Thought(chunk.reasoning)
                if chunk.text:
                    pieces.append(chunk.text)
                    yield chunk.text
        except Exception:
            failed = True
            raise
        finally:
            self.last_thinking = "".join(thoughts).strip() or None
            # a reply that ended, or that the user interrupted (generator closed, Ctrl-C),
            # is part of the conversation; one the backend failed on is not, nor one that
            # never got past its thinking (there is no answer to keep)
            if not failed and "".join(pieces).strip():
                done({"role": "assistant", "content": "".join(pieces).strip()}, self.last_thinking, used,
                     context.facts if context is not None else [])

    def _with_memory(self, system_prompt: str | None, text: str) -> str | None:
        """The system prompt and the remembered facts that best match `text` (none: as it was)."""
        self.last_facts = self.store.recall(text, self.config.memory_facts) if self.store is not None else []
        if not self.last_facts:
            return system_prompt
        memory = "\n".join([MEMORY_HEADER, *(f"- {f.text}" for f in self.last_facts)])
        return f"{system_prompt}\n\n{memory}" if system_prompt else memory

    def _fit_context(self, user: Message,
                     history: list[Message] | None = None) -> tuple[list[Message], list[Message], Any]:
        """(the history that fits, the messages to send, the model that answers them):
        persona + recent history + `user`.

        Whole exchanges are dropped oldest first, so the model never sees half a turn.
        Works on a copy: a message too long to fit leaves the history as it was. Images
        count as the tokens the answering model encodes them into; the tools' schemas, which
        go with the prompt to a model that calls tools, count as their JSON's tokens (the
        results a reply's tool calls add later are not known here: each is cut at
        `jarvis.tools.registry.MAX_RESULT_CHARS`).
        """
        system_prompt = self._with_memory(self.config.system_prompt, message_text(user))
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        history = list(self.history if history is None else history)
        while True:
            messages = system + history + [user]
            model = self._answering(messages)
            budget = model.context_length - self.config.max_new_tokens
            if has_images(messages):
                used = len(model.encode_chat(messages).ids)
            else:
                used = model.count_tokens(model.apply_chat_template(messages))
            if self._uses_tools(model, messages):
                used += model.count_tokens(json.dumps(self._tools(self._tool_context()).schemas()))
            if used <= budget:
                return history, messages, model
            if not history:
                raise ValueError(
                    f"message too long: {used} tokens with the persona; {model.name} holds "
                    f"{model.context_length} tokens of context and {self.config.max_new_tokens} are kept for the reply"
                )
            del history[:2]
