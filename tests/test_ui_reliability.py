"""The chat pane under faults (issue 26), through the pilot on a real SQLite file: a long
message stopped or quit mid-intake (9), a reply the database refused (11), a read-only
database (14b), and notices that carry paths or titles as plain text."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from textual.widgets import Label

from ccm_chat.app.service import READ_ONLY_DATABASE, STOPPED_BEFORE_SENT, ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.engine import CompressionConfig, Engine
from ccm_chat.engine.errors import CancelledError
from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from ccm_chat.ui.widgets.chat_pane import ChatPane
from ccm_chat.ui.widgets.chat_view import MessageBox
from ccm_chat.ui.widgets.prompt_input import PromptInput
from tests.helpers import (
    SIZE,
    TickingClock,
    boxes,
    locked_with_a_write,
    long_message,
    make_app,
    notes,
    send,
    settled,
    until,
    until_idle,
)
from tests.scripted_engine import ScriptedConversation, ScriptedEngine


def titles_of(app: ChatApp) -> list[str]:
    return [n.title for n in app._notifications]


def role_label(box: MessageBox) -> str:
    return str(box.query_one(".role", Label).render())


class SlowReader(ScriptedConversation):
    """Takes a long user message in word by word, `seconds` per word, as the real engine
    does batch by batch; `stubborn` ignores the cancel event, as an engine stuck in one
    long decode would."""

    seconds = 0.01
    stubborn = False
    read = 0  # words taken in so far

    def add_turn(self, role: str, text: str, decode: bool = True,
                 cancel: threading.Event | None = None) -> None:
        if role == "user" and decode:
            for _ in text.split():
                if cancel is not None and cancel.is_set() and not self.stubborn:
                    raise CancelledError("Stopped before the whole message was read.")
                time.sleep(self.seconds)
                self.read += 1
        super().add_turn(role, text, decode)


class SlowReadingEngine(ScriptedEngine):
    def __init__(self, stubborn: bool = False) -> None:
        super().__init__()
        self.stubborn = stubborn

    def new_conversation(self, system: str | None = None,
                         compression: CompressionConfig | None = None) -> SlowReader:
        conv = SlowReader(self, compression or CompressionConfig())
        conv.stubborn = self.stubborn
        if system:
            conv.add_turn("system", system)
        self.conversations.append(conv)
        return conv


async def paste_and_send(pilot, text: str) -> None:
    prompt = pilot.app.query_one(PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    await until(pilot, lambda: pilot.app.generating, timeout=60)


# -- 9: a long message stopped, or the app quit, mid-intake --------------------------------------


async def test_esc_during_a_long_intake_gives_the_text_back_and_saves_nothing(
        store: Store) -> None:
    text = " ".join(f"word{i}" for i in range(5000))  # 50 s to take in
    engine = SlowReadingEngine()
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "Scripted" in str(app.status_bar.render()))
        await paste_and_send(pilot, text)
        await until(pilot, lambda: any(c.read >= 20 for c in engine.conversations),
                    what="the intake under way")
        await pilot.press("escape")
        await until(pilot, lambda: not app.generating, timeout=10)
        await until(pilot, lambda: STOPPED_BEFORE_SENT in notes(app))
        assert app.query_one(PromptInput).text == text
        assert boxes(app) == []
        assert store.list_conversations() == []  # nothing of it was written
        app.query_one(PromptInput).clear()
        await send(pilot, "short one")
        await until_idle(pilot)
        assert boxes(app) == [("user", "short one"), ("assistant", "You said: short one")]


async def test_quitting_never_waits_on_an_engine_that_does_not_stop(store: Store) -> None:
    """The reply runs in a daemon thread, and quitting waits for it only a few seconds."""
    engine = SlowReadingEngine(stubborn=True)
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "Scripted" in str(app.status_bar.render()))
        await paste_and_send(pilot, " ".join(f"word{i}" for i in range(800)))  # 8 s
        pane = app.pane
        await pilot.press("ctrl+q")
        await until(pilot, lambda: not app.is_running, timeout=15)
    assert not pane._reply_done.is_set()  # the engine is still at it: quitting did not wait
    assert pane._reply_done.wait(60)
    assert store.list_conversations() == []  # stopped: it was never sent


async def test_quitting_during_a_real_long_intake_is_prompt(
        db_path: Path, long_engine: Engine) -> None:
    store = Store(db_path, clock=TickingClock())
    svc = ChatService(store, settings=Settings(compression="balanced", context_size=8192,
                                               max_tokens=8),
                      engine_factory=lambda s, m: long_engine)
    app = ChatApp(svc)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: svc.engine_loaded, timeout=60)
        await paste_and_send(pilot, long_message(2900))
        pane = app.pane
        await pilot.pause(1.0)  # into the intake, which takes many seconds
        assert app.generating
        await pilot.press("ctrl+q")
        await until(pilot, lambda: not app.is_running, timeout=30)
    assert pane._reply_done.wait(300)  # the engine is shared with other tests: let it stop
    assert store.list_conversations() == []  # nothing of the long message was saved
    store.close()


# -- 11: a reply the database refused stays on screen and is saved later -------------------------


async def test_a_reply_refused_by_a_lock_stays_on_screen_and_is_saved_when_it_goes(
        quick_store: Store, db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ChatPane, "retry_reply_s", 0.3)
    retries: list[int] = []
    retry = ChatPane._retry_replies

    async def counted(self) -> None:
        retries.append(1)
        await retry(self)

    monkeypatch.setattr(ChatPane, "_retry_replies", counted)
    words = " ".join(f"w{i}" for i in range(60))
    app = make_app(quick_store, ScriptedEngine(delay=0.02, replies={"go": words}))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        reply_box = list(app.query(MessageBox))[-1]
        await until(pilot, lambda: "w2" in reply_box.markdown.source)
        with locked_with_a_write(db_path):
            await until_idle(pilot)
            assert reply_box.content == words
            assert "not saved yet" in role_label(reply_box)
            assert "Reply not saved yet" in titles_of(app)
            cid = app.current_id
            assert [m.content for m in quick_store.messages(cid)] == ["go"]
            tried = len(retries)  # the retries meet the lock too: still kept, still shown
            await until(pilot, lambda: len(retries) >= tried + 2, what="two more retries")
            await settled(pilot)
            assert boxes(app) == [("user", "go"), ("assistant", words)]
        await until(pilot, lambda: len(quick_store.messages(cid)) == 2)
        await until(pilot, lambda: "Saved" in titles_of(app))
        assert [m.content for m in quick_store.messages(cid)] == ["go", words]
        assert boxes(app) == [("user", "go"), ("assistant", words)]
        assert "not saved" not in role_label(list(app.query(MessageBox))[-1])
        await send(pilot, "next")
        await until_idle(pilot)
        assert [m.content for m in quick_store.messages(cid)][-2:] == ["next",
                                                                       "You said: next"]


# -- notices are plain text ----------------------------------------------------------------------


async def test_a_path_with_markup_in_a_notice_is_shown_as_written(tmp_path: Path) -> None:
    db_path = tmp_path / "odd [/b] [@click=app.quit]" / "chat.db"
    store = Store(db_path, clock=TickingClock(), timeout=0.2)
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "Scripted" in str(app.status_bar.render()))
        with locked_with_a_write(db_path):
            app.query_one(PromptInput).focus()
            await pilot.press(*"hi", "enter")
            await until(pilot, lambda: "Not saved" in titles_of(app))
            await settled(pilot)  # the notice is drawn
        assert app.is_running
        assert any("odd [/b] [@click=app.quit]" in n for n in notes(app))
        assert app.query_one(PromptInput).text == "hi"
    store.close()


# -- 14b: a read-only database is said at open ---------------------------------------------------


async def test_a_read_only_database_is_said_at_open_and_a_send_keeps_the_text(
        db_path: Path) -> None:
    writer = Store(db_path, clock=TickingClock())
    conv = writer.create_conversation("Kept")
    writer.add_message(conv.id, "user", "an old message")
    writer.close()
    store = Store(db_path, read_only=True)
    assert not store.writable
    app = make_app(store, ScriptedEngine(), resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: READ_ONLY_DATABASE in notes(app))
        assert boxes(app) == [("user", "an old message")]  # it reads
        assert "read-only database" in str(app.status_bar.render())
        app.query_one(PromptInput).focus()
        await pilot.press(*"new text", "enter")
        await until(pilot, lambda: "Not sent" in titles_of(app))
        assert app.query_one(PromptInput).text == "new text"
        assert boxes(app) == [("user", "an old message")]
        assert notes(app).count(READ_ONLY_DATABASE) == 1  # said once
    store.close()
    assert [m.content for m in Store(db_path).messages(conv.id)] == ["an old message"]
