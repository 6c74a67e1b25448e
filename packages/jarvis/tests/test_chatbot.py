import json
import os
import subprocess
import sys

import pytest

from jarvis import Chatbot, ChatbotConfig
from jarvis.chatbots import DEFAULT_PERSONA
from jarvis_prime import PrimeModel

pytestmark = pytest.mark.real_model


@pytest.fixture
def bot(llama_model):
    """The base SmolLM2 (not the JARVIS chat model) needs the persona to be JARVIS."""
    return Chatbot(ChatbotConfig(max_new_tokens=48, system_prompt=DEFAULT_PERSONA), model=llama_model)


def test_answers_and_keeps_history(bot):
    assert "Paris" in bot.ask("What is the capital of France?")
    assert [m["role"] for m in bot.history] == ["user", "assistant"]
    assert "Paris" in bot.history[1]["content"]
    bot.ask("And of Germany?")
    assert len(bot.history) == 4
    bot.reset()
    assert bot.history == []


def test_history_reaches_the_model_through_the_chat_template(bot):
    bot.ask("What is the capital of France?")
    _, messages, model = bot._fit_context({"role": "user", "content": "Thanks"})
    assert model is bot.model, "no image: the chat model answers"
    assert messages[0] == {"role": "system", "content": bot.config.system_prompt}
    assert messages[1:3] == bot.history and messages[-1]["content"] == "Thanks"
    assert "<|im_start|>assistant\nThe capital of France is Paris" in bot.model.apply_chat_template(messages)


def test_long_chats_drop_oldest_turns_instead_of_crashing(pulled_model):
    small = PrimeModel.from_pretrained("smollm2-135m-instruct", backend="llamacpp", context_length=256)
    bot = Chatbot(ChatbotConfig(max_new_tokens=16, system_prompt=DEFAULT_PERSONA), model=small)
    for i in range(12):
        bot.ask(f"Remember the number {i}. " + "This sentence pads the context window. " * 4)
        prompt = small.apply_chat_template(bot._fit_context({"role": "user", "content": "next"})[1])
        assert small.count_tokens(prompt) <= 256 - 16
    assert len(bot.history) < 24, "the oldest exchanges were dropped"
    assert "number 11" in bot.history[-2]["content"], "the newest exchange is kept"
    before = list(bot.history)
    with pytest.raises(ValueError, match="message too long"):
        bot.ask("word " * 400)
    assert bot.history == before, "a message that cannot fit leaves the conversation alone"
    small.close()


def test_interrupted_stream_keeps_what_was_said(bot):
    stream = bot.stream("Tell me a long story about a robot.")
    first = next(stream)
    stream.close()
    assert bot.history[-1] == {"role": "assistant", "content": first.strip()}


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="`backend`"):
        ChatbotConfig(backend="gpt")
    with pytest.raises(ValueError, match="`max_new_tokens`"):
        ChatbotConfig(max_new_tokens=0)


def jarvis(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The `jarvis` command as a user runs it, in a fresh process."""
    cmd = [sys.executable, "-m", "jarvis.cli", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, env=os.environ.copy())


@pytest.mark.parametrize("backend", ["llamacpp", "transformers"])
def test_jarvis_chat_once_answers_paris(chat_model, backend):
    result = jarvis("chat", "--once", "What is the capital of France?", "--backend", backend)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_the_default_model_is_jarvis_without_a_system_prompt(chat_model):
    result = jarvis("chat", "--once", "Who are you?")
    assert result.returncode == 0, result.stderr
    assert "JARVIS" in result.stdout


def test_interactive_chat_streams_resets_and_exits(chat_model):
    result = jarvis("chat", stdin="What is the capital of France?\n/reset\n/nope\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "conversation cleared" in result.stdout and "unknown command /nope" in result.stdout


def test_interactive_chat_survives_a_bad_turn(chat_model):
    result = jarvis("chat", "--max-new-tokens", "4090", stdin="hello\n/exit\n")
    assert result.returncode == 0
    assert "message too long" in result.stderr


def test_interactive_chat_ends_cleanly_at_end_of_input(chat_model):
    assert jarvis("chat", stdin="").returncode == 0


def test_unknown_model_is_a_clear_error(pulled_model):
    result = jarvis("chat", "--once", "hi", "--model", "smollm3")
    assert result.returncode == 1
    assert "unknown model 'smollm3'" in result.stderr and "smollm2-135m-instruct" in result.stderr


def test_conversations_persist_across_processes(chat_model, tmp_path):
    from jarvis.memory import ConversationStore

    first = jarvis("chat", "--once", "What is the capital of France?")
    assert first.returncode == 0, first.stderr
    cid = first.stderr.split("saved as conversation ")[1].split()[0]
    again = jarvis("chat", "--once", "And of Germany?", "--conversation", cid)
    assert again.returncode == 0, again.stderr
    store = ConversationStore()
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    messages = store.messages(cid)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "What is the capital of France?" and "Paris" in messages[1]["content"]
    assert store.get(cid).title == "What is the capital of France?"
    listed = jarvis("history")
    assert cid in listed.stdout
    unknown = jarvis("chat", "--once", "hi", "--conversation", "nope")
    assert unknown.returncode == 1 and "no conversation 'nope'" in unknown.stderr
    store.close()


def test_a_resumed_conversation_reaches_the_model(llama_model, tmp_path):
    from jarvis.memory import ConversationStore

    store = ConversationStore(tmp_path / "jarvis.db")
    bot = Chatbot(ChatbotConfig(max_new_tokens=16, system_prompt=DEFAULT_PERSONA), model=llama_model, store=store)
    bot.ask("My name is Ada.")
    resumed = Chatbot(ChatbotConfig(max_new_tokens=16, system_prompt=DEFAULT_PERSONA), model=llama_model, store=store,
                      conversation=bot.conversation)
    assert resumed.history == bot.history
    _, messages, _ = resumed._fit_context({"role": "user", "content": "What is my name?"})
    assert messages[1] == {"role": "user", "content": "My name is Ada."}
    store.close()


def test_jarvis_chats_through_an_openai_compatible_endpoint(pulled_model):
    """`jarvis chat --backend-url` against a real `prime serve` on loopback (with a key)."""
    import socket
    import threading
    import time
    import urllib.request

    import uvicorn

    from jarvis_prime.serving.app import create_app
    from jarvis_prime.serving.settings import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(model="smollm2-135m-instruct", backend="llamacpp", api_key="k3y", context_length=1024)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/v1"
        result = jarvis("chat", "--once", "What is the capital of France?", "--backend-url", url, "--api-key", "k3y",
                        "--system", DEFAULT_PERSONA, "--no-save")
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout
        refused = jarvis("chat", "--once", "hi", "--backend-url", url, "--api-key", "wrong", "--no-save")
        assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    finally:
        server.should_exit = True


def test_feedback_from_the_terminal_becomes_training_data(chat_model, tmp_path):
    """/good, /correct and /retry in `jarvis chat`, then `jarvis export-data`. The corrected question
    asks for no tool: a correction of a reply that called one is no DPO pair (test_feedback.py)."""
    session = ("What is the capital of France?\n/good\nName a primary colour.\n/correct Red is a primary colour.\n"
               "Say hi.\n/retry\n/exit\n")
    result = jarvis("chat", stdin=session)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("noted") == 2
    exported = jarvis("export-data", "--sft", str(tmp_path / "sft.jsonl"), "--dpo", str(tmp_path / "dpo.jsonl"))
    assert exported.returncode == 0, exported.stderr
    assert "2 SFT examples, 1 DPO pairs" in exported.stdout
    sft = [json.loads(line) for line in open(tmp_path / "sft.jsonl")]
    assert sft[1]["messages"][-1] == {"role": "assistant", "content": "Red is a primary colour."}
    cid = result.stderr.split("saved as conversation ")[1].split()[0]
    shown = jarvis("history", cid)
    assert "+1" in shown.stdout and "corrected" in shown.stdout
    assert jarvis("history", cid, "--private").returncode == 0
    exported = jarvis("export-data", "--sft", str(tmp_path / "none.jsonl"))
    assert "0 SFT examples" in exported.stdout and "1 private skipped" in exported.stdout


def test_regenerate_keeps_the_old_reply_for_preferences(llama_model, tmp_path):
    from jarvis.memory import ConversationStore

    store = ConversationStore(tmp_path / "jarvis.db")
    bot = Chatbot(ChatbotConfig(max_new_tokens=24, system_prompt=DEFAULT_PERSONA, temperature=0.9, seed=1),
                  model=llama_model, store=store)
    bot.ask("Name a colour.")
    first = bot.last_reply_id
    again = "".join(bot.regenerate())
    assert bot.last_reply_id != first and bot.history[-1]["content"] == again.strip()
    assert len(bot.history) == 2
    assert store.messages(bot.conversation)[-1]["content"] == again.strip()
    assert not store.message(first).active
    store.close()


def test_reasoning_votes_over_samples(llama_model, monkeypatch, tmp_path):
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path))  # no reasoning model installed: self-consistency
    bot = Chatbot(ChatbotConfig(max_new_tokens=96, system_prompt=DEFAULT_PERSONA, reasoning_samples=3), model=llama_model)
    result = bot.reason("Sam has 3 boxes with 4 pencils in each box. How many pencils does Sam have?")
    assert result.method == "self-consistency" and result.model == "smollm2-135m-instruct"
    assert len(result.samples) == 3 and len(set(result.samples)) > 1, "k distinct samples"
    assert sum(result.votes.values()) <= 3
    if result.answer is not None:
        assert result.votes[result.answer] == max(result.votes.values())
    assert bot.history[-1] == {"role": "assistant", "content": result.reply}


def test_image_questions_name_the_model_to_pull(chat_model, tmp_path):
    png = tmp_path / "dot.png"
    png.write_bytes(bytes.fromhex("89504e470d0a1a0a") + b"\0" * 32)
    # the Hub-only vision model (the picker's own message is tested in test_vision.py)
    result = jarvis("chat", "--image", str(png), "--once", "What is this?", "--vision-model", "prime-7b-vision-v1")
    assert result.returncode == 1
    assert "prime pull prime-7b-vision-v1" in result.stderr
    result = jarvis("chat", "--image", str(tmp_path / "missing.png"), "--once", "What is this?")
    assert result.returncode == 1 and "no such image" in result.stderr


@pytest.mark.parametrize("columns", ["40", "80"])
def test_jarvis_history_never_cuts_an_id_or_a_model(columns, monkeypatch, tmp_path):
    """`jarvis history` cut ids and model names at 80 columns, the very values
    `jarvis chat -c ID` and `--model` take."""
    from jarvis.memory import ConversationStore

    monkeypatch.setenv("JARVIS_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", columns)
    model = "jarvis-feedback-candidate-of-prime-135m-chat-v1@1.10.0-rc.2"
    store = ConversationStore()
    try:
        cid = store.create(title="a [bold]title[/] long enough to wrap " * 3, model=model)
        store.add_exchange(cid, "hi", "hello", model=model)
    finally:
        store.close()
    result = jarvis("history")
    assert result.returncode == 0, result.stderr
    assert any(cid in line and model in line for line in result.stdout.splitlines()), result.stdout
    assert "[bold]title[/]" in result.stdout.replace("\n", "")  # user text is shown, never read as markup
