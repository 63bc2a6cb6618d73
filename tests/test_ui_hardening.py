"""Untrusted text in the app (issue 26): titles and paths with markup in notices, control
characters in what is sent, exports readable by their owner only, and a paste that is not
UTF-8. The real app on the scripted engine, driven by its pilot, on a real SQLite file."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from textual import events
from textual.widgets import Input
from textual.widgets._toast import Toast

from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from ccm_chat.ui.screens.confirm import ConfirmScreen
from ccm_chat.ui.screens.export import ExportScreen
from ccm_chat.ui.screens.text_prompt import TextPromptScreen
from ccm_chat.ui.widgets.prompt_input import PromptInput
from tests.helpers import SIZE, make_app, settled, until, until_idle

TRICKY_TITLE = "oops [/b] markup [@click=app.quit]x[/]"
BBCODE_QUESTION = "What does [/b] do in BBCode?"


def toasts(app: ChatApp) -> list[str]:
    """The text each toast on screen renders (rendering is where bad markup raised)."""
    return [str(toast.render()) for toast in app.screen.query(Toast)]


async def test_rename_to_a_title_with_markup_shows_it_literally(store: Store, scripted) -> None:
    conv = store.create_conversation("Before")
    app = make_app(store, scripted, conversation_id=conv.id)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("f2")
        assert isinstance(app.screen, TextPromptScreen)
        app.screen.query_one(Input).value = TRICKY_TITLE
        await pilot.press("enter")
        await until(pilot, lambda: any(TRICKY_TITLE in t for t in toasts(app)))
        await settled(pilot)
        assert app.is_running and app.return_code is None  # [@click=app.quit] did nothing
        assert f"Renamed to “{TRICKY_TITLE}”." in toasts(app)
        assert store.get_conversation(conv.id).title == TRICKY_TITLE


async def test_delete_a_chat_whose_title_has_markup(store: Store, scripted) -> None:
    conv = store.create_conversation(BBCODE_QUESTION)
    store.add_message(conv.id, "user", BBCODE_QUESTION)
    app = make_app(store, scripted, conversation_id=conv.id)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: any(BBCODE_QUESTION in t for t in toasts(app)))
        assert app.is_running
        assert f"Deleted “{BBCODE_QUESTION}”." in toasts(app)
        assert store.list_conversations() == []
        # the app still works after it: a new message goes through
        await pilot.press(*"still here", "enter")
        await until_idle(pilot)
        assert [m.content for m in store.messages(store.latest_conversation().id)] == [
            "still here", "You said: still here"]


async def test_export_is_private_and_its_path_shows_literally(store: Store, scripted,
                                                               tmp_path: Path) -> None:
    """The app's export is created 0600 whatever the umask, and a folder named like markup
    ends up in the notice as it is."""
    conv = store.create_conversation("Secret plans")
    store.add_message(conv.id, "user", "my secret")
    folder = tmp_path / "[/b] [@click=app.quit]x[/]"
    app = make_app(store, scripted, conversation_id=conv.id)
    old_umask = os.umask(0o022)
    try:
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await pilot.press("ctrl+e")
            assert isinstance(app.screen, ExportScreen)
            app.screen.query_one("#path", Input).value = str(folder / "out")
            await pilot.click("#md")
            await until(pilot, lambda: any("Exported" in t for t in toasts(app)))
            assert f"Exported to {folder / 'out.md'}" in toasts(app)
            assert app.is_running
    finally:
        os.umask(old_umask)
    exported = folder / "out.md"
    assert "my secret" in exported.read_text()
    assert stat.S_IMODE(exported.stat().st_mode) == 0o600


CONTROL_PASTE = "a\x01\x02\x7f b \x1b]0;PWNED\x07c \x1b[2Jd\x1b]52;c;UFdORUQ=\x07 [bold]e[/bold]\tf"
CONTROL_PASTE_CLEAN = "a b c d [bold]e[/bold]\tf"


async def test_control_characters_are_not_sent_or_stored(store: Store, scripted) -> None:
    """A bracketed paste (a Paste event) and text that reached the box otherwise (keys typed
    by a terminal without bracketed paste) are both sent without their controls."""
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        box = app.query_one(PromptInput)
        box.focus()
        app.post_message(events.Paste(CONTROL_PASTE))  # as the driver sends it
        await until(pilot, lambda: box.text != "")
        assert box.text == CONTROL_PASTE_CLEAN
        await pilot.press("enter")
        await until_idle(pilot)
        box.text = CONTROL_PASTE
        await pilot.press("enter")
        await until_idle(pilot)
        stored = [m.content for m in store.messages(store.latest_conversation().id)]
    assert stored[0::2] == [CONTROL_PASTE_CLEAN, CONTROL_PASTE_CLEAN]


def feed_driver(app: ChatApp, data: bytes, events_expected: int) -> list[events.Event]:
    """Run the input thread of the driver the app picks for a terminal on a pipe holding
    `data`, until it has sent the app that many events (or died); they are returned."""
    driver = app.get_driver_class()(app)
    read_end, write_end = os.pipe()
    driver.fileno = read_end
    sent: list[events.Event] = []
    deliver = driver.send_message
    driver.send_message = lambda message: (sent.append(message), deliver(message))
    thread = threading.Thread(target=driver._run_input_thread)  # the thread Textual starts
    thread.start()
    try:
        os.write(write_end, data)
        for _ in range(500):
            if len(sent) >= events_expected or not thread.is_alive():
                break
            thread.join(0.01)
    finally:
        driver.exit_event.set()
        thread.join(5)
        os.close(write_end)
        os.close(read_end)
    return sent


async def test_a_paste_that_is_not_utf8_reaches_the_box_replaced(store: Store,
                                                                 scripted) -> None:
    """b"hi \\xff\\xfe there" from the terminal, pasted (bracketed) and typed: the app's own
    driver decodes it with U+FFFD for the bad bytes, the app keeps running and sends it."""
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        box = app.query_one(PromptInput)
        box.focus()
        sent = feed_driver(app, b"\x1b[200~hi \xff\xfe there\x1b[201~", 1)
        assert [e.text for e in sent if isinstance(e, events.Paste)] == ["hi \ufffd\ufffd there"]
        await until(pilot, lambda: box.text == "hi \ufffd\ufffd there")
        await pilot.press("enter")
        await until_idle(pilot)
        sent = feed_driver(app, b"ok \xff\xfe", 5)
        keys = "".join(e.character or "" for e in sent if isinstance(e, events.Key))
        assert keys == "ok \ufffd\ufffd"
        await until(pilot, lambda: box.text == "ok \ufffd\ufffd")
        assert app.is_running and app.return_code is None
        stored = [m.content for m in store.messages(store.latest_conversation().id)]
    assert stored == ["hi \ufffd\ufffd there", "You said: hi \ufffd\ufffd there"]


async def test_a_paste_holding_escape_sequences_arrives_whole_and_in_order(
        store: Store, scripted) -> None:
    """Audit case 34: Textual's key parser read the ESC inside a bracketed paste as a key
    sequence, so the paste came out reordered and cut; the driver now takes pastes out first."""
    text = ("ctl \x01\x02\x7f X \x1b]0;PWNED\x07 Y \x1b[2J Z [bold]B[/bold] "
            "[@click=app.quit]Q[/] end")
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE):
        sent = feed_driver(app, b"\x1b[200~" + text.encode() + b"\x1b[201~", 1)
    assert [e.text for e in sent if isinstance(e, events.Paste)] == [text]
    assert not [e for e in sent if isinstance(e, events.Key)]


def test_the_paste_splitter_joins_markers_and_pastes_split_across_reads() -> None:
    from ccm_chat.ui.input_driver import PasteSplitter

    splitter = PasteSplitter()
    stream = "ab\x1b[200~one \x1b[2J two\x1b[201~cd\x1b"
    # four characters a read: the markers come split (a read that ends in a lone Esc goes to
    # the key parser at once, as a pressed Esc must)
    got = [piece for cut in range(0, len(stream), 4)
           for piece in splitter.feed(stream[cut:cut + 4])]
    assert [text for is_paste, text in got if is_paste] == ["one \x1b[2J two"]
    assert "".join(text for is_paste, text in got if not is_paste) == "abcd\x1b"
    assert list(PasteSplitter().feed("x\x1b")) == [(False, "x\x1b")]  # a lone Esc: at once
