"""Conversations that outlive the process: SQLite (WAL) under $JARVIS_HOME.

    store = ConversationStore()                 # $JARVIS_HOME/jarvis.db (default ~/.local/share/jarvis)
    cid = store.create(title="trip planning")
    store.add(cid, "user", "hi"); store.add(cid, "assistant", "Hello!")
    store.messages(cid)                         # [{"role": "user", ...}, ...]

WAL lets a terminal chat and another reader (the web page, `jarvis history`) use
the database at once; every write is its own short transaction, so a crash loses at
most the turn being written. Two processes writing at once (`jarvis serve` and `jarvis
chat -c` on the same conversation) take turns: a write waits up to `BUSY_TIMEOUT_S` for
the other's to commit, and one that checks the conversation before writing (an exchange,
a regeneration) checks it inside its own write transaction (BEGIN IMMEDIATE), so no
other write lands in between. Past the timeout, StoreBusyError names the database and
nothing is written.

Feedback lives on the assistant message it is about, because that is what becomes
training data (`jarvis.feedback`): a rating (+1/-1), a correction (the reply the
user wrote instead; the conversation continues from it), and regenerations. A
regenerated reply is a new message in the same *alternatives group* (`group_id`, the
id of the first reply); exactly one member of a group is active, i.e. part of the
conversation the model sees, and the others stay for preference data.

Images a user sends are stored once each, by sha256 (`images`: the bytes, their sniffed
format and size), and linked to the messages that carry them (`message_images`), so
history, `jarvis chat -c` and `jarvis export-data` keep them; deleting the last
conversation that shows an image deletes the image.

Schema 5 (issue #24) adds search and long-term memory, both SQLite FTS5 (porter stemming):
`messages_fts` indexes every message's text (`search_messages`: the `search_conversations`
tool; private conversations never answer), and `facts` holds what JARVIS should remember
across conversations ("my sister's birthday is 3 May"), each with the conversation and message
it came from, deduplicated by its normalised text (case, spaces, final punctuation), listed and
forgotten by the user. `recall` ranks the facts against a message by bm25 over its words (short
common words left out), best first: the top few go into a later conversation's system
message. Private conversations never feed memory: `remember` refuses to save from one.
A reply's tool calls and results are kept beside it (`tool_calls`, JSON), as its thinking is.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from jarvis.vision import MAX_IMAGE_BYTES, MAX_IMAGES_PER_MESSAGE, user_message
from jarvis_prime.models.content import image_format

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT,
    system_prompt TEXT,
    private INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY,
    format TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    data BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS message_images (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    sha256 TEXT NOT NULL REFERENCES images(sha256),
    PRIMARY KEY (message_id, position)
);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, content='messages', content_rowid='id',
                                                          tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
CREATE TABLE IF NOT EXISTS facts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    normalized TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL CHECK (source IN ('model', 'user')),
    conversation_id TEXT REFERENCES conversations(id) ON DELETE SET NULL,
    message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    created REAL NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS facts_fts USING fts5(text, content='facts', content_rowid='id',
                                                       tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS facts_fts_insert AFTER INSERT ON facts BEGIN
    INSERT INTO facts_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS facts_fts_delete AFTER DELETE ON facts BEGIN
    INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
"""

# Schema version 2 (PRAGMA user_version): feedback columns. ALTERs, so a database
# written by jarvis 2.0 keeps its conversations.
FEEDBACK_COLUMNS = {
    "model": "TEXT",  # name@version of the model that wrote an assistant message
    "rating": "INTEGER CHECK (rating IN (-1, 1))",
    "correction": "TEXT",
    "group_id": "INTEGER",  # regenerations share the first reply's id
    "active": "INTEGER NOT NULL DEFAULT 1",
    "feedback_at": "REAL",
    "thinking": "TEXT",  # schema version 4 (below)
    "tool_calls": "TEXT",  # schema version 5: JSON list of {id, name, arguments, result, error}
}
# Schema version 3: images (the `images` and `message_images` tables above; created by
# SCHEMA on any older database, nothing to migrate).
# Schema version 4: the `thinking` column, a thinking model's reasoning beside its reply
# (issue #22): kept apart from `content`, so the answer alone is the conversation and the training data.
# Schema version 5: `tool_calls`, and the FTS5 tables `messages_fts` (filled from the messages
# already stored) and `facts` / `facts_fts` (long-term memory), created by SCHEMA (issue #24).
SCHEMA_VERSION = 5
FTS_SCHEMA_VERSION = 5  # below it, messages_fts is rebuilt from the stored messages

MAX_FACT_CHARS = 500
# Left out of recall and search queries: they match nearly everything and say nothing.
STOPWORDS = frozenset("""
a about an and are as at be but by can could did do does for from had has have how i i'm in is it its me my
no not of on or our please she he so tell that the their them there they this to us was we what when where
which who why will with would you your
""".split())

# Python's default is 5 s; a commit stalled by a busy disk (a training run writing
# checkpoints) or a migration of a large database can hold the write lock longer.
BUSY_TIMEOUT_S = 30.0


class ConflictError(ValueError):
    """A write that would interleave with another one on the same conversation."""


class StoreBusyError(ConflictError):
    """Another process held the database's write lock past the busy timeout; nothing
    was written. A ConflictError: the caller tries again (the web API answers 409)."""


class PrivateConversationError(ValueError):
    """Something would have fed memory from a private conversation; nothing was saved."""


class NotFoundError(KeyError):
    """No such conversation or message (a KeyError, so `except KeyError` still works)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


def jarvis_home() -> Path:
    return Path(os.environ.get("JARVIS_HOME") or Path.home() / ".local" / "share" / "jarvis")


@dataclass(frozen=True)
class StoredMessage:
    """One message as the store keeps it; `content` is what the conversation uses
    (the correction when there is one), `original` what the model wrote."""

    id: int
    conversation_id: str
    role: str
    content: str
    original: str
    model: str | None
    rating: int | None
    corrected: bool
    group_id: int
    active: bool
    created: float
    images: tuple[str, ...] = ()  # sha256 of each image the message carries, in order (user messages)
    thinking: str | None = None  # a thinking model's reasoning before `content` (shown folded, never sent back)
    tool_calls: tuple[dict[str, Any], ...] = ()  # the tools the reply called: {id, name, arguments, result, error}

    def as_chat(self) -> dict[str, str]:
        """The message's text as a chat message (`ConversationStore.chat_message` adds its images)."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    format: str  # png | jpeg | gif | bmp, sniffed from the bytes
    data: bytes


@dataclass(frozen=True)
class Fact:
    """Something JARVIS remembers across conversations, and where it came from."""

    id: int
    text: str
    source: str  # "model" (its remember tool) or "user" (/remember, the API)
    conversation_id: str | None  # None once that conversation is deleted (the fact stays until forgotten)
    message_id: int | None
    created: float


@dataclass(frozen=True)
class MessageHit:
    """A stored message that matches a search, with the words that matched in [brackets]."""

    message_id: int
    conversation_id: str
    title: str
    role: str
    snippet: str
    created: float


def normalize_fact(text: str) -> str:
    """What makes two facts the same: case, runs of spaces and final punctuation do not count."""
    return " ".join(text.casefold().split()).rstrip(" .!;,")


def fts_query(text: str) -> str | None:
    """An FTS5 query matching any of `text`'s words (each quoted: no FTS syntax from the user gets
    through), short common words left out; None when nothing is left."""
    words = [w for w in re.findall(r"\w+", text.casefold()) if len(w) > 1 and w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words)) or None


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    model: str | None
    private: bool
    created: float
    updated: float
    messages: int


def _locked(method):
    """One connection serves every thread of the web server; a call runs whole (its
    transaction included) before another thread's starts."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock, self._busy_is_an_error():
            return method(self, *args, **kwargs)

    return wrapper


class ConversationStore:
    def __init__(self, path: Path | None = None, busy_timeout: float = BUSY_TIMEOUT_S) -> None:
        """`busy_timeout`: seconds a write waits for another process's write to commit."""
        self._lock = threading.RLock()
        self.path = Path(path or jarvis_home() / "jarvis.db")
        self.busy_timeout = busy_timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=busy_timeout, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._busy_is_an_error():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            self._migrate()

    @contextlib.contextmanager
    def _busy_is_an_error(self) -> Iterator[None]:
        """SQLite's "database is locked" after the busy timeout, as an error that says
        which database, what waited and that nothing was written (the transaction rolled back)."""
        try:
            yield
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            raise StoreBusyError(f"{self.path} is busy: another process (jarvis serve, jarvis chat, ...) held its "
                                 f"write lock for over {self.busy_timeout:g} s; nothing was written, try again") from err

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            have = {row["name"] for row in self._db.execute("PRAGMA table_info(messages)")}
            for column, kind in FEEDBACK_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
            self._db.execute("UPDATE messages SET group_id = id WHERE group_id IS NULL")
            if version < FTS_SCHEMA_VERSION:  # the messages written before the index existed
                self._db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @_locked
    def create(self, title: str = "", model: str | None = None, system_prompt: str | None = None,
               private: bool = False, cid: str | None = None) -> str:
        """A new conversation; `cid` chooses its id (imports, tests), else a random one."""
        cid = cid or uuid.uuid4().hex[:12]
        now = time.time()
        self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (cid, title, model, system_prompt, int(private), now, now))
        return cid

    @_locked
    def get(self, cid: str) -> Conversation:
        row = self._db.execute(f"{CONVERSATIONS} WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            known = [c.id for c in self.list()[:5]]
            raise NotFoundError(f"no conversation {cid!r} in {self.path}" + (f" (recent: {', '.join(known)})" if known else ""))
        return _conversation(row)

    @_locked
    def list(self) -> list[Conversation]:
        """Newest first, in one query: a conversation another process deletes meanwhile
        is either listed whole or not at all."""
        return [_conversation(row) for row in self._db.execute(f"{CONVERSATIONS} ORDER BY c.updated DESC")]

    @_locked
    def update(self, cid: str, *, title: str | None = None, private: bool | None = None) -> None:
        """Rename a conversation or mark it private (private ones never become training data)."""
        self.get(cid)
        if title is not None:
            self._db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))
        if private is not None:
            self._db.execute("UPDATE conversations SET private = ? WHERE id = ?", (int(private), cid))

    @_locked
    def system_prompt(self, cid: str) -> str | None:
        self.get(cid)
        return self._db.execute("SELECT system_prompt FROM conversations WHERE id = ?", (cid,)).fetchone()[0]

    @_locked
    def add(self, cid: str, role: str, content: str, model: str | None = None) -> int:
        """Append one message; returns its id. The first user message titles an untitled conversation."""
        with self._db:  # one transaction: the message and the conversation's timestamp
            self._db.execute("BEGIN IMMEDIATE")
            return self._insert(cid, role, content, model)

    @_locked
    def add_exchange(self, cid: str, user: str, reply: str, model: str | None = None,
                     after: int | None = None, images: Sequence[bytes] = (),
                     thinking: str | None = None, tool_calls: Sequence[dict[str, Any]] = ()) -> tuple[int, int]:
        """Append a user message (with its `images`, encoded files) and its reply in one
        transaction; returns their ids. `thinking`: the reasoning a thinking model wrote before
        `reply`, kept beside it (never as the reply); `tool_calls`: the tools it called on the way.

        `after`: the id of the newest message the reply was generated from (None: the
        conversation was empty). If someone else wrote to the conversation meanwhile
        (another tab), nothing is written and ConflictError says so.
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if self.last_id(cid) != after:
                raise ConflictError(f"conversation {cid} changed while this reply was written; send it again")
            user_id = self._insert(cid, "user", user, None)
            self._attach(user_id, images)
            reply_id = self._insert(cid, "assistant", reply, model, thinking, tool_calls)
        return user_id, reply_id

    def _attach(self, message_id: int, images: Sequence[bytes]) -> None:
        """Store each image once (by sha256) and link it to the message, in order. Checked
        here too (size, then the format from the first bytes), so no caller stores a non-image."""
        if len(images) > MAX_IMAGES_PER_MESSAGE:
            raise ValueError(f"{len(images)} images in one message; at most {MAX_IMAGES_PER_MESSAGE}")
        for position, data in enumerate(images):
            if len(data) > MAX_IMAGE_BYTES:
                raise ValueError(f"image {position}: {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}")
            kind = image_format(data)
            if kind is None:
                raise ValueError(f"image {position}: not a PNG, JPEG, GIF or BMP image")
            sha = hashlib.sha256(data).hexdigest()
            self._db.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?)",
                             (sha, kind, len(data), data, time.time()))
            self._db.execute("INSERT INTO message_images VALUES (?, ?, ?)", (message_id, position, sha))

    @_locked
    def image(self, sha256: str) -> StoredImage:
        row = self._db.execute("SELECT sha256, format, data FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise NotFoundError(f"no image {sha256} in {self.path}")
        return StoredImage(row["sha256"], row["format"], bytes(row["data"]))

    @_locked
    def chat_message(self, message: StoredMessage) -> dict[str, Any]:
        """The message as a chat message, its images (bytes) as content parts before the text."""
        if not message.images:
            return message.as_chat()
        return user_message(message.content, [self.image(sha).data for sha in message.images])

    def _insert(self, cid: str, role: str, content: str, model: str | None, thinking: str | None = None,
                tool_calls: Sequence[dict[str, Any]] = ()) -> int:
        now = time.time()
        cursor = self._db.execute(
            "INSERT INTO messages (conversation_id, role, content, created, model, thinking, tool_calls) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (cid, role, content, now, model, thinking, json.dumps(list(tool_calls)) if tool_calls else None))
        self._db.execute("UPDATE messages SET group_id = id WHERE id = ?", (cursor.lastrowid,))
        self._db.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' AND ? = 'user' "
                         "THEN substr(?, 1, 60) ELSE title END WHERE id = ?", (now, role, content, cid))
        return cursor.lastrowid

    @_locked
    def last_id(self, cid: str) -> int | None:
        """The newest active message's id (what a reply being generated now follows)."""
        return self._db.execute("SELECT MAX(id) FROM messages WHERE conversation_id = ? AND active = 1",
                                (cid,)).fetchone()[0]

    @_locked
    def add_alternative(self, message_id: int, content: str, model: str | None = None,
                        thinking: str | None = None, tool_calls: Sequence[dict[str, Any]] = ()) -> int:
        """Store a regenerated reply to the same prompt; it becomes the active one.

        Only the conversation's last reply can be regenerated: what came after an
        earlier reply was said in answer to it.
        """
        now = time.time()
        with self._db:  # the checks and the write in one transaction: no other write lands between them
            self._db.execute("BEGIN IMMEDIATE")
            old = self.message(message_id)
            if old.role != "assistant":
                raise ValueError(f"message {message_id} is a {old.role} message; only replies can be regenerated")
            if not old.active or self.last_id(old.conversation_id) != message_id:
                raise ValueError(f"message {message_id} is not the conversation's last reply; "
                                 "only that one can be regenerated")
            # COALESCE: a row a still-running jarvis 2.0 wrote after the migration has no group_id
            self._db.execute("UPDATE messages SET active = 0 WHERE COALESCE(group_id, id) = ?", (old.group_id,))
            cursor = self._db.execute(
                "INSERT INTO messages (conversation_id, role, content, created, model, group_id, thinking, tool_calls) "
                "VALUES (?, 'assistant', ?, ?, ?, ?, ?, ?)",
                (old.conversation_id, content, now, model, old.group_id, thinking,
                 json.dumps(list(tool_calls)) if tool_calls else None))
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, old.conversation_id))
        return cursor.lastrowid

    @_locked
    def rate(self, message_id: int, rating: int | None) -> None:
        """Thumbs up (+1), down (-1) or neither (None) on an assistant reply."""
        if rating not in (1, -1, None):
            raise ValueError(f"rating must be 1, -1 or null, got {rating!r}")
        self._feedback(message_id, "rating", rating)

    @_locked
    def correct(self, message_id: int, text: str | None) -> None:
        """Replace a reply with what it should have said (None removes the correction).

        The original stays for preference data; the conversation continues from the
        correction.
        """
        if text is not None and not text.strip():
            raise ValueError("a correction cannot be empty")
        self._feedback(message_id, "correction", text.strip() if text else None)

    @_locked
    def _feedback(self, message_id: int, column: str, value: object) -> None:
        message = self.message(message_id)
        if message.role != "assistant":
            raise ValueError(f"message {message_id} is a {message.role} message; feedback is on replies")
        self._db.execute(f"UPDATE messages SET {column} = ?, feedback_at = ? WHERE id = ?",
                         (value, time.time(), message_id))

    @_locked
    def message(self, message_id: int) -> StoredMessage:
        row = self._db.execute(f"{MESSAGES} WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no message {message_id} in {self.path}")
        return _stored(row)

    @_locked
    def stored_messages(self, cid: str, *, include_inactive: bool = False) -> list[StoredMessage]:
        """The conversation in order; by default only what the model sees (active replies)."""
        self.get(cid)  # a clear error for an unknown id
        where = "" if include_inactive else " AND active = 1"
        rows = self._db.execute(f"{MESSAGES} WHERE conversation_id = ?{where} ORDER BY id", (cid,))
        return [_stored(r) for r in rows]

    @_locked
    def messages(self, cid: str) -> list[dict[str, Any]]:
        """The conversation as chat messages, corrections applied, images as content parts."""
        return [self.chat_message(m) for m in self.stored_messages(cid)]

    @_locked
    def delete(self, cid: str) -> None:
        """The conversation, its messages and the images no other conversation shows."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
            self._db.execute("DELETE FROM images WHERE sha256 NOT IN (SELECT sha256 FROM message_images)")

    @_locked
    def search_messages(self, query: str, k: int = 5, *, exclude: str | None = None) -> list[MessageHit]:
        """The stored messages that best match `query`'s words (bm25), never from a private
        conversation nor from `exclude` (the conversation asking), nor replaced replies."""
        match = fts_query(query)
        if match is None:
            return []
        rows = self._db.execute(
            "SELECT m.id, m.conversation_id, c.title, m.role, m.created, "
            "snippet(messages_fts, 0, '[', ']', '...', 24) AS snippet FROM messages_fts "
            "JOIN messages m ON m.id = messages_fts.rowid JOIN conversations c ON c.id = m.conversation_id "
            "WHERE messages_fts MATCH ? AND c.private = 0 AND m.active = 1 AND m.role IN ('user', 'assistant') "
            "AND c.id IS NOT ? ORDER BY bm25(messages_fts) LIMIT ?", (match, exclude, k))
        return [MessageHit(r["id"], r["conversation_id"], r["title"], r["role"], r["snippet"], r["created"])
                for r in rows]

    @_locked
    def remember(self, text: str, *, source: str = "user", conversation_id: str | None = None,
                 message_id: int | None = None) -> tuple[Fact, bool]:
        """Save a fact (from `conversation_id` / `message_id`, when it came from one); returns it and
        whether it is new: a fact already known (same normalised text) is returned as it was.
        Refused (PrivateConversationError) when the conversation is private."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("a fact to remember cannot be empty")
        if len(text) > MAX_FACT_CHARS:
            raise ValueError(f"a fact is at most {MAX_FACT_CHARS} characters; this one has {len(text)}")
        if source not in ("model", "user"):
            raise ValueError(f"source must be 'model' or 'user', got {source!r}")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if conversation_id is not None and self.get(conversation_id).private:
                raise PrivateConversationError(f"conversation {conversation_id} is private: private conversations "
                                               "never feed memory, nothing was saved")
            known = self._db.execute("SELECT * FROM facts WHERE normalized = ?", (normalize_fact(text),)).fetchone()
            if known is not None:
                return _fact(known), False
            cursor = self._db.execute(
                "INSERT INTO facts (text, normalized, source, conversation_id, message_id, created) "
                "VALUES (?, ?, ?, ?, ?, ?)", (text, normalize_fact(text), source, conversation_id, message_id, time.time()))
            return _fact(self._db.execute("SELECT * FROM facts WHERE id = ?", (cursor.lastrowid,)).fetchone()), True

    @_locked
    def facts(self) -> list[Fact]:
        """Everything remembered, newest first."""
        return [_fact(r) for r in self._db.execute("SELECT * FROM facts ORDER BY id DESC")]

    @_locked
    def forget(self, fact_id: int) -> Fact:
        """Delete a fact; returns what it was."""
        row = self._db.execute("SELECT * FROM facts WHERE id = ?", (fact_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no remembered fact {fact_id} in {self.path} (`jarvis memory list` shows them)")
        self._db.execute("DELETE FROM facts WHERE id = ?", (fact_id,))
        return _fact(row)

    @_locked
    def recall(self, query: str, k: int = 3) -> list[Fact]:
        """The `k` facts that best match `query`'s words (FTS5 bm25, best first); none match: []."""
        match = fts_query(query)
        if match is None or k < 1:
            return []
        rows = self._db.execute("SELECT f.* FROM facts_fts JOIN facts f ON f.id = facts_fts.rowid "
                                "WHERE facts_fts MATCH ? ORDER BY bm25(facts_fts) LIMIT ?", (match, k))
        return [_fact(r) for r in rows]

    @_locked
    def close(self) -> None:
        self._db.close()


# Messages with their images' sha256, in order, comma-separated (NULL: none).
MESSAGES = ("SELECT *, (SELECT group_concat(sha256, ',') FROM (SELECT sha256 FROM message_images i "
            "WHERE i.message_id = m.id ORDER BY position)) AS image_shas FROM messages m")

# Each conversation with its number of active messages.
CONVERSATIONS = ("SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id AND m.active = 1) AS n "
                 "FROM conversations c")


def _conversation(row: sqlite3.Row) -> Conversation:
    return Conversation(row["id"], row["title"], row["model"], bool(row["private"]), row["created"], row["updated"],
                        row["n"])


def _fact(row: sqlite3.Row) -> Fact:
    return Fact(row["id"], row["text"], row["source"], row["conversation_id"], row["message_id"], row["created"])


def _stored(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        id=row["id"], conversation_id=row["conversation_id"], role=row["role"],
        content=row["correction"] if row["correction"] is not None else row["content"], original=row["content"],
        model=row["model"], rating=row["rating"], corrected=row["correction"] is not None,
        group_id=row["group_id"] if row["group_id"] is not None else row["id"], active=bool(row["active"]),
        created=row["created"], images=tuple(row["image_shas"].split(",")) if row["image_shas"] else (),
        thinking=row["thinking"], tool_calls=tuple(json.loads(row["tool_calls"])) if row["tool_calls"] else (),
    )
