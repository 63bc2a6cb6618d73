"""The SQLite store: conversations, messages and settings, through sqlite-utils.

One connection guarded by a lock, because the UI writes from a worker thread while the main
thread reads; WAL lets a second process (`ccm-chat list`) read while the app writes, and
opening takes no write lock unless a migration is pending. A write takes SQLite's write lock
up front (BEGIN IMMEDIATE), so nothing is ever half-written, and waits for it: short busy
timeouts retried for up to `timeout` seconds, with this store's own lock let go between tries
so that the UI thread's reads go on, then DatabaseLockedError. Chats are private: the folder
it creates is 0700 and the database files 0600. On a full disk the memory states (a cache)
give way to the transcript.

The memory states, the leases and search are mixins in their own modules
(storage/memory_states.py, storage/leases.py, storage/search.py); the records and errors are
in storage/records.py, the files on disk in storage/files.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from ccm_chat.storage.drafts import DraftsMixin, clear_draft
from ccm_chat.storage.files import database_size, private_dir, private_files
from ccm_chat.storage.leases import LeasesMixin
from ccm_chat.storage.memory_states import MemoryStatesMixin
from ccm_chat.storage.migrations import MIGRATIONS
from ccm_chat.storage.records import (
    Clock,
    ConversationRecord,
    DatabaseLockedError,
    DiskFullError,
    LeaseRecord,
    MemoryStateRecord,
    MessageRecord,
    NotFoundError,
    SearchHit,
    StorageError,
    checksum,
    conversation_record,
    message_record,
    pid_alive,
    utc_now,
)
from ccm_chat.storage.search import SearchMixin

__all__ = [
    "Clock", "ConversationRecord", "DatabaseLockedError", "DiskFullError", "LeaseRecord",
    "MemoryStateRecord", "MessageRecord", "NotFoundError", "SearchHit", "StorageError", "Store",
    "checksum", "database_size", "pid_alive", "utc_now",
]

T = TypeVar("T")
PAGE_SIZE = 16 << 10  # bytes a page of a new database holds
WAL_SIZE_LIMIT = 16 << 20  # bytes of WAL file kept after a checkpoint
# pages of WAL after which a commit checkpoints (SQLite's 1000 are 16 MB with our pages): the
# file then grows with the transcript while the disk has room, and a full disk does not
# leave committed messages in a WAL that can no longer be copied into the file
WAL_AUTOCHECKPOINT_PAGES = 64
WRITE_WAIT_SECONDS = 8.0  # how long a write waits for another program's lock
BUSY_TIMEOUT_SECONDS = 0.2  # SQLite's own wait, each try
RETRY_PAUSE_SECONDS = 0.05


def _is_lock(exc: sqlite3.Error) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "is full" in str(exc)


def _error(exc: sqlite3.Error, text: str) -> StorageError:
    """The StorageError, in words, for an SQLite error."""
    return DiskFullError(text) if _is_full(exc) else StorageError(text)


class Store(SearchMixin, MemoryStatesMixin, LeasesMixin, DraftsMixin):
    """All persistent state of the app. Every write is one transaction.

    `timeout`: seconds a write waits for another program's write lock before it gives up with
    DatabaseLockedError. `read_only`: open it for reading only (SQLite's mode=ro); nothing is
    created, and every write fails.
    """

    def __init__(self, path: Path | str, clock: Clock = utc_now,
                 timeout: float = WRITE_WAIT_SECONDS, read_only: bool = False) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._timeout = timeout
        self._read_only = read_only
        self._immutable = False
        try:
            try:
                self._open()
            except sqlite3.OperationalError:
                if read_only or not self._on_read_only_media():
                    raise
                self._read_only = self._immutable = True  # for reading, as it is
                self._open()
        except sqlite3.DatabaseError as exc:
            raise StorageError(self._explain(exc)) from exc
        except OSError as exc:
            raise StorageError(f"Cannot open the database at {self.path}: {exc}") from exc

    def _open(self) -> None:
        self.db = sqlite_utils.Database(self._connect())
        try:
            if not self._read_only:
                # a new file only (an existing one keeps its own): memory states are large
                # BLOBs, written and freed whole, and 16 KiB pages move them in a quarter of
                # the pages
                self.db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                self.db.enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            # the WAL file shrinks back after a checkpoint instead of staying at its peak
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            self._migrate()
        except BaseException:
            self.db.conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """The connection; a read-write one creates the database privately first."""
        if self._read_only:
            flags = "mode=ro&immutable=1" if self._immutable else "mode=ro"
            return sqlite3.connect(f"{self.path.absolute().as_uri()}?{flags}", uri=True,
                                   timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)
        private_dir(self.path.parent)
        private_files(self.path)
        return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, check_same_thread=False)

    def _on_read_only_media(self) -> bool:
        """Whether the database is where nothing can be written (a read-only mount, or a
        read-only file and folder) with no WAL waiting to be read: SQLite cannot make the
        -shm a WAL database needs there, and no other program can change it, so it is read
        as it is (immutable)."""
        wal = Path(f"{self.path}-wal")
        return (self.path.is_file() and not (wal.exists() and wal.stat().st_size > 0)
                and not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)))

    @property
    def writable(self) -> bool:
        """Whether a write could succeed: opened read-write, the file writable, and its folder
        too unless the -wal and -shm SQLite needs are there and writable. Asks the file
        system only (a read-only file, folder or mount, or an immutable file, says no):
        nothing is written or locked, so the app may ask at open and warn at once."""
        if self._read_only:
            return False
        logs = [Path(f"{self.path}{end}") for end in ("-wal", "-shm")]
        logs_ready = all(os.access(p, os.W_OK) for p in logs)
        return os.access(self.path, os.W_OK) and (
            logs_ready or os.access(self.path.parent, os.W_OK | os.X_OK))

    def _explain(self, exc: sqlite3.Error) -> str:
        text = str(exc)
        if _is_lock(exc):
            return (
                f"The database {self.path} is locked by another program, which kept it for "
                f"more than {self._timeout:g} s. Try again in a moment; if it stays locked, "
                "close the program that holds it (or pass --db to use another file)."
            )
        if _is_full(exc):
            return (
                f"The disk that holds {self.path} is full ({text}), so nothing of this was "
                "written. Free some space on it and try again, or pass --db to use a database "
                "on another disk."
            )
        if "readonly" in text or "read-only" in text:
            return (
                f"The database {self.path} is read-only ({text}), so nothing can be saved to "
                "it. Make the file and its folder writable, or pass --db to use another file."
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return (
                f"The database {self.path} is damaged or is not a ccm-chat database ({text}). "
                "Move it aside (nothing is deleted) and start again, or pass --db to use "
                "another file."
            )
        return f"Database error in {self.path}: {text}"

    @contextmanager
    def _tx(self, timeout: float | None = None) -> Iterator[sqlite_utils.Database]:
        """One write transaction, holding the write lock from its start (waiting for it
        `timeout` seconds, by default the store's)."""
        self._begin(timeout)  # returns holding self._lock
        try:
            yield self.db
            self.db.conn.execute("COMMIT")
        except BaseException as exc:
            if self.db.conn.in_transaction:
                self.db.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _error(exc, self._explain(exc)) from exc
            raise
        finally:
            self._lock.release()

    def _write_making_room(self, write: Callable[[sqlite_utils.Database], T]) -> T:
        """`write` in one transaction; when the disk is full, the memory states (a cache the
        transcript rebuilds) are dropped and the WAL given back, and it is tried once more,
        so a chat's words never lose their place to its cache."""
        try:
            with self._tx() as db:
                return write(db)
        except DiskFullError:
            self._make_room()
        with self._tx() as db:
            return write(db)

    def _make_room(self) -> None:
        """Free what the transcript may use: the WAL checkpointed and truncated, then every
        memory state deleted and its pages given back. Best effort.

        The delete runs with secure_delete FAST: where SQLite is built to zero freed pages
        (Debian's is), a 1.3 MB state would otherwise need 1.3 MB of WAL to be deleted.
        """
        self._checkpoint()
        with self._lock:
            was = self.db.execute("PRAGMA secure_delete").fetchone()[0]
            self.db.execute("PRAGMA secure_delete = FAST")
        try:
            with suppress(StorageError), self._tx() as db:  # no room even for this: the
                db.execute("DELETE FROM memory_states")     # retry says what is wrong
        finally:
            with self._lock:
                self.db.execute(f"PRAGMA secure_delete = {('OFF', 'ON', 'FAST')[was]}")
        self._reclaim()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it to nothing (best effort: a reader
        in another program may keep part of it)."""
        with self._lock, suppress(sqlite3.Error):
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _begin(self, timeout: float | None = None) -> None:
        """BEGIN IMMEDIATE, retried while another program writes, for up to `timeout` s."""
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        while True:
            self._lock.acquire()
            try:
                self.db.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.Error as exc:
                self._lock.release()
                if not (isinstance(exc, sqlite3.OperationalError) and _is_lock(exc)):
                    raise _error(exc, self._explain(exc)) from exc
                if time.monotonic() >= deadline:
                    raise DatabaseLockedError(self._explain(exc)) from exc
            time.sleep(RETRY_PAUSE_SECONDS)  # without the lock: reads go on meanwhile

    def _read(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return list(self.db.query(sql, params))
            except sqlite3.Error as exc:
                raise StorageError(self._explain(exc)) from exc

    # -- schema ---------------------------------------------------------------------------------

    def _applied(self) -> set[str]:
        """The migrations this database has had (none for a new file): plain reads, which
        another program's write does not block."""
        if not self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                          "AND name = '_migrations'"):
            return set()
        return {row["name"] for row in self._read("SELECT name FROM _migrations")}

    def _migrate(self) -> None:
        """Bring the schema up to date. Opening an up-to-date database takes no write lock,
        so list, search and export work while another window writes; after each migration
        the WAL is checkpointed (with 16 KiB pages SQLite's own waits for about 16 MB), so a
        new database never needs the room of all of them at once in its WAL (on a 1.2 MB disk
        that WAL took the last byte, and nothing could be written again)."""
        if {fn.__name__ for fn in MIGRATIONS} <= self._applied():
            return
        if self._read_only:
            raise StorageError(f"The database {self.path} was made by an older ccm-chat and "
                               "must be upgraded, which a read-only open cannot do. Open it "
                               "once with write access.")
        with self._tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied TEXT)"
            )
        for fn in MIGRATIONS:
            self._apply(fn)
            self._checkpoint()

    def _apply(self, fn: Callable[[sqlite_utils.Database], None]) -> None:
        """Run one migration unless it ran (in this or another process) and record it."""
        record = "INSERT OR IGNORE INTO _migrations (name, applied) VALUES (?, ?)"
        if getattr(fn, "outside_transaction", False):
            if fn.__name__ in self._applied():
                return
            with self._lock:
                fn(self.db)
            with self._tx() as db:
                db.execute(record, (fn.__name__, self._now()))
            return
        with self._tx() as db:
            if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone():
                return
            fn(db)
            db.execute(record, (fn.__name__, self._now()))

    @property
    def schema_version(self) -> int:
        return len(self._applied())

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
        row = {
            "title": title,
            "created": now,
            "updated": now,
            "model": model,
            "system_prompt": system_prompt,
            "settings": json.dumps(settings or {}),
        }
        conv_id = self._write_making_room(lambda db: db["conversations"].insert(row).last_pk)
        return self.get_conversation(conv_id)

    def get_conversation(self, conversation_id: int) -> ConversationRecord:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise NotFoundError(f"No conversation with id {conversation_id}.")
        return conversation_record(rows[0])

    def list_conversations(self, limit: int | None = None) -> list[ConversationRecord]:
        sql = "SELECT * FROM conversations ORDER BY updated DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [conversation_record(r) for r in self._read(sql)]

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
        self._reclaim()

    # -- messages -------------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        status: str = "complete",
        token_count: int | None = None,
        title: str | None = None,
        model: str | None = None,
    ) -> MessageRecord:
        """Append a message; `title` and `model`, when given, update the conversation in the
        same transaction (a first message names its chat; a reply names its model)."""
        msg_id = self._write_making_room(lambda db: self._insert_message(
            db, conversation_id, role, content, status, token_count, title=title, model=model))
        return self.get_message(msg_id)

    def start_conversation(self, title: str, model: str | None, system_prompt: str | None,
                           first_message: str) -> MessageRecord:
        """A new conversation and its first user message, in one transaction."""
        now = self._now()

        def write(db: sqlite_utils.Database) -> int:
            conv_id = db["conversations"].insert({
                "title": title, "created": now, "updated": now, "model": model,
                "system_prompt": system_prompt, "settings": "{}",
            }).last_pk
            clear_draft(db, None)  # the new chat's draft was this message
            return self._insert_message(db, conv_id, "user", first_message, "complete", None)

        return self.get_message(self._write_making_room(write))

    def _insert_message(self, db: sqlite_utils.Database, conversation_id: int, role: str,
                        content: str, status: str, token_count: int | None,
                        **conversation: str | None) -> int:
        now = self._now()
        msg_id = db["messages"].insert({
            "conversation_id": conversation_id, "role": role, "content": content,
            "created": now, "status": status, "token_count": token_count,
        }).last_pk
        changes = {k: v for k, v in conversation.items() if v is not None}
        db["conversations"].update(conversation_id, {"updated": now, **changes})
        if role == "user":
            clear_draft(db, conversation_id)  # the draft was sent
        return msg_id

    def get_message(self, message_id: int) -> MessageRecord:
        rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
        if not rows:
            raise NotFoundError(f"No message with id {message_id}.")
        return message_record(rows[0])

    def messages(self, conversation_id: int) -> list[MessageRecord]:
        rows = self._read(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
        )
        return [message_record(r) for r in rows]

    def delete_message(self, message_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def edit_message(self, message_id: int, content: str,
                     drop_later: bool = False) -> MessageRecord:
        """Replace a message's text, and with `drop_later` delete every message after it, in
        one transaction."""
        found = self.get_message(message_id)

        def write(db: sqlite_utils.Database) -> None:
            db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))
            if drop_later:
                db.execute("DELETE FROM messages WHERE conversation_id = ? AND id > ?",
                           (found.conversation_id, message_id))
            db["conversations"].update(found.conversation_id, {"updated": self._now()})

        self._write_making_room(write)
        return self.get_message(message_id)

    def message_counts(self) -> dict[int, int]:
        """Messages per conversation, in one query (for listings)."""
        rows = self._read(
            "SELECT conversation_id, count(*) AS n FROM messages GROUP BY conversation_id")
        return {r["conversation_id"]: r["n"] for r in rows}

    def transcript_signature(self, conversation_id: int) -> tuple[int, int, int]:
        """(count, last id, total length) of a transcript: it changes with any added, deleted
        or edited message, so a window can tell that another one wrote."""
        row = self._read(
            "SELECT count(*) AS n, coalesce(max(id), 0) AS last, "
            "coalesce(sum(length(content)), 0) AS size FROM messages WHERE conversation_id = ?",
            (conversation_id,),
        )[0]
        return row["n"], row["last"], row["size"]

    # -- settings -------------------------------------------------------------------------------

    def get_settings(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self._read("SELECT * FROM settings")}

    def save_settings(self, values: dict[str, Any]) -> None:
        with self._tx() as db:
            db["settings"].upsert_all(
                [{"key": k, "value": json.dumps(v)} for k, v in values.items()], pk="key"
            )
