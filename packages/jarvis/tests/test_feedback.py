"""Feedback stored with the turn, and exported as data reactor-core accepts."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from jarvis.feedback import export_data, scrub_pii
from jarvis.memory import ConversationStore


@pytest.fixture
def store(tmp_path):
    s = ConversationStore(tmp_path / "jarvis.db")
    yield s
    s.close()


def chat(store, *turns, system=None, private=False, cid=None):
    """A conversation of (user, reply) turns; returns (cid, [reply ids])."""
    cid = store.create(system_prompt=system, private=private, cid=cid)
    ids = []
    for user, reply in turns:
        store.add(cid, "user", user)
        ids.append(store.add(cid, "assistant", reply, model="m@1"))
    return cid, ids


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_feedback_is_stored_with_the_turn(store):
    cid, (first, second) = chat(store, ("hi", "Hello."), ("2+2?", "5"))
    store.rate(first, 1)
    store.correct(second, "4")
    assert store.messages(cid)[-1] == {"role": "assistant", "content": "4"}, "the conversation continues from the correction"
    kept = store.message(second)
    assert (kept.original, kept.corrected, kept.model) == ("5", True, "m@1")
    assert store.message(first).rating == 1
    store.rate(first, None)
    assert store.message(first).rating is None
    with pytest.raises(ValueError, match="rating must be"):
        store.rate(first, 5)
    user_id = store.stored_messages(cid)[0].id
    with pytest.raises(ValueError, match="feedback is on replies"):
        store.rate(user_id, 1)
    with pytest.raises(KeyError, match="no message 999"):
        store.correct(999, "x")


def test_regenerations_keep_the_old_reply_as_an_alternative(store):
    cid, (first, second) = chat(store, ("hi", "Hello."), ("joke?", "No."))
    with pytest.raises(ValueError, match="last reply"):
        store.add_alternative(first, "Hi there.")
    new = store.add_alternative(second, "Why did the robot cross the road?")
    assert store.messages(cid)[-1]["content"].startswith("Why did the robot")
    assert store.get(cid).messages == 4
    alternatives = [m for m in store.stored_messages(cid, include_inactive=True) if m.group_id == second]
    assert [(m.id, m.active) for m in alternatives] == [(second, False), (new, True)]


def test_export_writes_sft_and_dpo_that_reactor_core_accepts(store, tmp_path):
    from reactor_core.data.preference import load_preference_file
    from reactor_core.data.validation import load_chat_file

    cid, (good, wrong, regen_old) = chat(store, ("What is the capital of France?", "Paris."),
                                         ("2+2?", "5"), ("Tell me a joke.", "No."), system="You are JARVIS.")
    store.rate(good, 1)
    store.rate(wrong, -1)
    store.correct(wrong, "4")
    store.rate(store.add_alternative(regen_old, "A robot walks into a bar."), 1)
    chat(store, ("my secret plans", "Sure."), private=True)  # rated, but private
    private_reply = store.stored_messages(store.list()[0].id)[-1].id
    store.rate(private_reply, 1)
    chat(store, ("unrated", "Nothing to learn."))

    report = export_data(store, sft_path=tmp_path / "sft.jsonl", dpo_path=tmp_path / "dpo.jsonl")
    assert (report.sft, report.dpo, report.private_skipped) == (3, 2, 1)
    sft, dpo = read(tmp_path / "sft.jsonl"), read(tmp_path / "dpo.jsonl")
    assert sft[0]["messages"] == [{"role": "system", "content": "You are JARVIS."},
                                  {"role": "user", "content": "What is the capital of France?"},
                                  {"role": "assistant", "content": "Paris."}]
    assert sft[1]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert sft[1]["messages"][-2] == {"role": "user", "content": "2+2?"}
    assert sft[2]["messages"][-1]["content"] == "A robot walks into a bar."
    assert sft[2]["messages"][-3]["content"] == "4", "later context carries the correction"
    assert (dpo[0]["chosen"], dpo[0]["rejected"]) == ("4", "5")
    assert (dpo[1]["chosen"], dpo[1]["rejected"]) == ("A robot walks into a bar.", "No.")
    assert dpo[1]["prompt"][-1] == {"role": "user", "content": "Tell me a joke."}
    assert not any("secret" in json.dumps(r) for r in sft + dpo)

    examples, _ = load_chat_file(tmp_path / "sft.jsonl")
    pairs, _ = load_preference_file(tmp_path / "dpo.jsonl")
    assert len(examples) == 3 and len(pairs) == 2


def test_pii_scrubbing():
    text = ("Mail ada@example.co.uk or call +44 20 7946 0958, card 4111 1111 1111 1111, "
            "server 192.168.1.20, token sk-abcdefghijklmnop1234, ssn 123-45-6789. The answer is 42.")
    clean = scrub_pii(text)
    for secret in ("ada@example", "7946", "4111", "192.168", "sk-abc", "6789"):
        assert secret not in clean, secret
    for placeholder in ("[EMAIL]", "[PHONE]", "[CARD]", "[IP]", "[SECRET]"):
        assert placeholder in clean
    assert "The answer is 42." in clean, "ordinary numbers stay"


def test_export_scrubs_when_asked(store, tmp_path):
    _, (reply,) = chat(store, ("Email me at bob@corp.com", "Sent to bob@corp.com."))
    store.rate(reply, 1)
    export_data(store, sft_path=tmp_path / "plain.jsonl")
    export_data(store, sft_path=tmp_path / "clean.jsonl", scrub=True)
    assert "bob@corp.com" in (tmp_path / "plain.jsonl").read_text()
    assert "bob@corp.com" not in (tmp_path / "clean.jsonl").read_text()
    assert "[EMAIL]" in (tmp_path / "clean.jsonl").read_text()


def test_a_database_from_jarvis_2_0_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(textwrap.dedent("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, model TEXT, system_prompt TEXT,
            private INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL,
            role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO conversations VALUES ('old', 'hello', NULL, NULL, 0, 1, 1);
        INSERT INTO messages (conversation_id, role, content, created) VALUES ('old', 'user', 'hi', 1), ('old', 'assistant', 'Hello.', 2);
    """))
    db.commit()
    db.close()
    store = ConversationStore(path)
    assert store.messages("old") == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    store.rate(store.stored_messages("old")[1].id, 1)
    assert store.stored_messages("old")[1].rating == 1
    store.close()


WRITER = """
import sys
from jarvis.memory import ConversationStore
store = ConversationStore(sys.argv[1])
cid = store.create()
i = 0
while True:
    store.add(cid, "user", f"question {i}")
    store.add(cid, "assistant", f"answer {i}" + " padding" * 200)
    i += 1
    if i == 20:
        print("writing", flush=True)
"""


def test_a_process_killed_while_writing_loses_no_committed_turn(tmp_path):
    """SIGKILL a writer mid-stream: the database opens, and every message it had
    committed (all but possibly the one in flight) is there and intact."""
    path = tmp_path / "jarvis.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                              env=os.environ.copy())
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    store = ConversationStore(path)
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    (conversation,) = store.list()
    messages = store.messages(conversation.id)
    assert len(messages) >= 40
    for i, message in enumerate(messages):  # in order, none torn
        n = i // 2
        expected = f"question {n}" if i % 2 == 0 else f"answer {n}" + " padding" * 200
        assert message["content"] == expected
    store.close()


def test_a_reply_and_everything_it_yields_stay_on_one_side_of_the_holdout(store, tmp_path):
    from jarvis.feedback import collect
    from jarvis.improve import holdout_keys

    for i in range(12):
        _, (reply,) = chat(store, (f"question {i}", f"wrong {i}"), cid=f"c{i}")  # fixed ids: a deterministic split
        store.correct(reply, f"right {i}")  # one SFT example and one DPO pair, same key
    records = collect(store)
    keys = sorted({r.key for r in records})
    assert len(keys) == 12 and len(records) == 24
    held = holdout_keys(keys, 0.25)
    assert 1 <= len(held) < 12
    assert holdout_keys(keys[:8], 0.25) == held & set(keys[:8]), "more feedback never moves a reply across"
    for key in keys:
        assert {r.kind for r in records if r.key == key} == {"sft", "dpo"}


def test_blank_replies_are_not_training_data(store, tmp_path):
    _, (empty, fine) = chat(store, ("hi", ""), ("hello", "Hello."))
    store.correct(empty, "Hello there.")  # correction of an empty reply: SFT yes, DPO no
    store.rate(fine, 1)
    report = export_data(store, sft_path=tmp_path / "sft.jsonl", dpo_path=tmp_path / "dpo.jsonl")
    assert (report.sft, report.dpo, report.unusable) == (2, 0, 1)


def test_concurrent_writers_cannot_interleave_a_conversation(store):
    from jarvis.memory import ConflictError, NotFoundError

    cid = store.create()
    first = store.last_id(cid)
    store.add_exchange(cid, "one", "1", after=first)
    with pytest.raises(ConflictError, match="changed while this reply was written"):
        store.add_exchange(cid, "two", "2", after=first)  # generated from the state before "one"
    assert [m["content"] for m in store.messages(cid)] == ["one", "1"]
    with pytest.raises(NotFoundError):
        store.get("nope")


def test_a_reply_that_called_tools_is_exported_in_openai_shape_and_trains_as_jarvis_prompts_it(store, tmp_path):
    """`jarvis improve` on conversations with tool calls: the SFT record keeps the calls and
    results (OpenAI's shape, with the tools JARVIS offers), Reactor Core reads it, and the
    feedback recipe renders it into the Hermes turns the 135M chat model is prompted with
    (its ChatML renders no tools): the call an assistant turn, the result a user turn."""
    from jarvis_prime.models.tools import hermes_messages
    from jarvis_prime.recipes.feedback import prerender_tool_calls
    from reactor_core.data.validation import load_chat_file

    cid = store.create()
    call = {"id": "call_1", "name": "calculator", "arguments": '{"expression": "12 * 7"}', "result": "84", "error": None}
    _, reply = store.add_exchange(cid, "What is 12 times 7?", "12 * 7 = 84.", model="m@1", tool_calls=[call])
    store.rate(reply, 1)
    store.rate(store.add_alternative(reply, "It is 74."), -1)
    report = export_data(store, sft_path=tmp_path / "sft.jsonl", dpo_path=tmp_path / "dpo.jsonl")
    assert (report.sft, report.dpo, report.tool_pairs_skipped) == (1, 0, 1)
    (record,) = read(tmp_path / "sft.jsonl")
    assert record["messages"] == [
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12 * 7"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "84"},
        {"role": "assistant", "content": "12 * 7 = 84."}]
    assert [t["function"]["name"] for t in record["tools"]][:2] == ["calculator", "current_datetime"]
    (example,), _ = load_chat_file(tmp_path / "sft.jsonl")  # Reactor Core reads the OpenAI shape
    assert example.messages[1].tool_calls[0].name == "calculator" and example.tool_list == record["tools"]

    model_dir = tmp_path / "model"  # a model whose template knows no tools (ChatML)
    model_dir.mkdir()
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                                   "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rendered = prerender_tool_calls(tmp_path / "sft.jsonl", model_dir, tmp_path / "work" / "sft-rendered.jsonl")
    assert rendered == tmp_path / "work" / "sft-rendered.jsonl"
    assert read(rendered) == [{"messages": hermes_messages(record["messages"], record["tools"])}]
    (plain,), _ = load_chat_file(rendered)
    assert [m.role for m in plain.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert plain.messages[2].content.startswith("<tool_call>\n") and "<tool_response>\n84" in plain.messages[3].content
    (model_dir / "chat_template.jinja").write_text("{% for t in tools %}{{ t }}{% endfor %}")  # knows tools
    assert prerender_tool_calls(tmp_path / "sft.jsonl", model_dir, tmp_path / "w2.jsonl") == tmp_path / "sft.jsonl"


def test_reactor_cores_pii_scrub_keeps_jarvis_export_rules():
    """reactor_core's data pipeline copies this export's PII rules (neither package may import
    the other's); a record scrubbed by either must read alike, so the copies may not drift."""
    from jarvis.feedback import PII_PATTERNS as JARVIS_RULES

    filters = pytest.importorskip("reactor_core.data.filters")
    ours = [(placeholder, pattern.pattern, pattern.flags) for placeholder, pattern, _ in JARVIS_RULES]
    theirs = [(placeholder, pattern.pattern, pattern.flags) for _, placeholder, pattern in filters.PII_PATTERNS]
    assert ours == theirs
