"""The SQLite store: round trips, migrations, full-text search, damage and locks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from storage import NotFoundError, StorageError, Store
from storage.migrations import MIGRATIONS
from tests.conftest import TickingClock


def test_conversation_and_messages_round_trip(store: Store) -> None:
    conv = store.create_conversation("Trip", model="default", system_prompt="Be kind.",
                                     settings={"temperature": 0.2})
    store.add_message(conv.id, "user", "Hello ✨", token_count=3)
    store.add_message(conv.id, "assistant", "Hi!", status="interrupted")
    again = store.get_conversation(conv.id)
    assert (again.title, again.model, again.system_prompt) == ("Trip", "default", "Be kind.")
    assert again.settings == {"temperature": 0.2}
    msgs = store.messages(conv.id)
    assert [(m.role, m.content, m.status) for m in msgs] == [
        ("user", "Hello ✨", "complete"), ("assistant", "Hi!", "interrupted")]
    assert msgs[0].token_count == 3 and msgs[1].interrupted


def test_data_survives_reopening(db_path: Path) -> None:
    first = Store(db_path)
    conv = first.create_conversation("Kept")
    first.add_message(conv.id, "user", "remember me")
    first.save_settings({"temperature": 0.1})
    first.close()
    second = Store(db_path)
    assert second.messages(conv.id)[0].content == "remember me"
    assert second.get_settings() == {"temperature": 0.1}


def test_list_is_newest_first_and_follows_activity(store: Store) -> None:
    a = store.create_conversation("A")
    b = store.create_conversation("B")
    assert [c.title for c in store.list_conversations()] == ["B", "A"]
    store.add_message(a.id, "user", "bump")
    assert [c.title for c in store.list_conversations()] == ["A", "B"]
    assert store.latest_conversation().id == a.id
    assert [c.title for c in store.list_conversations(limit=1)] == ["A"]
    assert b.id != a.id


def test_rename_and_delete(store: Store) -> None:
    conv = store.create_conversation("Old")
    store.add_message(conv.id, "user", "x")
    assert store.rename_conversation(conv.id, "  New   name ").title == "New name"
    with pytest.raises(StorageError, match="empty"):
        store.rename_conversation(conv.id, "   ")
    store.delete_conversation(conv.id)
    with pytest.raises(NotFoundError):
        store.get_conversation(conv.id)
    assert store.db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert store.search("x") == []


def test_invalid_role_is_rejected_and_nothing_written(store: Store) -> None:
    conv = store.create_conversation("C")
    with pytest.raises(StorageError):
        store.add_message(conv.id, "robot", "beep")
    assert store.messages(conv.id) == []


def test_full_text_search_across_conversations(store: Store) -> None:
    a = store.create_conversation("Cooking")
    b = store.create_conversation("Travel")
    store.add_message(a.id, "user", "How long do I boil an egg?")
    store.add_message(b.id, "assistant", "Lisbon is lovely; eggs there are good too.")
    hits = store.search("egg")
    assert {h.conversation_title for h in hits} == {"Cooking", "Travel"}  # porter: eggs ~ egg
    assert any("[egg]" in h.snippet for h in hits)
    assert [h.conversation_title for h in store.search("lisbon")] == ["Travel"]
    # FTS syntax in a query is taken literally, not as an error
    assert store.search('egg" OR (') == []
    assert store.search("   ") == []


def test_search_index_follows_deletes(store: Store) -> None:
    conv = store.create_conversation("C")
    msg = store.add_message(conv.id, "user", "zebra crossing")
    assert store.search("zebra")
    store.delete_message(msg.id)
    assert store.search("zebra") == []


def test_migrations_run_once_in_order(db_path: Path) -> None:
    store = Store(db_path)
    assert store.schema_version == len(MIGRATIONS)
    names = [r["name"] for r in store.db.query("SELECT name FROM _migrations ORDER BY rowid")]
    assert names == [m.__name__ for m in MIGRATIONS]
    store.close()
    Store(db_path).close()  # reopening applies nothing twice (a second CREATE would fail)


def test_old_schema_is_upgraded_in_place(db_path: Path) -> None:
    """A database made by the first release (migration 1 only) gains search on open."""
    db = sqlite_utils.Database(db_path)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied TEXT)")
    MIGRATIONS[0](db)
    db["_migrations"].insert({"name": MIGRATIONS[0].__name__, "applied": "then"})
    db.execute(
        "INSERT INTO conversations (title, created, updated) VALUES ('Old', 't', 't')")
    db.execute(
        "INSERT INTO messages (conversation_id, role, content, created) "
        "VALUES (1, 'user', 'an old message about penguins', 't')")
    db.conn.commit()
    db.close()
    store = Store(db_path)
    assert store.schema_version == len(MIGRATIONS)
    assert [h.conversation_title for h in store.search("penguins")] == ["Old"]


def test_wal_and_foreign_keys_are_on(store: Store) -> None:
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with pytest.raises(StorageError):
        store.add_message(999, "user", "orphan")


def test_damaged_database_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StorageError, match="damaged or is not a ccm-chat database"):
        Store(path)
    assert path.read_bytes().startswith(b"this is not sqlite")  # nothing was overwritten


def test_locked_database_gives_a_clear_error(db_path: Path) -> None:
    store = Store(db_path, timeout=0.2)
    conv = store.create_conversation("C")
    other = sqlite3.connect(db_path)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StorageError, match="locked by another program"):
            store.add_message(conv.id, "user", "blocked")
    finally:
        other.rollback()
        other.close()
    store.add_message(conv.id, "user", "now it works")
    assert [m.content for m in store.messages(conv.id)] == ["now it works"]


def test_unwritable_location_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="Cannot open the database"):
        Store(blocker / "sub" / "chat.db")


def test_clock_orders_timestamps(db_path: Path) -> None:
    store = Store(db_path, clock=TickingClock())
    conv = store.create_conversation("C")
    a = store.add_message(conv.id, "user", "1")
    b = store.add_message(conv.id, "assistant", "2")
    assert a.created < b.created
    assert store.get_conversation(conv.id).updated == b.created
