"""Drafts: the text a chat's message box held, unsent, when the user left the chat or quit.

One per chat (conversation_id None: the new chat not yet started), stored as typed. A user
message committed to a chat clears its draft in the same transaction (Store.add_message,
Store.start_conversation)."""

from __future__ import annotations

import sqlite_utils

# how long a draft save waits for another program's write lock: it runs as the user leaves a
# chat or quits, which must not wait the store's whole timeout for a cache of keystrokes
DRAFT_WAIT_SECONDS = 0.5


class DraftsMixin:
    """The store's drafts table, on its transaction and read paths."""

    def draft(self, conversation_id: int | None) -> str:
        """The chat's saved draft ("" when none)."""
        rows = self._read("SELECT text FROM drafts WHERE conversation_id IS ?",
                          (conversation_id,))
        return rows[0]["text"] if rows else ""

    def save_draft(self, conversation_id: int | None, text: str,
                   wait: float = DRAFT_WAIT_SECONDS) -> None:
        """Keep `text` as the chat's draft; an empty or blank one deletes it. Waits at most
        `wait` seconds for another program's lock (then DatabaseLockedError)."""
        with self._tx(timeout=wait) as db:
            clear_draft(db, conversation_id)
            if text.strip():  # a chat deleted meanwhile keeps none
                db.execute(
                    "INSERT INTO drafts (conversation_id, text, updated) SELECT ?, ?, ? "
                    "WHERE ? IS NULL OR EXISTS (SELECT 1 FROM conversations WHERE id = ?)",
                    (conversation_id, text, self._now(), conversation_id, conversation_id))


def clear_draft(db: sqlite_utils.Database, conversation_id: int | None) -> None:
    """Delete the chat's draft, inside the caller's transaction."""
    db.execute("DELETE FROM drafts WHERE conversation_id IS ?", (conversation_id,))
