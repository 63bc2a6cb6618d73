"""The SQLite store: round trips, migrations, full-text search, damage and locks."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlite_utils

from ccm_chat.storage import DatabaseLockedError, NotFoundError, StorageError, Store, database_size
from ccm_chat.storage.migrations import MIGRATIONS
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
    # the file was rewritten once so that pruned pages can be given back from now on
    assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


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


def test_a_write_waits_out_a_lock_then_gives_up(db_path: Path) -> None:
    store = Store(db_path, timeout=1.0)
    conv = store.create_conversation("C")
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    start = time.perf_counter()
    with pytest.raises(DatabaseLockedError, match="locked by another program.* 1 s"):
        store.add_message(conv.id, "user", "blocked")
    assert 1.0 <= time.perf_counter() - start < 3.0
    threading.Timer(0.4, lambda: other.execute("ROLLBACK")).start()
    store.add_message(conv.id, "user", "waited for it")  # the lock ends within the wait
    other.close()
    assert [m.content for m in store.messages(conv.id)] == ["waited for it"]
    store.close()


def test_reads_go_on_while_a_write_waits_for_a_lock(db_path: Path) -> None:
    """The UI thread reads while a worker's write waits: the window must not freeze."""
    store = Store(db_path, timeout=2.0)
    conv = store.create_conversation("C")
    store.add_message(conv.id, "user", "already here")
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    writer = threading.Thread(target=lambda: store.add_message(conv.id, "user", "later"))
    writer.start()
    time.sleep(0.3)  # the write is waiting now
    start = time.perf_counter()
    assert [m.content for m in store.messages(conv.id)] == ["already here"]
    assert store.list_conversations()[0].id == conv.id
    assert time.perf_counter() - start < 0.5
    other.execute("ROLLBACK")
    writer.join(5)
    other.close()
    assert [m.content for m in store.messages(conv.id)] == ["already here", "later"]
    store.close()


def test_a_new_conversation_and_its_first_message_are_one_write(db_path: Path) -> None:
    store = Store(db_path, timeout=0.1)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(DatabaseLockedError):
        store.start_conversation("T", "m", None, "first")
    other.execute("ROLLBACK")
    assert store.list_conversations() == []
    first = store.start_conversation("T", "m", "Be brief.", "first")
    conv = store.get_conversation(first.conversation_id)
    assert (conv.title, conv.model, conv.system_prompt) == ("T", "m", "Be brief.")
    assert [m.content for m in store.messages(conv.id)] == ["first"]
    with pytest.raises(StorageError):  # a message that cannot be stored takes its chat along
        store.start_conversation("T2", "m", None, None)  # type: ignore[arg-type]
    assert [c.title for c in store.list_conversations()] == ["T"]
    store.close()


def test_edit_message_can_drop_what_follows(store: Store) -> None:
    conv = store.create_conversation("C")
    ids = [store.add_message(conv.id, r, t).id for r, t in
           [("user", "one"), ("assistant", "uno"), ("user", "two"), ("assistant", "dos")]]
    store.edit_message(ids[1], "UNO")
    assert [m.content for m in store.messages(conv.id)] == ["one", "UNO", "two", "dos"]
    store.edit_message(ids[0], "ONE", drop_later=True)
    assert [m.content for m in store.messages(conv.id)] == ["ONE"]
    assert store.search("dos") == [] and store.search("ONE")[0].message_id == ids[0]
    assert store.message_counts() == {conv.id: 1}
    before = store.transcript_signature(conv.id)
    store.edit_message(ids[0], "ONE!")
    assert store.transcript_signature(conv.id) != before


def test_search_takes_any_text_literally(store: Store) -> None:
    conv = store.create_conversation("Code")
    store.add_message(conv.id, "user", "How do I learn C++ quickly?")
    store.add_message(conv.id, "assistant", "Start with C, then classes.")
    store.add_message(conv.id, "user", 'He said "AND OR" twice')
    assert [h.snippet for h in store.search("c++")] == ["How do I learn [C]++ quickly?"]
    hits = store.search('AND OR "')
    assert [h.role for h in hits] == ["user"] and "[AND]" in hits[0].snippet
    assert [h.snippet for h in store.search('"')] == ['He said ["]AND OR" twice']
    for query in ("*", "NEAR(", "-", "a:b", "^", "()", "'", 'egg" OR ('):
        assert store.search(query) == []


def test_pruned_memory_states_give_their_space_back(db_path: Path) -> None:
    """Saves of growing memories, then small ones: the file follows the live data down,
    keeping free only as many pages as the last state took (the next save fills them)."""
    store = Store(db_path)
    convs = [store.create_conversation(f"C{i}") for i in range(3)]
    for i in range(30):
        conv = convs[i % 3]
        msg = store.add_message(conv.id, "user", f"message {i}")
        size = (100 + 60 * i) << 10
        store.save_memory_state(conv.id, msg.id, os.urandom(size),
                                backend="llamacpp", model_fingerprint="x", policy={},
                                position=i, tokens_held=i, tokens_seen=i)
        held = sum(s.size for s in map(store.latest_memory_state, (c.id for c in convs)) if s)
        assert store.size_on_disk()[1] <= size
        assert database_size(db_path) < held * 1.05 + size + (512 << 10)
    for conv in convs:
        msg = store.add_message(conv.id, "user", "small")
        store.save_memory_state(conv.id, msg.id, b"x" * 1000, backend="llamacpp",
                                model_fingerprint="x", policy={}, position=1,
                                tokens_held=1, tokens_seen=1)
    on_disk, free = store.size_on_disk()
    assert free < 16 << 10  # the small states keep no more than a page of theirs free
    assert db_path.stat().st_size < 1 << 20  # the main file holds only what is live
    store.close()
    assert database_size(db_path) < 1 << 20  # and the WAL is gone with the last connection
    assert on_disk < held


def test_a_chats_next_state_fills_the_pages_its_last_one_left(db_path: Path) -> None:
    """Saves of about the same size (one chat, turn after turn) reuse the pages the pruned
    state freed: the file stops growing at two states, and a new database has big pages."""
    store = Store(db_path)
    assert store.db.execute("PRAGMA page_size").fetchone()[0] == 16 << 10
    conv = store.create_conversation("Steady")
    sizes = []
    for i in range(6):
        msg = store.add_message(conv.id, "user", f"turn {i}")
        store.save_memory_state(conv.id, msg.id, os.urandom(3 << 20), backend="llamacpp",
                                model_fingerprint="x", policy={}, position=i, tokens_held=i,
                                tokens_seen=i)
        sizes.append(db_path.stat().st_size)
        if i:  # the pruned state's pages wait, free, for the next save
            assert store.size_on_disk()[1] > (3 << 20) - (64 << 10)
    assert sizes[2:] == [sizes[2]] * 4 and sizes[2] < 2 * (3 << 20) + (1 << 20)
    assert store.latest_memory_state(conv.id).intact
    store.close()


def test_a_state_bigger_than_one_sqlite_value_is_saved_in_chunks(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8B model's uncompressed KV passes SQLite's 1e9-byte value limit past ~7k tokens:
    such a state is split into chunks (made small here), read back whole, pruned whole."""
    import ccm_chat.storage.memory_states as memory_states

    monkeypatch.setattr(memory_states, "STATE_CHUNK", 1000)
    store = Store(db_path)
    conv = store.create_conversation("Big")
    msg = store.add_message(conv.id, "user", "hi")
    blob = os.urandom(4321)

    def save(data: bytes) -> int:
        return store.save_memory_state(conv.id, msg.id, data, backend="llamacpp",
                                       model_fingerprint="x", policy={}, position=1,
                                       tokens_held=1, tokens_seen=1)

    def chunks() -> int:
        with sqlite3.connect(db_path) as db:
            return db.execute("SELECT count(*) FROM memory_state_chunks").fetchone()[0]

    save(blob)
    assert chunks() == 4  # 1,000 bytes in the row, 4 more chunks
    state = store.latest_memory_state(conv.id)
    assert state.blob == blob and state.intact
    save(b"small")  # replacing it drops its chunks too
    assert chunks() == 0
    assert store.latest_memory_state(conv.id).blob == b"small"
    save(blob)
    store.delete_conversation(conv.id)
    assert chunks() == 0


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def test_leases_hold_until_released_stale_or_forced(db_path: Path) -> None:
    clock = Clock()
    store = Store(db_path, clock=clock)
    conv = store.create_conversation("C")
    assert store.acquire_lease(conv.id, "a", stale_after=60) is None
    assert store.acquire_lease(conv.id, "a", stale_after=60) is None  # again: still ours
    held = store.acquire_lease(conv.id, "b", stale_after=60)
    assert held.owner == "a" and held.pid == os.getpid()
    assert held.describe() == f"ccm-chat process {os.getpid()}, since 12:00 UTC"
    clock.now += timedelta(seconds=50)
    store.heartbeat("a")
    clock.now += timedelta(seconds=50)
    assert store.acquire_lease(conv.id, "b", stale_after=60).owner == "a"  # beat 50 s ago
    clock.now += timedelta(seconds=20)
    assert store.acquire_lease(conv.id, "b", stale_after=60) is None  # 70 s: stale
    assert store.lease(conv.id).owner == "b"
    assert store.acquire_lease(conv.id, "a", stale_after=60, force=True) is None
    store.release_lease(conv.id, "b")  # not b's any more: nothing happens
    assert store.lease(conv.id).owner == "a"
    store.release_leases("a")
    assert store.lease(conv.id) is None
    store.acquire_lease(conv.id, "a", stale_after=60)
    store.delete_conversation(conv.id)
    assert store.db.execute("SELECT count(*) FROM leases").fetchone()[0] == 0


def test_a_lease_on_another_host_lives_by_its_heartbeat(db_path: Path) -> None:
    clock = Clock()
    store = Store(db_path, clock=clock)
    conv = store.create_conversation("C")
    store.db.execute("INSERT INTO leases VALUES (?, 'far', 1, 'elsewhere', ?, ?)",
                     (conv.id, clock.now.isoformat(), clock.now.isoformat()))
    store.db.conn.commit()
    held = store.acquire_lease(conv.id, "near", stale_after=60)
    assert held.host == "elsewhere" != socket.gethostname()
    assert "on elsewhere" in held.describe()
    clock.now += timedelta(seconds=61)
    assert store.acquire_lease(conv.id, "near", stale_after=60) is None
