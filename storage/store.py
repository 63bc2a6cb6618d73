"""The SQLite store: conversations, messages and settings, through sqlite-utils.

One connection guarded by a lock, because the UI writes from a worker thread while the main
thread reads; WAL lets a second process (`ccm-chat list`) read while the app writes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from storage.migrations import MIGRATIONS

Clock = Callable[[], datetime]


class StorageError(RuntimeError):
    """A database problem explained in words a user can act on."""


class NotFoundError(StorageError):
    pass


@dataclass(frozen=True)
class ConversationRecord:
    id: int
    title: str
    created: str
    updated: str
    model: str | None
    system_prompt: str | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class MessageRecord:
    id: int
    conversation_id: int
    role: str
    content: str
    created: str
    status: str
    token_count: int | None

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


@dataclass(frozen=True)
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int
    role: str
    snippet: str


@dataclass(frozen=True)
class MemoryStateRecord:
    """A saved conversation memory: opaque bytes plus what they must match to be reused."""

    id: int
    conversation_id: int
    message_id: int | None
    created: str
    backend: str
    model_fingerprint: str
    policy: dict[str, Any]
    position: int
    tokens_held: int
    tokens_seen: int
    size: int
    checksum: str
    blob: bytes

    @property
    def intact(self) -> bool:
        return len(self.blob) == self.size and checksum(self.blob) == self.checksum


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> datetime:
    return datetime.now(UTC)


def _conversation(row: dict[str, Any]) -> ConversationRecord:
    return ConversationRecord(
        id=row["id"],
        title=row["title"],
        created=row["created"],
        updated=row["updated"],
        model=row["model"],
        system_prompt=row["system_prompt"],
        settings=json.loads(row["settings"] or "{}"),
    )


def _message(row: dict[str, Any]) -> MessageRecord:
    return MessageRecord(**{k: row[k] for k in MessageRecord.__dataclass_fields__})


class Store:
    """All persistent state of the app. Every write is one transaction."""

    def __init__(self, path: Path | str, clock: Clock = utc_now, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.enable_wal()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StorageError(self._explain(exc)) from exc
        except OSError as exc:
            raise StorageError(f"Cannot open the database at {self.path}: {exc}") from exc

    def _explain(self, exc: sqlite3.Error) -> str:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return (
                f"The database {self.path} is locked by another program (is ccm-chat already "
                "running?). Close it and try again, or pass --db to use another file."
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return (
                f"The database {self.path} is damaged or is not a ccm-chat database ({text}). "
                "Move it aside (nothing is deleted) and start again, or pass --db to use "
                "another file."
            )
        return f"Database error in {self.path}: {text}"

    @contextmanager
    def _tx(self) -> Iterator[sqlite_utils.Database]:
        with self._lock:
            try:
                with self.db.atomic():
                    yield self.db
            except sqlite3.Error as exc:
                raise StorageError(self._explain(exc)) from exc

    def _read(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return list(self.db.query(sql, params))
            except sqlite3.Error as exc:
                raise StorageError(self._explain(exc)) from exc

    # -- schema ---------------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied TEXT)"
            )
        done = {row["name"] for row in self._read("SELECT name FROM _migrations")}
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            with self._tx() as db:
                fn(db)
                db["_migrations"].insert({"name": fn.__name__, "applied": self._now()})

    @property
    def schema_version(self) -> int:
        return len(self._read("SELECT name FROM _migrations"))

    def _now(self) -> str:
        return self._clock().isoformat(timespec="milliseconds")

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    # -- conversations --------------------------------------------------------------------------

    def create_conversation(
        self,
        title: str = "New chat",
        model: str | None = None,
        system_prompt: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> ConversationRecord:
        now = self._now()
        with self._tx() as db:
            row = {
                "title": title,
                "created": now,
                "updated": now,
                "model": model,
                "system_prompt": system_prompt,
                "settings": json.dumps(settings or {}),
            }
            conv_id = db["conversations"].insert(row).last_pk
        return self.get_conversation(conv_id)

    def get_conversation(self, conversation_id: int) -> ConversationRecord:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise NotFoundError(f"No conversation with id {conversation_id}.")
        return _conversation(rows[0])

    def list_conversations(self, limit: int | None = None) -> list[ConversationRecord]:
        sql = "SELECT * FROM conversations ORDER BY updated DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_conversation(r) for r in self._read(sql)]

    def latest_conversation(self) -> ConversationRecord | None:
        found = self.list_conversations(limit=1)
        return found[0] if found else None

    def update_conversation(self, conversation_id: int, **fields: Any) -> ConversationRecord:
        self.get_conversation(conversation_id)
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"])
        fields["updated"] = self._now()
        with self._tx() as db:
            db["conversations"].update(conversation_id, fields)
        return self.get_conversation(conversation_id)

    def rename_conversation(self, conversation_id: int, title: str) -> ConversationRecord:
        title = " ".join(title.split())
        if not title:
            raise StorageError("A conversation title cannot be empty.")
        return self.update_conversation(conversation_id, title=title)

    def delete_conversation(self, conversation_id: int) -> None:
        self.get_conversation(conversation_id)
        with self._tx() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- messages -------------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        status: str = "complete",
        token_count: int | None = None,
    ) -> MessageRecord:
        now = self._now()
        with self._tx() as db:
            msg_id = (
                db["messages"]
                .insert(
                    {
                        "conversation_id": conversation_id,
                        "role": role,
                        "content": content,
                        "created": now,
                        "status": status,
                        "token_count": token_count,
                    }
                )
                .last_pk
            )
            db["conversations"].update(conversation_id, {"updated": now})
        return self.get_message(msg_id)

    def get_message(self, message_id: int) -> MessageRecord:
        rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise NotFoundError(f"No message with id {message_id}.")
        return _message(rows[0])

    def messages(self, conversation_id: int) -> list[MessageRecord]:
        rows = self._read(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [_message(r) for r in rows]

    def delete_message(self, message_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Full-text search over every message; the query is taken literally (no FTS syntax)."""
        if not query.strip():
            return []
        fts_query = self.db.quote_fts(query)
        rows = self._read(
            """
            SELECT m.id, m.conversation_id, m.role, c.title,
                   snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet
            FROM messages_fts
            JOIN messages m ON m.rowid = messages_fts.rowid
            JOIN conversations c ON c.id = m.conversation_id
            WHERE messages_fts MATCH ?
            ORDER BY c.updated DESC, m.id
            LIMIT ?
            """,
            (fts_query, limit),
        )
        return [
            SearchHit(r["conversation_id"], r["title"], r["id"], r["role"], r["snippet"])
            for r in rows
        ]

    # -- settings -------------------------------------------------------------------------------

    def get_settings(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self._read("SELECT * FROM settings")}

    def save_settings(self, values: dict[str, Any]) -> None:
        with self._tx() as db:
            db["settings"].upsert_all(
                [{"key": k, "value": json.dumps(v)} for k, v in values.items()], pk="key"
            )

    # -- memory states --------------------------------------------------------------------------

    def save_memory_state(
        self,
        conversation_id: int,
        message_id: int | None,
        blob: bytes,
        *,
        backend: str,
        model_fingerprint: str,
        policy: dict[str, Any],
        position: int,
        tokens_held: int,
        tokens_seen: int,
    ) -> int:
        """Store a new state and prune the older ones, in one transaction.

        Until that transaction commits, the previous state is still the one on disk.
        """
        row = {
            "conversation_id": conversation_id,
            "message_id": message_id,
            "created": self._now(),
            "backend": backend,
            "model_fingerprint": model_fingerprint,
            "policy": json.dumps(policy, sort_keys=True),
            "position": position,
            "tokens_held": tokens_held,
            "tokens_seen": tokens_seen,
            "size": len(blob),
            "checksum": checksum(blob),
            "blob": blob,
        }
        with self._tx() as db:
            state_id = db["memory_states"].insert(row).last_pk
            db.execute(
                "DELETE FROM memory_states WHERE conversation_id = ? AND id != ?",
                (conversation_id, state_id),
            )
        return state_id

    def latest_memory_state(self, conversation_id: int) -> MemoryStateRecord | None:
        rows = self._read(
            "SELECT * FROM memory_states WHERE conversation_id = ? ORDER BY id DESC LIMIT 1",
            (conversation_id,),
        )
        if not rows:
            return None
        row = dict(rows[0])
        row["policy"] = json.loads(row["policy"])
        row["blob"] = bytes(row["blob"])
        return MemoryStateRecord(**row)

    def delete_memory_states(self, conversation_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM memory_states WHERE conversation_id = ?", (conversation_id,))

    def memory_state_count(self) -> int:
        return self._read("SELECT count(*) AS n FROM memory_states")[0]["n"]
