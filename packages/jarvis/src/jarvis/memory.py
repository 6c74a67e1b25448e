"""Conversations that outlive the process: SQLite (WAL) under $JARVIS_HOME.

    store = ConversationStore()                 # $JARVIS_HOME/jarvis.db (default ~/.local/share/jarvis)
    cid = store.create(title="trip planning")
    store.add(cid, "user", "hi"); store.add(cid, "assistant", "Hello!")
    store.messages(cid)                         # [{"role": "user", ...}, ...]

WAL lets a terminal chat and another reader (the web page, `jarvis conversations`)
use the database at once; every write is its own transaction, so a crash loses at
most the turn being written. Messages keep their ids: ratings and corrections (the
feedback that becomes training data) attach to them.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

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
"""


def jarvis_home() -> Path:
    return Path(os.environ.get("JARVIS_HOME") or Path.home() / ".local" / "share" / "jarvis")


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    model: str | None
    private: bool
    created: float
    updated: float
    messages: int


class ConversationStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or jarvis_home() / "jarvis.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def create(self, title: str = "", model: str | None = None, system_prompt: str | None = None,
               private: bool = False) -> str:
        cid = uuid.uuid4().hex[:12]
        now = time.time()
        self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (cid, title, model, system_prompt, int(private), now, now))
        return cid

    def get(self, cid: str) -> Conversation:
        row = self._db.execute(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS n "
            "FROM conversations c WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            known = [c.id for c in self.list()[:5]]
            raise KeyError(f"no conversation {cid!r} in {self.path}" + (f" (recent: {', '.join(known)})" if known else ""))
        return Conversation(row["id"], row["title"], row["model"], bool(row["private"]), row["created"],
                            row["updated"], row["n"])

    def list(self) -> list[Conversation]:
        rows = self._db.execute("SELECT id FROM conversations ORDER BY updated DESC").fetchall()
        return [self.get(r["id"]) for r in rows]

    def add(self, cid: str, role: str, content: str) -> int:
        """Append one message; returns its id. The first user message titles an untitled conversation."""
        now = time.time()
        with self._db:  # one transaction: the message and the conversation's timestamp
            self._db.execute("BEGIN")
            cursor = self._db.execute("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, ?, ?, ?)",
                                      (cid, role, content, now))
            self._db.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' AND ? = 'user' "
                             "THEN substr(?, 1, 60) ELSE title END WHERE id = ?", (now, role, content, cid))
        return cursor.lastrowid

    def messages(self, cid: str) -> list[dict[str, str]]:
        self.get(cid)  # a clear error for an unknown id
        rows = self._db.execute("SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id", (cid,))
        return [{"role": r["role"], "content": r["content"]} for r in rows]

    def delete(self, cid: str) -> None:
        self._db.execute("DELETE FROM conversations WHERE id = ?", (cid,))

    def close(self) -> None:
        self._db.close()
