"""What a real trial of the UI broke (issue 14), driven through the pilot on the scripted engine
and a real SQLite file: lost messages, a missing model, long chats, stale notices, focus and
small screens, export, the action table, and a UI that imports only from app/."""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from textual.widgets import Button, Input, ListView, TextArea

from ccm_chat.app.service import ChatService, Status
from ccm_chat.engine import ModelError
from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from ccm_chat.ui.screens.confirm import ConfirmScreen
from ccm_chat.ui.screens.edit_message import EditMessageScreen
from ccm_chat.ui.screens.export import ExportScreen
from ccm_chat.ui.screens.help import HelpScreen
from ccm_chat.ui.screens.settings import SettingsScreen
from ccm_chat.ui.widgets.chat_view import ChatView, MessageBox
from ccm_chat.ui.widgets.prompt_input import PromptInput
from ccm_chat.ui.widgets.status_bar import format_status
from tests.helpers import (
    SIZE,
    TickingClock,
    boxes,
    locked,
    make_app,
    notes,
    scripted_factory,
    send,
    settled,
    until,
    until_idle,
)
from tests.scripted_engine import ScriptedConversation, ScriptedEngine

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
PAGE = 40  # ui.widgets.chat_view.PAGE: the messages a chat opens with


def fill(store: Store, n: int, words: int = 3) -> int:
    conv = store.create_conversation("Long chat")
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        store.add_message(conv.id, role, f"message {i} " + "word " * words)
    return conv.id


def titles_of(app: ChatApp) -> list[str]:
    return [n.title for n in app._notifications]


def visible_line(widget) -> str:
    return "".join(seg.text for seg in widget.render_line(0))


# -- issue 11 step 5: the UI talks only to app ---------------------------------------------------


def test_ui_imports_nothing_from_engine_or_storage() -> None:
    offenders = []
    for path in UI_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.removeprefix("ccm_chat.").split(".")[0] in ("engine", "storage")
                          or n.startswith("textual.widgets._")]
    assert offenders == []


async def test_one_action_table_drives_keys_palette_and_help(store: Store, scripted) -> None:
    from ccm_chat.ui.actions import ACTIONS

    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        keyed = {a.id: a.key for a in ACTIONS if a.key}
        bound = {b.id: b.key for b in app.BINDINGS}
        assert bound == keyed
        palette = {c.title for c in app.get_system_commands(app.screen)}
        assert {a.title for a in ACTIONS if a.palette} <= palette
        await pilot.press("f1")
        rows = {title: key for key, title, _ in app.screen.rows}
        assert {a.title: a.key or "palette" for a in ACTIONS} == {
            t: rows[t] for t in (a.title for a in ACTIONS)}


# -- 2: nothing typed is lost, no traceback -----------------------------------------------------


@pytest.mark.parametrize("existing", [True, False], ids=["open-chat", "new-chat"])
async def test_a_locked_database_keeps_the_message_in_the_box(db_path: Path,
                                                              existing: bool) -> None:
    store = Store(db_path, clock=TickingClock(), timeout=0.2)
    before = []
    if existing:
        conv = store.create_conversation("Existing")
        store.add_message(conv.id, "user", "first")
        store.add_message(conv.id, "assistant", "You said: first")
        before = [("user", "first"), ("assistant", "You said: first")]
    app = make_app(store, ScriptedEngine(), resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "Scripted" in str(app.status_bar.render()))
        await app.workers.wait_for_complete()
        with locked(db_path):
            app.query_one(PromptInput).focus()
            await pilot.press(*"keep me", "enter")
            await until_idle(pilot)
            await until(pilot, lambda: "Not saved" in titles_of(app), 30)
        assert app.is_running
        assert app.query_one(PromptInput).text == "keep me"
        assert boxes(app) == before
        assert [(m.role, m.content) for c in store.list_conversations()
                for m in store.messages(c.id)] == before  # nothing half-written
        await pilot.press("enter")  # the lock is gone: it goes through now
        await until_idle(pilot)
        assert boxes(app) == [*before, ("user", "keep me"), ("assistant", "You said: keep me")]
        assert [m.content for m in store.messages(app.current_id)][-2:] == [
            "keep me", "You said: keep me"]
        assert app.query_one(PromptInput).text == ""
    store.close()


async def test_storage_errors_in_actions_are_notices(db_path: Path) -> None:
    store = Store(db_path, clock=TickingClock(), timeout=0.2)
    conv = store.create_conversation("Stays")
    store.add_message(conv.id, "user", "hi")
    app = make_app(store, ScriptedEngine(), conversation_id=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        with locked(db_path):
            await pilot.press("f2")
            app.screen.query_one(Input).value = "New name"
            await pilot.press("enter")
            await until(pilot, lambda: any(n.title == "Not renamed"
                                              for n in app._notifications), 30)
            await pilot.press("ctrl+d")
            await pilot.click("#confirm")
            await until(pilot, lambda: any(n.title == "Not deleted"
                                              for n in app._notifications), 30)
        assert app.is_running
        assert store.get_conversation(conv.id).title == "Stays"
    store.close()


async def test_no_model_on_an_open_chat_is_said_once_and_sends_nothing(store: Store) -> None:
    conv = store.create_conversation("Kept")
    store.add_message(conv.id, "user", "earlier")

    def broken(settings, model):
        raise ModelError("Model file not found: /x.gguf. Check the path.")

    app = ChatApp(ChatService(store, engine_factory=broken), resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "No model loaded" in str(app.status_bar.render()))
        await settled(pilot)
        assert sum("not found" in n for n in notes(app)) == 1  # not again as a memory error
        app.query_one(PromptInput).focus()
        await pilot.press(*"still here", "enter")
        await settled(pilot)
        assert app.query_one(PromptInput).text == "still here"
        assert [m.content for m in store.messages(conv.id)] == ["earlier"]
        assert "Thinking" not in str(app.status_bar.render())


# -- 6: a chat opens at its end, and fast -------------------------------------------------------


async def test_a_long_chat_opens_at_its_end_with_a_page_mounted(store: Store, scripted) -> None:
    cid = fill(store, 1000)
    app = make_app(store, scripted, conversation_id=cid)
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ChatView)
        await until(pilot, lambda: view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y)
        await settled(pilot)
        assert len(app.query(MessageBox)) == PAGE
        from ccm_chat.ui.widgets.chat_view import PAGE as page
        assert page == PAGE
        assert list(app.query(MessageBox))[-1].content.startswith("message 999 ")
        assert view.scroll_y == view.max_scroll_y
        old_first = view.boxes[0]
        view.scroll_home(animate=False)
        await until(pilot, lambda: len(app.query(MessageBox)) == 2 * PAGE)
        assert view.boxes[0].content.startswith(f"message {1000 - 2 * PAGE} ")
        # the view stays on what was read, not thrown to the new top
        await until(pilot, lambda: view.scroll_y > 0 and old_first.region.overlaps(view.region))


async def test_a_tall_terminal_mounts_earlier_pages_until_it_can_scroll(
        store: Store, scripted) -> None:
    cid = fill(store, 1000, words=0)  # one-line messages: a page does not fill 150 rows
    app = make_app(store, scripted, conversation_id=cid)
    async with app.run_test(size=(100, 150)) as pilot:
        view = app.query_one(ChatView)
        await until(pilot, lambda: view.max_scroll_y > 0)
        await settled(pilot)
        await until(pilot, lambda: view.scroll_y == view.max_scroll_y)
        assert PAGE < len(view.boxes) < 1000 and view.scroll_y == view.max_scroll_y
        before = len(view.boxes)
        view.scroll_home(animate=False)
        await until(pilot, lambda: len(view.boxes) == before + PAGE)


async def test_continue_opens_scrolled_to_the_end(store: Store, scripted) -> None:
    fill(store, 30, words=40)  # all mounted, several screens tall
    app = make_app(store, scripted, resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        view = app.query_one(ChatView)
        await until(pilot, lambda: len(app.query(MessageBox)) == 30 and view.max_scroll_y > 20
                    and view.scroll_y == view.max_scroll_y)
        assert view.max_scroll_y > 20 and view.scroll_y == view.max_scroll_y


# -- 7: no stale notices ------------------------------------------------------------------------


async def test_switching_back_does_not_reshow_the_memory_notice(db_path: Path) -> None:
    store = Store(db_path, clock=TickingClock())
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "remember this")
        await until_idle(pilot)
    other = store.create_conversation("Other")
    store.add_message(other.id, "user", "elsewhere")
    first = store.list_conversations()[1].id

    app = make_app(store, ScriptedEngine(), conversation_id=first)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any("Restored" in n for n in notes(app)))
        await app.open_conversation(other.id)
        await app.workers.wait_for_complete()
        await app.open_conversation(first)
        await settled(pilot)
        assert sum("Restored" in n for n in notes(app)) == 1
        assert sum("Rebuilt" in n for n in notes(app)) == 1  # "other" had no saved memory
        await pilot.press("ctrl+n")
        await send(pilot, "a new one")
        await until_idle(pilot)
        new = app.current_id
        await app.open_conversation(first)
        await app.open_conversation(new)
        await settled(pilot)
        assert not any("New conversation" in n for n in notes(app))
    store.close()


# -- 8: focus and small screens -----------------------------------------------------------------


async def test_picking_a_chat_moves_focus_to_the_message_box(store: Store, scripted) -> None:
    a = store.create_conversation("Alpha")
    store.add_message(a.id, "user", "about alpha")
    b = store.create_conversation("Beta")
    store.add_message(b.id, "user", "about beta")
    app = make_app(store, scripted, conversation_id=b.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+f")
        assert isinstance(app.focused, Input)
        await pilot.press("down")
        assert isinstance(app.focused, ListView)
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.current_id == a.id
        assert isinstance(app.focused, PromptInput)
        await pilot.press(*"typed", "enter")
        await until_idle(pilot)
        assert store.messages(a.id)[-1].content == "You said: typed"


async def _close_is_reachable(pilot, app: ChatApp) -> None:
    close = app.screen.query_one("#close", Button)
    widget, _ = app.screen.get_widget_at(*close.region.center)
    assert widget is close
    await pilot.click("#close")
    await pilot.pause()
    assert not isinstance(app.screen, HelpScreen)


async def test_help_scrolls_and_close_is_reachable(store: Store, scripted) -> None:
    for size in ((120, 36), (60, 20)):
        app = make_app(store, scripted)
        async with app.run_test(size=size) as pilot:
            await pilot.press("f1")
            await pilot.pause()
            text = app.screen.query_one("#help-text")
            assert text.max_scroll_y > 0  # the table is longer than the dialog
            assert app.screen.query_one(".dialog").region.width <= size[0]
            text.scroll_end(animate=False)
            await pilot.pause()
            await _close_is_reachable(pilot, app)


async def test_settings_fit_a_60x20_terminal_and_save(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=(60, 20)) as pilot:
        await pilot.press("ctrl+s")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, SettingsScreen)
        dialog = screen.query_one(".dialog").region
        assert dialog.width <= 60 and dialog.height <= 20
        form = screen.query_one("#form")
        assert form.max_scroll_y > 0
        field = screen.query_one("#max_tokens", Input)
        field.focus()  # focusing a field scrolls it into view
        await pilot.pause()
        assert field.region.width >= 8
        field.value = "99"
        save = screen.query_one("#save", Button)
        widget, _ = screen.get_widget_at(*save.region.center)
        assert widget is save
        await pilot.click("#save")
        await pilot.pause()
        assert not isinstance(app.screen, SettingsScreen)
        assert app.service.settings.max_tokens == 99


async def test_a_narrow_status_bar_shows_what_matters_first(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=(60, 20)) as pilot:
        await send(pilot, "hello")
        await until_idle(pilot)
        line = visible_line(app.status_bar)
        assert line.strip().startswith("off: full")
        assert "tok/s" in line and line.rstrip().endswith("…")


def test_status_puts_level_memory_and_speed_before_the_rest() -> None:
    status = Status("SmolLM2", "CPU", "balanced", "ccm-concat", 1200, 4096, 2_400_000, 7.5,
                    42.0, "memory restored")
    text = format_status(status, "read-only")
    order = ["read-only", "balanced: ccm-concat", "1,200/4,096 tok", "2.3 MB", "7.5x",
             "42.0 tok/s", "memory restored", "SmolLM2", "CPU"]
    assert [text.index(part) for part in order] == sorted(text.index(p) for p in order)


# -- 9: export on Enter -------------------------------------------------------------------------


async def test_enter_in_the_export_path_exports(store: Store, scripted, tmp_path: Path) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "export me")
        await until_idle(pilot)
        for name in ("typed.md", "typed.json", "plain"):
            await pilot.press("ctrl+e")
            assert isinstance(app.screen, ExportScreen)
            field = app.screen.query_one("#path", Input)
            assert app.focused is field
            field.value = str(tmp_path / name)
            await pilot.press("enter")
            await pilot.pause()
            assert not isinstance(app.screen, ExportScreen)
    assert "export me" in (tmp_path / "typed.md").read_text()
    assert '"content": "export me"' in (tmp_path / "typed.json").read_text()
    assert (tmp_path / "plain.md").read_text().startswith("# export me")


# -- 13: rebuild time left ----------------------------------------------------------------------


def test_time_left_comes_from_the_rate_so_far() -> None:
    from ccm_chat.ui.widgets.rebuild_bar import Eta, format_left

    now = [100.0]
    eta = Eta(clock=lambda: now[0])
    assert eta.left(0, 100) is None  # no rate yet
    now[0] = 110.0
    assert eta.left(10, 100) == 90.0  # 10 done in 10 s: 90 to go
    now[0] = 120.0
    assert eta.left(40, 100) == 30.0  # 40 in 20 s
    assert format_left(30.0) == "about 30 s left" and format_left(600) == "about 10 min left"
    assert format_left(None) == "estimating time left…"


def test_the_status_shows_verbatim_and_compressed_exchanges() -> None:
    status = Status("SmolLM2", "CPU", "balanced", "hybrid", 900, 4096, 1_000_000, 9.0, None,
                    verbatim_exchanges=3, compressed_exchanges=12)
    assert "3 verbatim + 12 compressed │ 900/4,096 tok │ 976.6 KB │ 9.0x" in format_status(status)
    assert "3v+12c · 900 tok" in format_status(status, compact=True)
    recent = Status("SmolLM2", "CPU", "off", "full", 10, 4096, 100, 1.0, None,
                    verbatim_exchanges=2)
    assert "2 verbatim │" in format_status(recent) and "compressed" not in format_status(recent)
    quiet = Status("SmolLM2", "CPU", "off", "full", 0, 4096, 0, 1.0, None)
    assert "verbatim" not in format_status(quiet)


# -- 11: one writer per chat --------------------------------------------------------------------


def other_window(db_path: Path) -> ChatService:
    return ChatService(Store(db_path), engine_factory=scripted_factory(ScriptedEngine()),
                       owner="the other window")


@dataclass
class Windows:
    """This app's window on chat `shared` (another chat: `mine`), and another window's
    service on the same database (the clock is the real one: leases go by it)."""

    store: Store
    shared: int
    mine: int
    app: ChatApp
    other: ChatService


@pytest.fixture
def windows(db_path: Path) -> Iterator[Windows]:
    store = Store(db_path)
    a = store.create_conversation("Shared")
    store.add_message(a.id, "user", "hello")
    store.add_message(a.id, "assistant", "You said: hello")
    b = store.create_conversation("Mine")
    store.add_message(b.id, "user", "mine")
    other = other_window(db_path)
    yield Windows(store, a.id, b.id, make_app(store, ScriptedEngine(), conversation_id=a.id),
                  other)
    other.close()
    store.close()


async def test_a_chat_held_elsewhere_is_read_only_until_taken_over(windows: Windows) -> None:
    store, shared, app, other = windows.store, windows.shared, windows.app, windows.other
    assert not other.open(shared).read_only  # the other window writes it
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "Read-only" in titles_of(app))
        await until(pilot, lambda: "read-only" in str(app.status_bar.render()))
        app.query_one(PromptInput).focus()
        await pilot.press(*"mine now", "enter")
        await until(pilot, lambda: any("read-only" in n and "Take" in n for n in notes(app)))
        assert app.query_one(PromptInput).text == "mine now" and len(store.messages(shared)) == 2
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        await commands["Take over chat"].callback()
        await until(pilot, lambda: "Taken over" in titles_of(app))
        await app.workers.wait_for_complete()
        await until(pilot, lambda: "read-only" not in str(app.status_bar.render()))
        await pilot.press("enter")
        await until_idle(pilot)
        assert [m.content for m in store.messages(shared)][-2:] == [
            "mine now", "You said: mine now"]
        assert other.open(shared).read_only  # it is this window's now
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert other.open(shared).read_only is False  # quitting released it


async def test_switching_away_releases_the_chat(windows: Windows) -> None:
    app, other = windows.app, windows.other
    async with app.run_test(size=SIZE):
        await app.workers.wait_for_complete()
        assert other.open(windows.shared).read_only  # this app holds it
        await app.open_conversation(windows.mine)
        await app.workers.wait_for_complete()
        assert not other.open(windows.shared).read_only


async def test_a_transcript_changed_elsewhere_is_reloaded(windows: Windows) -> None:
    store, shared, app, other = windows.store, windows.shared, windows.app, windows.other
    async with app.run_test(size=SIZE) as pilot:
        await app.workers.wait_for_complete()
        other.take_over(shared)
        await until(pilot, lambda: "Read-only" in titles_of(app), 10)  # told at once
        # and shown in the status bar (its message may be handled a moment after the notice)
        await until(pilot, lambda: "read-only" in str(app.status_bar.render()), 5)
        list(other.send(shared, "from the other window"))
        await until(pilot, lambda: "Reloaded" in titles_of(app), 10)
        assert boxes(app)[-2:] == [("user", "from the other window"),
                                   ("assistant", "You said: from the other window")]
        app.query_one(PromptInput).focus()
        await pilot.press(*"and me", "enter")  # the other window holds it now
        await until(pilot, lambda: any("read-only" in n and "Take" in n for n in notes(app)))
        assert app.query_one(PromptInput).text == "and me"
        assert [m.content for m in store.messages(shared)][-1] == (
            "You said: from the other window")  # nothing interleaved


# -- 13: a long rebuild shows time left and can be cancelled -------------------------------------


async def test_a_rebuild_shows_time_left_and_esc_cancels_it(store: Store, monkeypatch) -> None:
    cid = fill(store, 100)
    slow = {"first": True}
    plain_rebuild = ScriptedConversation.rebuild

    def rebuild(conv, progress=None) -> None:
        if not slow.pop("first", False):
            return plain_rebuild(conv, progress)
        for i in range(len(conv.messages)):
            time.sleep(0.05)  # 5 s in all: long enough to see and cancel
            if progress is not None:
                progress(i + 1, len(conv.messages))

    monkeypatch.setattr(ScriptedConversation, "rebuild", rebuild)
    app = make_app(store, ScriptedEngine(), conversation_id=cid)
    said: list[str] = []  # every notice, also those whose toast has timed out
    shown = app.notify
    app.notify = lambda message, **kw: (said.append(message), shown(message, **kw))[1]
    async with app.run_test(size=SIZE) as pilot:
        eta = app.query_one("#rebuild-eta")
        await until(pilot, lambda: "s left" in str(eta.render()) and app.query_one(
            "#rebuild").display and app.query_one("#cancel-rebuild", Button).region.width > 0)
        await pilot.press("escape")
        await until(pilot, lambda: any("rebuild cancelled" in n for n in notes(app)))
        assert not app.query_one("#rebuild").display and not app.pane.rebuilding
        await send(pilot, "still usable")
        await until_idle(pilot)
        assert store.messages(cid)[-1].content == "You said: still usable"

        async def rebuild_again() -> None:
            slow["first"] = True
            store.db.execute("UPDATE memory_states SET checksum = 'x'")  # the saved one: damaged
            store.db.conn.commit()
            app.service.close_engine()  # and the memory not live: the next open rebuilds
            await app.open_conversation(cid)
            await until(pilot, lambda: app.query_one("#rebuild").display
                        and app.query_one("#cancel-rebuild", Button).region.width > 0)

        await rebuild_again()  # the button cancels it too
        await pilot.click("#cancel-rebuild")
        await until(pilot, lambda: sum("rebuild cancelled" in n for n in said) == 2)
        await rebuild_again()  # left half-way by opening a new chat
        await pilot.press("ctrl+n")
        await until(pilot, lambda: not app.query_one("#rebuild").display
                    and not app.pane.rebuilding)


# -- 3 (UI part): one message deleted or edited ------------------------------------------------


async def test_delete_and_edit_single_messages(store: Store, scripted) -> None:
    conv = store.create_conversation("Edits")
    for text in ("one", "You said: one", "two", "You said: two"):
        store.add_message(conv.id, "user" if text[0] != "Y" else "assistant", text)
    app = make_app(store, scripted, conversation_id=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        await app.workers.wait_for_complete()
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        await commands["Delete message"].callback()  # nothing picked: the last one
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: len(store.messages(conv.id)) == 3)
        await until(pilot, lambda: boxes(app)[-1] == ("user", "two"))
        app.pane.chat_view.boxes[0].focus()  # a picked message
        await until(pilot, lambda: app.focused is app.pane.chat_view.boxes[0])
        await commands["Delete message"].callback()
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: [m.content for m in store.messages(conv.id)] == [
            "You said: one", "two"])
        await commands["Edit message"].callback()  # your last message
        await until(pilot, lambda: isinstance(app.screen, EditMessageScreen))
        app.screen.query_one(TextArea).text = "two, edited"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: [m.content for m in store.messages(conv.id)] == [
            "You said: one", "two, edited", "You said: two, edited"])
        await until(pilot, lambda: boxes(app)[-2:] == [
            ("user", "two, edited"), ("assistant", "You said: two, edited")])


async def test_a_chat_whose_holder_is_gone_becomes_writable(windows: Windows) -> None:
    """Audit case 38: the window that held the chat died; this one must not stay read-only."""
    store, shared, app, other = windows.store, windows.shared, windows.app, windows.other
    assert not other.open(shared).read_only  # the other window writes it
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "Read-only" in titles_of(app))
        other.close()  # it closes (a dead process's lease is free too: test_storage_hardening)
        await until(pilot, lambda: "Writable" in titles_of(app), 15)
        await app.workers.wait_for_complete()
        await until(pilot, lambda: "read-only" not in str(app.status_bar.render()))
        await send(pilot, "mine at last")
        await until_idle(pilot)
        assert [m.content for m in store.messages(shared)][-1] == "You said: mine at last"
