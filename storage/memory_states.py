"""Memory states: a conversation's saved engine memory, a cache of its transcript (chunked
past SQLite's value limit, pruned to the latest, given way on a full disk)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from ccm_chat.storage.files import database_size
from ccm_chat.storage.records import DiskFullError, MemoryStateRecord, StorageError, checksum

# SQLite refuses a value over 1e9 bytes (SQLITE_MAX_LENGTH): a bigger memory state is saved
# in chunks of this size, the first in memory_states.blob, the rest in memory_state_chunks
STATE_CHUNK = 256 << 20
# bytes of disk a memory state must leave free: the transcript's room, which a cache never takes
STATE_HEADROOM = 4 << 20


def free_space(folder: Path) -> int:
    """Bytes free on the disk that holds `folder` (for this user)."""
    return shutil.disk_usage(folder).free


class MemoryStatesMixin:
    """The store's memory-state tables, on its transaction and read paths."""

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
    ) -> int | None:
        """Store a new state and prune the older ones, in one transaction; its id, or None
        when the disk had no room for it.

        Until that transaction commits, the previous state is still the one on disk. A state
        is a cache of the transcript, so one the disk cannot take with room to spare (see
        free_space) is not written, and one a full disk refuses is dropped quietly (the WAL
        it grew is given back) rather than fail the chat: the memory is rebuilt from the
        transcript when needed (and the caller may say why: None).
        """
        if not self._room_for_state(len(blob)):
            return None
        view = memoryview(blob)  # the chunks are slices of it, not copies
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
            "blob": view[:STATE_CHUNK],
        }
        try:
            with self._tx() as db:
                state_id = db["memory_states"].insert(row).last_pk
                for seq, start in enumerate(range(STATE_CHUNK, len(blob), STATE_CHUNK), 1):
                    db.execute("INSERT INTO memory_state_chunks VALUES (?, ?, ?)",
                               (state_id, seq, view[start:start + STATE_CHUNK]))
                db.execute(
                    "DELETE FROM memory_states WHERE conversation_id = ? AND id != ?",
                    (conversation_id, state_id),
                )
        except DiskFullError:
            self._reclaim()
            return None
        self._reclaim(keep=len(blob))
        return state_id

    def _room_for_state(self, size: int) -> bool:
        """Whether the disk takes a state of `size` bytes and keeps STATE_HEADROOM free: it is
        written to the WAL, then copied into the file (which grows by what its free pages
        cannot hold). Once a committed state is in a WAL that a full disk keeps from being
        checkpointed, not even a delete can be written: the transcript is stuck."""
        try:
            free_disk = free_space(self.path.parent)
            with self._lock:
                page = self.db.execute("PRAGMA page_size").fetchone()[0]
                free_pages = self.db.execute("PRAGMA freelist_count").fetchone()[0] * page
        except (OSError, sqlite3.Error):
            return True  # unknown: SQLite says if it does not fit
        return free_disk >= size + max(0, size - free_pages) + STATE_HEADROOM

    def latest_memory_state(self, conversation_id: int) -> MemoryStateRecord | None:
        rows = self._read(
            "SELECT * FROM memory_states WHERE conversation_id = ? ORDER BY id DESC LIMIT 1",
            (conversation_id,),
        )
        if not rows:
            return None
        row = dict(rows[0])
        row["policy"] = json.loads(row["policy"])
        rest = self._read("SELECT data FROM memory_state_chunks WHERE state_id = ? ORDER BY seq",
                          (row["id"],))
        row["blob"] = b"".join([bytes(row["blob"]), *(bytes(r["data"]) for r in rest)])
        return MemoryStateRecord(**row)

    def delete_memory_states(self, conversation_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM memory_states WHERE conversation_id = ?", (conversation_id,))
        self._reclaim()

    def _reclaim(self, keep: int = 0) -> None:
        """Give the pages of deleted rows back to the file system (auto_vacuum=INCREMENTAL),
        all but `keep` bytes of them.

        The memory states are the big rows, and each save prunes the one before: without
        this the file keeps its largest size forever. A save keeps as many free pages as the
        state it wrote: the chat's next state, about as big, fills them, where giving them
        back first moved the new state's pages down and grew the file again at the next
        save (a 140 MB state, dev CPU: 0.6-0.7 s of a 2.3 s save). Best effort: a busy
        database is left for the next save.
        """
        with self._lock:
            try:
                page = self.db.execute("PRAGMA page_size").fetchone()[0]
                free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
                excess = free - keep // page
                if excess > 0:  # executescript steps it to the end (execute() frees one page)
                    self.db.conn.executescript(f"PRAGMA incremental_vacuum({excess});")
            except sqlite3.Error:
                pass
            self._checkpoint()

    def size_on_disk(self) -> tuple[int, int]:
        """(bytes the database files take, bytes of free pages in them)."""
        with self._lock:
            try:
                page = self.db.execute("PRAGMA page_size").fetchone()[0]
                free = self.db.execute("PRAGMA freelist_count").fetchone()[0] * page
            except sqlite3.Error as exc:
                raise StorageError(self._explain(exc)) from exc
        return database_size(self.path), free

    def memory_state_count(self) -> int:
        return self._read("SELECT count(*) AS n FROM memory_states")[0]["n"]
