"""JARVIS with a thinking model: the reasoning shown folded in the terminal (one dim line),
never stored or sent back as the answer; /think asks the reasoning model when one is
installed and says self-consistency otherwise. (The page's folded block, in Chromium:
test_web.py.)"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from jarvis import cli
from jarvis.chatbots import Chatbot, ChatbotConfig, Thought
from jarvis.memory import ConversationStore
from jarvis.reasoning import pick_reasoning_model
from jarvis_prime import PrimeModel

pytestmark = pytest.mark.real_model
NAME = "smollm2-135m-thinking"  # the default model made a thinking one (conftest.thinking_model)


@pytest.fixture(scope="module")
def thinker(thinking_model):
    model = PrimeModel.from_pretrained(NAME, backend="llamacpp", context_length=1024)
    yield model
    model.close()


def captured(monkeypatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200, highlight=False))
    return out


def test_thinking_streams_apart_and_only_the_answer_is_the_reply(thinker, tmp_path):
    store = ConversationStore(tmp_path / "jarvis.db")
    bot = Chatbot(ChatbotConfig(max_new_tokens=32, thinking_budget=6), model=thinker, store=store)
    pieces = list(bot.stream("What is the capital of France?"))
    thoughts = "".join(p for p in pieces if isinstance(p, Thought))
    answer = "".join(p for p in pieces if not isinstance(p, Thought))
    assert thoughts.strip() and answer.strip()
    assert pieces.index(next(p for p in pieces if not isinstance(p, Thought))) > 0, "thinking comes first"

    assert bot.history[-1] == {"role": "assistant", "content": answer.strip()}, "the history holds the answer alone"
    assert bot.last_thinking == thoughts.strip()
    (reply,) = [m for m in store.stored_messages(bot.conversation) if m.role == "assistant"]
    assert reply.content == answer.strip() and thoughts.strip() not in reply.content
    assert reply.thinking == thoughts.strip(), "kept beside the answer"
    assert store.messages(bot.conversation)[-1]["content"] == answer.strip()

    # the next turn sends the model the answer only (what the template renders of the history)
    _, messages, _ = bot._fit_context({"role": "user", "content": "Thanks"})
    assert thoughts.strip() not in thinker.apply_chat_template(messages)
    store.close()


def test_the_terminal_folds_the_thinking_to_one_dim_line(thinker, monkeypatch):
    out = captured(monkeypatch)
    bot = Chatbot(ChatbotConfig(max_new_tokens=32, thinking_budget=6), model=thinker)
    cli._reply(bot, "What is the capital of France?")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("thought: ") and lines[0].endswith("of thinking; /show-thinking)")
    first = bot.last_thinking.splitlines()[0].strip()
    assert first[:40] in lines[0]
    assert bot.history[-1]["content"] in out.getvalue()
    assert out.getvalue().count("thought: ") == 1 and bot.last_thinking + "\n" not in out.getvalue(), \
        "folded to one line above the answer, never printed whole as it streamed"
    assert cli.folded_thinking("one\n\ntwo\nthree") == "thought: one (3 lines of thinking; /show-thinking)"

    # out of tokens while thinking: said so, and nothing stored as an answer
    out.truncate(0), out.seek(0)
    cut = Chatbot(ChatbotConfig(max_new_tokens=5), model=thinker)
    cli._reply(cut, "What is the capital of France?")
    assert "no answer: the reply ran out of tokens while thinking" in out.getvalue() and cut.history == []


def test_think_asks_the_reasoning_model_when_installed(thinker, llama_model, monkeypatch, model_store):
    """pick: a catalog reasoning model in the (tmp) store, else None; /think then says which way it went."""
    assert pick_reasoning_model() is None, "an empty store has no reasoning model"
    model_store("prime-13b-reasoning-v1")
    assert pick_reasoning_model() == "prime-13b-reasoning-v1"
    assert pick_reasoning_model("my-own") == "my-own"

    # the installed one is a prime.json without weights: it loads the real thinking model in its place
    loaded = []
    monkeypatch.setattr(PrimeModel, "from_pretrained", classmethod(lambda cls, name, **kw: loaded.append(name) or thinker))
    bot = Chatbot(ChatbotConfig(max_new_tokens=24, thinking_budget=6), model=llama_model)
    result = bot.reason("What is 2 + 2?")
    assert loaded == ["prime-13b-reasoning-v1"], "the installed catalog reasoning model was asked"
    assert result.method == "reasoning model" and result.model == NAME and result.thinking
    # the answer part of the reply, the thinking apart (a 135M model may well think what it then answers)
    direct = thinker.complete(thinker.encode_chat(bot._fit_context({"role": "user", "content": "What is 2 + 2?"},
                                                                   history=[])[1]),
                              max_new_tokens=24 + 6, temperature=0.0, thinking_budget=6)
    assert (result.reply, result.thinking) == (direct.text.strip(), direct.reasoning.strip())
    assert bot.history[-1] == {"role": "assistant", "content": result.reply} and "think>" not in result.reply


def test_think_says_self_consistency_when_no_reasoning_model_is_installed(llama_model, monkeypatch, tmp_path):
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "empty-store"))
    monkeypatch.delenv("JARVIS_REASONING_MODEL", raising=False)
    out = captured(monkeypatch)
    bot = Chatbot(ChatbotConfig(max_new_tokens=24, reasoning_samples=2), model=llama_model)
    cli._think(bot, "What is 2 + 2?")
    said = out.getvalue()
    assert "no reasoning model installed" in said and "self-consistency on smollm2-135m-instruct, 2 samples" in said
    assert "prime pull prime-" in said, "it names what to pull"


def test_think_on_a_thinking_chat_model_uses_it_and_says_so(thinker, monkeypatch):
    out = captured(monkeypatch)
    bot = Chatbot(ChatbotConfig(max_new_tokens=24, thinking_budget=6), model=thinker)
    cli._think(bot, "What is 2 + 2?")
    said = out.getvalue()
    assert said.startswith("thought: ") and f"thought by the reasoning model {NAME}" in said
    assert bot.last_thinking and "think>" not in bot.history[-1]["content"] + bot.last_thinking
    assert said.count("thought: ") == 1 and bot.history[-1]["content"] in said


def test_a_remote_thinking_model_streams_its_reasoning_apart(thinker):
    """`jarvis chat --backend-url` on `prime serve`: the server's `reasoning_content` becomes
    `Chunk.reasoning`, as a local model's split does, so the Chatbot folds it the same way."""
    from test_server import running

    from jarvis.remote import RemoteModel
    from jarvis_prime.serving.settings import ServerConfig

    question = [{"role": "user", "content": "What is the capital of France?"}]
    local = thinker.complete(thinker.encode_chat(question), max_new_tokens=30, temperature=0.0, thinking_budget=6)
    with running(ServerConfig(model=NAME, backend="llamacpp", context_length=1024)) as url:
        remote = RemoteModel(f"{url}/v1")
        assert remote.calls_tools is False, "prime serve lists the model's capabilities: no tools, so none are sent"
        chunks = list(remote.complete(remote.encode_chat(question), max_new_tokens=30, thinking_budget=6))
        bot = Chatbot(ChatbotConfig(max_new_tokens=30, thinking_budget=6), model=remote)
        answer = bot.ask("What is the capital of France?")
    assert "".join(c.reasoning for c in chunks) == local.reasoning
    assert "".join(c.text for c in chunks) == local.text
    assert answer == local.text.strip() and bot.last_thinking == local.reasoning.strip()
