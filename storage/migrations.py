"""Numbered schema migrations: each runs once, in order, inside the transaction that records it."""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            model TEXT,
            system_prompt TEXT,
            settings TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL
                REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete'
                CHECK (status IN ('complete', 'interrupted')),
            token_count INTEGER
        )
        """
    )
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id, id)")
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migration
def m002_message_search(db: sqlite_utils.Database) -> None:
    db["messages"].enable_fts(["content"], create_triggers=True, tokenize="porter")


@migration
def m003_conversation_order(db: sqlite_utils.Database) -> None:
    db.execute("CREATE INDEX conversations_by_updated ON conversations(updated DESC, id DESC)")


@migration
def m004_memory_states(db: sqlite_utils.Database) -> None:
    """Saved conversation memories: a cache of the transcript, rebuilt when it does not fit."""
    db.execute(
        """
        CREATE TABLE memory_states (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL
                REFERENCES conversations(id) ON DELETE CASCADE,
            message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            created TEXT NOT NULL,
            backend TEXT NOT NULL,
            model_fingerprint TEXT NOT NULL,
            policy TEXT NOT NULL,
            position INTEGER NOT NULL,
            tokens_held INTEGER NOT NULL,
            tokens_seen INTEGER NOT NULL,
            size INTEGER NOT NULL,
            checksum TEXT NOT NULL,
            blob BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX memory_states_by_conversation ON memory_states(conversation_id, id)")


@migration
def m005_conversation_leases(db: sqlite_utils.Database) -> None:
    """Which window writes a conversation: one owner at a time, stale when its process is gone
    or its heartbeat is old (see Store.acquire_lease)."""
    db.execute(
        """
        CREATE TABLE leases (
            conversation_id INTEGER PRIMARY KEY
                REFERENCES conversations(id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            pid INTEGER NOT NULL,
            host TEXT NOT NULL,
            acquired TEXT NOT NULL,
            heartbeat TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX leases_by_owner ON leases(owner)")


def outside_transaction(fn: Migration) -> Migration:
    """Mark a migration that SQLite cannot run inside a transaction (VACUUM)."""
    fn.outside_transaction = True  # type: ignore[attr-defined]
    return fn


@migration
@outside_transaction
def m006_incremental_vacuum(db: sqlite_utils.Database) -> None:
    """Let pruned memory states give their pages back (Store.save_memory_state reclaims them).

    auto_vacuum only takes effect on an existing database after one VACUUM, which rewrites
    the file once; it is idempotent, so a crash before this migration is recorded is harmless.
    """
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("VACUUM")


@migration
def m007_memory_state_chunks(db: sqlite_utils.Database) -> None:
    """The rest of a memory state too big for one SQLite value (over 1e9 bytes, e.g. an 8B
    model's uncompressed KV past ~7k tokens): memory_states.blob holds its first chunk."""
    db.execute(
        """
        CREATE TABLE memory_state_chunks (
            state_id INTEGER NOT NULL REFERENCES memory_states(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (state_id, seq)
        )
        """
    )


@migration
def m008_drafts(db: sqlite_utils.Database) -> None:
    """What the user typed in a chat's message box and did not send (Store.save_draft): one
    row per chat, conversation_id NULL for the new chat not yet started."""
    db.execute(
        """
        CREATE TABLE drafts (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER UNIQUE
                REFERENCES conversations(id) ON DELETE CASCADE,
            text TEXT NOT NULL,
            updated TEXT NOT NULL
        )
        """
    )
