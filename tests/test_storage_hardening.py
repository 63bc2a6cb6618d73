"""The store under hostile conditions (issue 26): private files, a full disk, another program
writing, a read-only database, and a window that died holding a chat."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccm_chat.storage import StorageError, Store
from tests.conftest import TickingClock


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, so that 'private' is the store's doing, not the test runner's."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_database_and_its_folder_are_private(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "data" / "ccm-chat" / "ccm-chat.db"
    before = mode(tmp_path)
    store = Store(path)
    store.add_message(store.create_conversation("Diary").id, "user", "a secret")
    assert mode(tmp_path / "data") == mode(path.parent) == 0o700
    for name in ("ccm-chat.db", "ccm-chat.db-wal", "ccm-chat.db-shm"):
        assert mode(path.parent / name) == 0o600, name
    store.close()
    assert mode(tmp_path) == before  # a folder that existed (a home, say) is left alone


def test_an_old_world_readable_database_is_made_private(tmp_path: Path,
                                                        umask_022: None) -> None:
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # as ccm-chat before issue 26 left it: 0644
    assert mode(path) == 0o644
    store = Store(path)
    store.create_conversation("Kept")
    assert mode(path) == mode(Path(f"{path}-wal")) == 0o600
    store.close()


def fill_to_the_limit(store: Store, room_pages: int) -> int:
    """Let the database grow by only `room_pages` pages from now on (SQLite's own limit: a
    write past it fails with SQLITE_FULL, 'database or disk is full', as on a full disk)."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    return store.db.execute(f"PRAGMA max_page_count = {pages + room_pages}").fetchone()[0]


def save_state(store: Store, conversation_id: int, size: int) -> int | None:
    return store.save_memory_state(
        conversation_id, None, os.urandom(size), backend="llamacpp", model_fingerprint="m",
        policy={"level": "off"}, position=1, tokens_held=1, tokens_seen=1)


def test_a_full_disk_drops_memory_states_before_refusing_a_message(db_path: Path) -> None:
    """The audit's case: one 1.3 MB memory state filled a small disk, then every message was
    refused. The state is a cache: it gives way, and the message and the reply are kept."""
    store = Store(db_path, clock=TickingClock())
    conv = store.create_conversation("Small disk")
    store.add_message(conv.id, "user", "hello")
    secure = store.db.execute("PRAGMA secure_delete").fetchone()[0]
    page = store.db.execute("PRAGMA page_size").fetchone()[0]
    fill_to_the_limit(store, room_pages=(1_500_000 // page))
    assert save_state(store, conv.id, 1_300_000) is not None  # fits, and fills the disk
    assert store.memory_state_count() == 1
    long_message = "words " * 60_000  # 360 KB: more than the room the state left
    store.add_message(conv.id, "user", long_message)
    store.add_message(conv.id, "assistant", "a reply, kept too")
    assert [m.content for m in store.messages(conv.id)][1:] == [
        long_message, "a reply, kept too"]
    assert store.memory_state_count() == 0  # the cache made room: rebuilt from the transcript
    assert store.db.execute("PRAGMA secure_delete").fetchone()[0] == secure  # as it was


def test_a_memory_state_without_room_is_dropped_quietly(db_path: Path) -> None:
    store = Store(db_path, clock=TickingClock())
    conv = store.create_conversation("Small disk")
    store.add_message(conv.id, "user", "hello")
    fill_to_the_limit(store, room_pages=20)
    assert save_state(store, conv.id, 2_000_000) is None  # not saved, and no error
    assert store.memory_state_count() == 0
    store.add_message(conv.id, "assistant", "the chat goes on")
    assert [m.content for m in store.messages(conv.id)] == ["hello", "the chat goes on"]


def test_a_full_disk_with_nothing_to_drop_refuses_in_words(db_path: Path) -> None:
    store = Store(db_path, clock=TickingClock())
    conv = store.create_conversation("Full")
    fill_to_the_limit(store, room_pages=2)
    with pytest.raises(StorageError, match="disk that holds .* is full.*Free some space"):
        store.add_message(conv.id, "user", "x" * 500_000)
    assert store.messages(conv.id) == []  # nothing half-written


def test_migrations_leave_no_wal_behind(db_path: Path) -> None:
    """A new database's migrations are checkpointed: with 16 KiB pages SQLite's own
    checkpoint waits for about 16 MB of WAL, and the audit found 1.18 MB of it left on a
    nearly full disk."""
    store = Store(db_path)
    assert Path(f"{db_path}-wal").stat().st_size == 0
    store.close()


def test_a_new_databases_wal_never_holds_more_than_one_migration(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit case 40 (re-run): all the migrations in one WAL took 950 KB, the last byte of a
    1.2 MB disk, and its checkpoint then had no room to write: the database was stuck for
    good. Each migration is checkpointed, so the WAL is empty before the next one starts."""
    wal = Path(f"{db_path}-wal")
    seen: list[int] = []
    apply = Store._apply
    monkeypatch.setattr(Store, "_apply", lambda self, fn: (
        seen.append(wal.stat().st_size if wal.exists() else 0), apply(self, fn))[1])
    Store(db_path).close()
    assert len(seen) > 3 and max(seen[1:]) == 0, seen


def test_opening_and_reading_go_on_while_another_program_writes(db_path: Path) -> None:
    """`list`, `search` and `export` open the store while the app (another process) writes:
    opening an up-to-date database takes no write lock, so they need not wait for it."""
    first = Store(db_path)
    first.add_message(first.create_conversation("Paris trip").id, "user", "museums in paris")
    first.close()
    other = sqlite3.connect(db_path, isolation_level=None)  # another ccm-chat, mid-write
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO settings VALUES ('theme', '\"dark\"')")
    try:
        started = time.monotonic()
        store = Store(db_path)
        assert [c.title for c in store.list_conversations()] == ["Paris trip"]
        assert [h.conversation_title for h in store.search("paris")] == ["Paris trip"]
        assert time.monotonic() - started < 2.0  # not the 8 s a write would wait
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.close()


def try_write(store: Store) -> bool:
    try:
        store.create_conversation("probe")
    except StorageError as exc:
        assert "read-only" in str(exc)
        return False
    return True


def test_writable_says_what_a_write_would_find(tmp_path: Path) -> None:
    """A 0444 file in a 0555 folder: `writable` tells it at open, without writing. As root the
    modes do not stop a write, and `writable` says so too; either way it matches the write."""
    folder = tmp_path / "ro"
    path = folder / "chat.db"
    holder = Store(path)  # keeps the -wal and -shm there, as a running app does
    holder.create_conversation("Kept")
    assert holder.writable
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        store = Store(path)
        said = store.writable
        assert said == os.access(path, os.W_OK)
        assert said == try_write(store)
        store.close()
    finally:
        folder.chmod(0o755)
        path.chmod(0o600)
        holder.close()


def test_a_read_only_store_says_so_and_still_reads(db_path: Path) -> None:
    """SQLite's mode=ro: refused writes even for root; `writable` knows before any write."""
    Store(db_path).create_conversation("Kept")
    store = Store(db_path, read_only=True)
    assert not store.writable
    assert [c.title for c in store.list_conversations()] == ["Kept"]
    with pytest.raises(StorageError, match="read-only.*Make the file and its folder writable"):
        store.create_conversation("refused")
    store.close()


HOLD = """
import sys
from ccm_chat.storage import Store
store = Store(sys.argv[1])
assert store.acquire_lease(int(sys.argv[2]), "the other window", stale_after=60) is None
print("held", flush=True)
sys.stdin.read()
"""


def test_a_lease_whose_process_is_gone_is_free(db_path: Path) -> None:
    """The window that held a chat was killed: its lease is free as soon as its process is
    gone (exited and waiting to be reaped, or reaped), not after a manual take-over."""
    store = Store(db_path)  # the real clock: the other process stamps real time
    conv = store.create_conversation("Shared")
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(db_path), str(conv.id)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        assert store.live_lease(conv.id, stale_after=60).pid == other.pid  # alive: held
        assert store.acquire_lease(conv.id, "this window", stale_after=60) is not None
        other.stdin.close()
        os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
        assert store.live_lease(conv.id, stale_after=60) is None
    finally:
        other.kill()
        other.wait()
    assert store.live_lease(conv.id, stale_after=60) is None  # reaped: gone for good
    assert store.acquire_lease(conv.id, "this window", stale_after=60) is None
    assert store.lease(conv.id).owner == "this window"
    store.close()
