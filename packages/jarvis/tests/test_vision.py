"""Image turns in JARVIS (issue #20): the chat model hands them to the vision model, the
images are stored with the conversation, resumed, exported for Reactor Core.

The vision model is the tiny random Idefics3 of jarvis-prime's tests (tiny_vision.py, real
llama.cpp text GGUF + mmproj), so its answers are gibberish: these tests check the flow
(which model answered, that the image reached its prompt, that different images change
the greedy answer), not what it says."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest
from typer.testing import CliRunner

from tiny_vision import png_bytes, tiny_vision

import jarvis.vision as vision_module
from jarvis.chatbots import Chatbot, ChatbotConfig
from jarvis.memory import ConversationStore
from jarvis.vision import (MAX_IMAGE_BYTES, PREFERRED_VISION_MODEL, VisionUnavailableError, pick_vision_model,
                           read_image, user_message)
from jarvis_prime import PrimeModel
from jarvis_prime.errors import ImageNotSupportedError

pytestmark = pytest.mark.real_model

QUESTION = "What colour is the shape?"
SAMPLING = dict(max_new_tokens=8, temperature=0.0, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_vision(tmp_path_factory)


@pytest.fixture(scope="module")
def vision(tiny):
    model = PrimeModel.from_pretrained(tiny.prime_dir, backend="llamacpp")
    yield model
    model.close()


@pytest.fixture(scope="module")
def chat(chat_model):
    model = PrimeModel.from_pretrained("prime-135m-chat-v1", backend="llamacpp", context_length=2048)
    yield model
    model.close()


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "jarvis.db")
    yield s
    s.close()


def bot(chat, vision, store=None, conversation=None) -> Chatbot:
    return Chatbot(ChatbotConfig(**SAMPLING), model=chat, store=store, conversation=conversation, vision=vision)


def test_an_image_turn_goes_to_the_vision_model_and_stays_there_while_the_image_is_in_context(chat, vision, store):
    assert not chat.sees_images and vision.sees_images
    b = bot(chat, vision, store)
    answer = b.ask(QUESTION, [png_bytes(1)])
    # the vision model answered exactly what it answers with the image in its own prompt
    assert answer.strip() == vision.chat([user_message(QUESTION, [png_bytes(1)])], **SAMPLING).strip()
    b.ask("And what shape is it?")  # a follow-up about the image: the image is still in what is sent
    b.reset()
    b.ask("Hello, who are you?")  # a new conversation without images: the chat model
    first, second = (store.stored_messages(c.id) for c in reversed(store.list()))
    assert [m.model.split("@")[0] for m in first if m.role == "assistant"] == ["tiny-vision", "tiny-vision"]
    assert [m.model.split("@")[0] for m in second if m.role == "assistant"] == ["prime-135m-chat-v1"]
    assert len(first[0].images) == 1 and first[2].images == ()


def test_the_image_reaches_the_model(chat, vision):
    """Greedy answers: the same image twice agrees, two different images disagree."""
    answers = [bot(chat, vision).ask(QUESTION, [png_bytes(seed)]) for seed in (1, 1, 2)]
    assert answers[0] == answers[1]
    assert answers[0] != answers[2], answers


def test_a_chat_model_that_sees_answers_images_itself(vision, store):
    b = Chatbot(ChatbotConfig(**SAMPLING), model=vision, store=store,
                vision=lambda: pytest.fail("the chat model sees: no vision model is loaded"))
    b.ask(QUESTION, [png_bytes(3)])
    assert store.stored_messages(b.conversation)[-1].model.startswith("tiny-vision@")


def test_a_text_model_never_pretends_to_see(chat, store):
    """A vision model that is a text model refuses the turn; nothing is stored."""
    b = Chatbot(ChatbotConfig(**SAMPLING), model=chat, store=store, vision=chat)
    with pytest.raises(ImageNotSupportedError, match="cannot see images"):
        b.ask(QUESTION, [png_bytes(1)])
    assert store.list() == [] and b.history == []


def test_no_vision_model_here_says_what_to_pull(tmp_path, monkeypatch, chat):
    """An empty store: a configured vision model that must come from the Hub names its
    `prime pull`; the picker picks the offline prime-135m-vision-v1 (jarvis-prime ships
    its parts), and on a machine that cannot build it names every `prime pull`."""
    from jarvis_prime.catalog import load_catalog

    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("JARVIS_VISION_MODEL", raising=False)
    b = Chatbot(ChatbotConfig(vision_model="prime-7b-vision-v1", **SAMPLING), model=chat)
    with pytest.raises(Exception, match="prime pull prime-7b-vision-v1"):
        b.ask(QUESTION, [png_bytes(1)])
    assert b.history == []
    assert load_catalog().find(PREFERRED_VISION_MODEL).offline_source() is not None  # shipped with jarvis-prime
    assert pick_vision_model() == PREFERRED_VISION_MODEL
    monkeypatch.setattr(vision_module, "_buildable", lambda name: False)  # a machine with no vision model at all
    with pytest.raises(VisionUnavailableError, match="prime pull prime-135m-vision-v1.*prime pull prime-7b-vision-v1"):
        pick_vision_model()
    monkeypatch.setenv("JARVIS_VISION_MODEL", "my-vision")
    assert pick_vision_model() == "my-vision" and pick_vision_model("flag-wins") == "flag-wins"


def test_the_picker_finds_a_vision_model_in_the_store(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(vision_module, "_buildable", lambda name: False)  # no catalog vision model here
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path))
    monkeypatch.delenv("JARVIS_VISION_MODEL", raising=False)
    shutil.copytree(tiny.prime_dir, tmp_path / "models" / tiny.prime_dir.name)
    assert pick_vision_model() == "tiny-vision"


def test_images_are_stored_once_with_the_conversation_and_resumed(chat, vision, store):
    image = png_bytes(4)
    b = bot(chat, vision, store)
    b.ask(QUESTION, [image])
    b.ask("Look again.", [image])
    cid = b.conversation
    rows = sqlite3.connect(store.path).execute("SELECT sha256, format, bytes FROM images").fetchall()
    assert len(rows) == 1 and rows[0][1:] == ("png", len(image)), "stored once, by its sha256"

    resumed = bot(chat, vision, store, conversation=cid)
    assert resumed.history[0]["content"][0]["image"] == image and resumed.history[0]["content"][1]["text"] == QUESTION
    resumed.ask("Once more?")  # the resumed conversation still holds the image: the vision model answers
    assert store.stored_messages(cid)[-1].model.startswith("tiny-vision@")
    store.delete(cid)
    assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0


def test_bad_images_are_refused_before_decoding(tmp_path, store):
    big = tmp_path / "big.png"
    with big.open("wb") as f:  # sparse: the size is refused from stat, before anything is read
        f.write(png_bytes(1)[:16])
        f.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(ValueError, match=r"big\.png.*over JARVIS's limit of 20 MiB"):
        read_image(big, str(big))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png: not an image"):
        read_image(tmp_path / "notes.png", "notes.png")
    with pytest.raises(ValueError, match="missing.png: .*no such image"):
        read_image(tmp_path / "missing.png", "missing.png")
    cid = store.create()
    with pytest.raises(ValueError, match="image 0: not a PNG"):
        store.add_exchange(cid, "hi", "hello", images=[b"GIF? no"])
    assert store.messages(cid) == [], "nothing written"


def test_cli_once_with_an_image(chat_model, tiny):
    from jarvis.cli import app

    image = tiny.prime_dir.parent / "question.png"
    image.write_bytes(png_bytes(5))
    runner = CliRunner()
    done = runner.invoke(app, ["chat", "--once", QUESTION, "--image", str(image), "--vision-model",
                               str(tiny.prime_dir), "--max-new-tokens", "8"])
    assert done.exit_code == 0, done.output
    store = ConversationStore()
    try:
        cid = store.list()[0].id
        user, reply = store.stored_messages(cid)
        assert store.image(user.images[0]).data == png_bytes(5)
        assert reply.model.startswith("tiny-vision@") and reply.content in done.output
    finally:
        store.close()

    missing = runner.invoke(app, ["chat", "--once", QUESTION, "--image", str(image), "--vision-model",
                                  "prime-7b-vision-v1", "--no-save"])
    assert missing.exit_code == 1 and "prime pull prime-7b-vision-v1" in missing.output
    bad = runner.invoke(app, ["chat", "--once", QUESTION, "--image", str(image.parent / "nope.png"), "--no-save"])
    assert bad.exit_code == 1 and "nope.png" in bad.output and "no such image" in bad.output


def test_cli_slash_image_attaches_to_the_next_turn(chat_model, tiny):
    from jarvis.cli import app

    image = tiny.prime_dir.parent / "my photo.png"
    image.write_bytes(png_bytes(6))
    session = f'/image "{image}"\n{QUESTION}\nHello?\n/image {image.parent / "nope.png"}\n/exit\n'
    done = CliRunner().invoke(app, ["chat", "--vision-model", str(tiny.prime_dir), "--max-new-tokens", "8"],
                              input=session)
    assert done.exit_code == 0, done.output
    assert "1 image(s) attached" in done.output and "no such image" in done.output
    store = ConversationStore()
    try:
        messages = store.stored_messages(store.list()[0].id)
        assert [len(m.images) for m in messages] == [1, 0, 0, 0], "the image went with the next message only"
        assert store.image(messages[0].images[0]).data == png_bytes(6)
        assert messages[1].model.startswith("tiny-vision@"), "the image turn: the vision model"
        assert messages[3].model.startswith("tiny-vision@"), "the image is still in context"
    finally:
        store.close()


def test_export_writes_multimodal_sft_that_reactor_core_loads(chat, vision, store, tmp_path):
    from reactor_core.data import load_chat_file

    from jarvis.feedback import export_data

    b = bot(chat, vision, store)
    images = [png_bytes(7), png_bytes(8, size=(64, 200))]
    b.ask(QUESTION, images)
    store.rate(b.last_reply_id, 1)
    store.correct(b.last_reply_id, "It is red, sir.")  # SFT; its DPO pair is about an image: left out
    b.reset()
    b.ask("Hello?")
    store.rate(b.last_reply_id, 1)
    out = tmp_path / "export"
    report = export_data(store, sft_path=out / "sft.jsonl", dpo_path=out / "dpo.jsonl", scrub=True)
    assert (report.sft, report.dpo, report.images, report.image_records_skipped) == (2, 0, 2, 1)

    lines = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    parts = lines[0]["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert all(p["path"].startswith("images/") and p["path"].endswith(".png") for p in parts[:2])
    examples, data_report = load_chat_file(out / "sft.jsonl")
    assert data_report.images == 2
    assert [image.read_bytes() for image in examples[0].images] == images, "byte-identical round trip"
    assert examples[0].messages[-1].content == "It is red, sir."
    assert examples[1].images == ()
