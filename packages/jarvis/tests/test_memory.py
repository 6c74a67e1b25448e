"""Two processes writing one conversation: `jarvis serve` and `jarvis chat -c` at once.

Real processes on a real SQLite file; a third process holding the write lock stands
in for a slow commit (a disk stalled by a training run's checkpoints, a migration of
a large database).
"""

import subprocess
import sys
import textwrap
import threading

import pytest

from jarvis.memory import BUSY_TIMEOUT_S, ConversationStore, StoreBusyError

# Appends `n` exchanges tagged `tag`, each after the newest message it saw; a
# ConflictError (the other writer got in first) is answered like a user would: send again.
WRITER = textwrap.dedent("""
    import sys
    from jarvis.memory import ConflictError, ConversationStore
    db, cid, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = ConversationStore(db)
    for i in range(n):
        while True:
            try:
                store.add_exchange(cid, f"{tag} {i}?", f"{tag} {i}.", after=store.last_id(cid))
                break
            except ConflictError:
                pass
    store.close()
""")

# Holds the database's write lock for `seconds`, as a slow commit does.
HOLDER = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
""")


def hold_write_lock(db, seconds):
    """A process that holds `db`'s write lock for `seconds`; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder


def test_two_processes_append_to_one_conversation_and_lose_no_turn(tmp_path):
    """Both writers start while another write holds the lock for longer than Python's
    default 5 s busy timeout: they wait for it (BUSY_TIMEOUT_S) instead of failing with
    "database is locked" and losing their turns, then interleave whole exchanges."""
    db, n, hold = tmp_path / "jarvis.db", 25, 6.5
    assert hold < BUSY_TIMEOUT_S
    store = ConversationStore(db)
    cid = store.create(cid="shared")
    holder = hold_write_lock(db, hold)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), cid, tag, str(n)], stderr=subprocess.PIPE,
                                text=True) for tag in ("web", "cli")]
    errors = [w.communicate(timeout=120)[1] for w in writers]
    holder.wait(timeout=30)
    assert [w.returncode for w in writers] == [0, 0], errors

    messages = store.messages(cid)
    assert len(messages) == 4 * n, "every turn of both writers is stored"
    for user, reply in zip(messages[::2], messages[1::2]):
        assert (user["role"], reply["role"]) == ("user", "assistant")
        assert reply["content"] == user["content"][:-1] + ".", "an exchange is never split by the other writer's"
    for tag in ("web", "cli"):
        mine = [m["content"] for m in messages if m["role"] == "user" and m["content"].startswith(tag)]
        assert mine == [f"{tag} {i}?" for i in range(n)], "each writer's turns in the order it wrote them"
    store.close()


def test_a_write_blocked_past_the_busy_timeout_names_the_database_and_writes_nothing(tmp_path):
    db = tmp_path / "jarvis.db"
    store = ConversationStore(db, busy_timeout=0.2)
    cid = store.create()
    store.add_exchange(cid, "hi", "Hello.", after=None)
    holder = hold_write_lock(db, 3)
    with pytest.raises(StoreBusyError, match=rf"{db} is busy: .* over 0.2 s; nothing was written"):
        store.add_exchange(cid, "still there?", "Yes.", after=store.last_id(cid))
    holder.wait(timeout=30)
    assert [m["content"] for m in store.messages(cid)] == ["hi", "Hello."], "no half of the exchange was kept"
    store.add_exchange(cid, "still there?", "Yes.", after=store.last_id(cid))
    assert len(store.messages(cid)) == 4, "the next try goes through"
    store.close()


def test_a_regeneration_checks_and_writes_in_one_transaction(tmp_path):
    """Another connection appends to the conversation between the regeneration's check
    (is this still the last reply?) and its write. That moment cannot be hit on cue, so
    the test makes the other write right after the check (wrapping `last_id`) and gives
    it one second: the old code let it land there, and the regenerated reply came *after*
    the message that answered the original one."""
    db = tmp_path / "jarvis.db"
    regenerating, other = ConversationStore(db), ConversationStore(db)
    cid = regenerating.create()
    regenerating.add(cid, "user", "Tell me a joke.")
    reply = regenerating.add(cid, "assistant", "No.")
    check = regenerating.last_id

    def another_process_writes_after_the_check(conversation):
        last = check(conversation)
        writer = threading.Thread(target=other.add, args=(cid, "user", "Thanks!"))
        writer.start()
        writer.join(timeout=1.0)  # done at once if nothing stops the write; else it waits for our commit
        threads.append(writer)
        return last

    threads = []
    regenerating.last_id = another_process_writes_after_the_check
    regenerating.add_alternative(reply, "Why did the GPU cross the road?")
    threads[0].join(timeout=10)
    assert [m["content"] for m in other.messages(cid)] == [
        "Tell me a joke.", "Why did the GPU cross the road?", "Thanks!"], "the regeneration is not left after a later turn"
    regenerating.close()
    other.close()


def test_listing_while_another_process_deletes_lists_what_exists(tmp_path):
    """`jarvis history --delete` in one process while the web page lists conversations in
    another: the old list() read the ids, then each conversation, and one deleted in
    between was a NotFoundError (a 404 for the whole list). The delete is injected at
    that moment (wrapping `get`), which cannot be hit on cue."""
    db = tmp_path / "jarvis.db"
    listing, deleting = ConversationStore(db), ConversationStore(db)
    kept, gone = listing.create(title="kept"), listing.create(title="gone")
    get = listing.get

    def get_after_a_delete(cid):
        deleting.delete(gone)
        return get(cid)

    listing.get = get_after_a_delete
    listed = {c.id for c in listing.list()}  # the old code raised NotFoundError here
    assert listed in ({kept}, {kept, gone}), "a snapshot: before the delete or after it"
    listing.close()
    deleting.close()
