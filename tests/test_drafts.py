"""Drafts (issue 26): text typed in the message box and not sent is kept per chat in the
database, through Ctrl+Q and a switch to another chat, restored as typed, dropped when it is
sent; a database that refuses it never keeps the app from quitting. The real Textual app on
the scripted engine and a real SQLite file."""

from __future__ import annotations

import stat
import time
from pathlib import Path

from ccm_chat.storage import Store
from ccm_chat.storage.migrations import MIGRATIONS
from tests.helpers import SIZE, locked, make_app, notes, send, until, until_idle, until_quit
from tests.scripted_engine import ScriptedEngine

MARKUP_LIKE = " [b]not bold[/b] [@click=app.quit]x[/]"


async def type_in(pilot, words: str, raw: str = "") -> None:
    """Type `words` key by key, then put `raw` in as a paste would (brackets and all)."""
    app = pilot.app
    app.pane.prompt.focus()
    await pilot.press(*words)
    if raw:
        app.pane.prompt.insert(raw)
    await pilot.pause()


# -- the store ------------------------------------------------------------------------------------


def test_the_drafts_migration_runs_and_the_database_stays_private(db_path: Path) -> None:
    store = Store(db_path)
    assert MIGRATIONS[-1].__name__ == "m008_drafts"
    assert store.schema_version == len(MIGRATIONS)
    assert "drafts" in store.db.table_names()
    conv = store.create_conversation("Chat")
    store.save_draft(conv.id, "half a thought")
    for path in (db_path, Path(f"{db_path}-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    store.close()
    Store(db_path).close()  # reopening applies nothing twice


def test_a_draft_per_chat_is_kept_replaced_cleared_and_goes_with_its_chat(store: Store) -> None:
    a, b = store.create_conversation("A"), store.create_conversation("B")
    store.save_draft(a.id, "for a" + MARKUP_LIKE)
    store.save_draft(b.id, "for b")
    store.save_draft(None, "for a new chat")
    assert store.draft(a.id) == "for a" + MARKUP_LIKE  # as typed
    assert (store.draft(b.id), store.draft(None)) == ("for b", "for a new chat")
    store.save_draft(a.id, "for a, again")
    assert store.draft(a.id) == "for a, again"
    store.save_draft(a.id, "   ")  # a blank box keeps nothing
    assert store.draft(a.id) == ""
    store.add_message(b.id, "user", "for b")  # sent: the draft went with it
    assert store.draft(b.id) == ""
    store.start_conversation("New", None, None, "for a new chat")
    assert store.draft(None) == ""
    store.save_draft(a.id, "doomed")
    store.delete_conversation(a.id)
    store.save_draft(a.id, "to a chat deleted meanwhile")  # kept nowhere, no error
    assert store.db.execute("SELECT count(*) FROM drafts").fetchone()[0] == 0


def test_a_draft_save_waits_only_briefly_for_a_lock(store: Store, db_path: Path) -> None:
    conv = store.create_conversation("Chat")
    start = time.monotonic()
    with locked(db_path):
        try:
            store.save_draft(conv.id, "text", wait=0.2)
        except Exception as exc:  # noqa: BLE001 - the kind is checked below
            assert "locked" in str(exc)
        else:
            raise AssertionError("a locked database took the draft")
    assert time.monotonic() - start < 3


# -- the app --------------------------------------------------------------------------------------


async def test_text_typed_in_a_new_chat_comes_back_after_ctrl_q(db_path: Path,
                                                                  store: Store) -> None:
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "half a thought", MARKUP_LIKE)
        await pilot.press("ctrl+q")
        await until_quit(pilot)
    second = Store(db_path)  # another run of the app on the same database
    try:
        again = make_app(second, ScriptedEngine())
        async with again.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: again.pane.prompt.text == "half a thought" + MARKUP_LIKE)
            assert again.is_running  # the brackets were text, not an action
    finally:
        second.close()


async def test_text_typed_in_a_chat_comes_back_when_it_is_opened_again(
        db_path: Path, store: Store) -> None:
    a = store.create_conversation("Alpha")
    store.add_message(a.id, "user", "about alpha")
    app = make_app(store, ScriptedEngine(), conversation_id=a.id)
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "unsent")
        await pilot.press("ctrl+q")
        await until_quit(pilot)
    assert store.draft(a.id) == "unsent"
    again = make_app(store, ScriptedEngine(), resume_last=True)
    async with again.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: again.pane.prompt.text == "unsent")


async def test_the_draft_stays_with_its_chat_across_a_switch(store: Store) -> None:
    a = store.create_conversation("Alpha")
    store.add_message(a.id, "user", "about alpha")
    b = store.create_conversation("Beta")
    store.add_message(b.id, "user", "about beta")
    app = make_app(store, ScriptedEngine(), conversation_id=a.id)
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "for alpha")
        await app.open_conversation(b.id)
        await pilot.pause()
        assert app.pane.prompt.text == ""  # Beta's box is Beta's
        assert store.draft(a.id) == "for alpha"
        await type_in(pilot, "for beta")
        await app.open_conversation(a.id)
        await until(pilot, lambda: app.pane.prompt.text == "for alpha")
        await app.open_conversation(b.id)
        await until(pilot, lambda: app.pane.prompt.text == "for beta")


async def test_sending_the_draft_clears_it(store: Store) -> None:
    a = store.create_conversation("Alpha")
    store.add_message(a.id, "user", "about alpha")
    store.add_message(a.id, "assistant", "noted")
    store.save_draft(a.id, "kept")
    app = make_app(store, ScriptedEngine(), conversation_id=a.id)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.pane.prompt.text == "kept")
        app.pane.prompt.focus()
        await pilot.press("enter")
        await until_idle(pilot)
        await until(pilot, lambda: store.messages(a.id)[-1].role == "assistant"
                    and store.messages(a.id)[-2].content == "kept")
        assert store.draft(a.id) == ""
        await send(pilot, "more")  # a second send, typed afresh, leaves nothing either
        await until_idle(pilot)
        await pilot.press("ctrl+q")
        await until_quit(pilot)
    assert store.draft(a.id) == ""


async def test_a_locked_database_at_quit_still_quits(db_path: Path, store: Store) -> None:
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "not kept")
        with locked(db_path):
            start = time.monotonic()
            await pilot.press("ctrl+q")
            await until_quit(pilot, timeout=10)
            assert time.monotonic() - start < 5
    assert store.draft(None) == ""  # the lock kept it out; nothing crashed


async def test_a_locked_database_at_a_switch_says_so_and_the_app_goes_on(
        db_path: Path, store: Store) -> None:
    a = store.create_conversation("Alpha")
    store.add_message(a.id, "user", "about alpha")
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await type_in(pilot, "typed")
        with locked(db_path):
            await app.open_conversation(a.id)
            await pilot.pause()
        assert app.current_id == a.id
        assert any("not kept" in n for n in notes(app))
