"""What the test modules share: the fixed clock, the scripted service, other programs holding
the database's lock, and driving the app through its pilot by waiting on conditions (never a
fixed sleep: a wait ends as soon as the condition holds, and on a loaded machine it waits on).

Test modules import from here, not from each other (nor from conftest.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from textual.widgets import Label

from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from ccm_chat.ui.widgets.chat_view import MessageBox
from ccm_chat.ui.widgets.prompt_input import PromptInput
from ccm_chat.ui.widgets.sidebar import ConversationItem
from tests.scripted_engine import ScriptedEngine

SIZE = (110, 36)
POLL = 0.02  # seconds between looks at a condition


class TickingClock:
    """A clock that moves one second per reading, so order by time is deterministic."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def scripted_factory(engine: ScriptedEngine) -> Callable[[Settings, str | None], ScriptedEngine]:
    return lambda settings, model: engine


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another program holding the database's write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


@contextmanager
def locked_with_a_write(path: Path) -> Iterator[None]:
    """Another program holding the write lock, with a write of its own under way."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE IF NOT EXISTS other_program (x)")
    other.execute("INSERT INTO other_program VALUES (1)")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def long_message(words: int) -> str:
    return " ".join(f"item{i} is number {i}." for i in range(words // 4))


# -- the app through its pilot -------------------------------------------------------------------


async def until(pilot, condition: Callable[[], object], timeout: float = 10.0,
                what: str | None = None) -> None:
    """Wait until `condition()` is true, looking every POLL seconds (the app runs meanwhile);
    fail after `timeout` seconds saying what was awaited."""
    for _ in range(max(1, int(timeout / POLL))):
        if condition():
            return
        await pilot.pause(POLL)
    if condition():
        return
    raise AssertionError(f"not met within {timeout} s: {what or _described(condition)}")


wait_for = until  # the older name, still imported by some test modules


def _described(condition: Callable[[], object]) -> str:
    import inspect

    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


async def settled(pilot) -> None:
    """The app's workers done and the messages they posted handled."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def until_stable(pilot, looks: int = 3, timeout: float = 10.0) -> None:
    """The screen drawn the same `looks` times in a row, POLL * 2 seconds apart."""
    app, same, last = pilot.app, 0, None
    for _ in range(max(1, int(timeout / (POLL * 2)))):
        await pilot.pause(POLL * 2)
        shot = app.export_screenshot()
        same = same + 1 if shot == last else 0
        if same >= looks - 1:
            return
        last = shot
    raise AssertionError(f"the screen still changed after {timeout} s")


async def send(pilot, text: str) -> None:
    app = pilot.app
    app.query_one(PromptInput).focus()
    await pilot.press(*text)
    await pilot.press("enter")
    await until(pilot, lambda: any(b.role == "user" and b.content == text
                                   for b in app.query(MessageBox)), what=f"{text!r} sent")


async def until_idle(pilot, timeout: float = 30.0) -> None:
    await until(pilot, lambda: not pilot.app.generating, timeout=timeout, what="reply done")
    await pilot.pause()


async def until_quit(pilot, timeout: float = 30.0) -> None:
    """The app has saved what it had and called exit (Ctrl+Q's work is done)."""
    await until(pilot, lambda: pilot.app.return_code is not None, timeout=timeout,
                what="the app quit")


def boxes(app: ChatApp) -> list[tuple[str, str]]:
    return [(b.role, b.content) for b in app.query(MessageBox)]


def titles(app: ChatApp) -> list[str]:
    return [str(i.query_one(".title", Label).render()) for i in app.query(ConversationItem)]


def notes(app: ChatApp) -> list[str]:
    return [n.message for n in app._notifications]


def status(app: ChatApp) -> str:
    return str(app.status_bar.render())


def make_app(store: Store, engine: ScriptedEngine, **kwargs) -> ChatApp:
    return ChatApp(ChatService(store, engine_factory=scripted_factory(engine)), **kwargs)
