"""SVG snapshots of the screens a user sees (pytest-textual-snapshot), at the standard size and
at 60x20; update with --snapshot-update and look at each changed SVG before committing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ccm_chat.app.service import ChatService
from ccm_chat.engine import ModelError
from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from tests.helpers import TickingClock, notes, scripted_factory, settled, until, until_stable
from tests.scripted_engine import ScriptedEngine

SIZE = (110, 34)
WIDE = (120, 36)
SMALL = (60, 20)
REPLY = (
    "Sure. Here is a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\n"
    "It prints **0, 1, 2**."
)


@pytest.fixture
def snapshot_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("CCM_CHAT_EXPORT_DIR", "/home/me/Documents")  # the same in every run
    store = Store(tmp_path / "snap.db", clock=TickingClock())
    other = store.create_conversation("Weekend plans")
    store.add_message(other.id, "user", "Any ideas for Saturday?")
    conv = store.create_conversation("Python loops")
    store.add_message(conv.id, "user", "Show me a loop in Python.")
    store.add_message(conv.id, "assistant", REPLY)
    return store


@pytest.fixture
def snapshot_app(snapshot_store: Store) -> ChatApp:
    service = ChatService(snapshot_store, engine_factory=scripted_factory(ScriptedEngine()))
    return ChatApp(service, resume_last=True)


def _steady_cursors(app) -> None:
    """A focused box's cursor blinks every half second: a snapshot would catch it on or off
    by chance (the saved ones show it on). Without blinking it is drawn on, always."""
    for box in app.query("TextArea, Input"):
        box.cursor_blink = False


async def _settle(pilot) -> None:
    """The workers done, what they posted handled, any animation finished, and the screen
    the same in three looks in a row (a resize's layout, e.g. the -narrow breakpoint, done)."""
    _steady_cursors(pilot.app)
    await settled(pilot)
    await pilot.wait_for_scheduled_animations()
    await until_stable(pilot)


async def _until_notice(pilot, text: str, timeout: float = 60.0) -> None:
    """Settled with a notice holding `text` shown: on a loaded machine a worker's notice can
    come after the workers first look done (the failed load is posted back to the app)."""
    await until(pilot, lambda: any(text in n for n in notes(pilot.app)), timeout=timeout)
    await _settle(pilot)


async def _quiet(pilot) -> None:
    """Settled, and the memory notice of the first open gone (a dialog is the subject)."""
    await _settle(pilot)
    pilot.app.clear_notifications()
    await pilot.pause()


def _quiet_then(*keys: str):
    """Quiet, then press `keys`, then settled again: the dialog they open is drawn whole (keys
    given to snap_compare as press= are pressed after run_before, with no wait after them)."""

    async def run_before(pilot) -> None:
        await _quiet(pilot)
        await pilot.press(*keys)
        _steady_cursors(pilot.app)  # the dialog's own boxes
        await until_stable(pilot)  # (a dialog's own workers may run on: not waited for)

    return run_before


def test_main_screen(snap_compare, snapshot_app: ChatApp) -> None:
    """With the memory notice of the first open."""
    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=_settle)


def test_main_screen_small(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SMALL, run_before=_quiet)


def test_settings_screen(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=_quiet_then("ctrl+s"))


def test_settings_screen_small(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SMALL, run_before=_quiet_then("ctrl+s"))


def test_help_screen(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=WIDE, run_before=_quiet_then("f1"))


def test_help_screen_small(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SMALL, run_before=_quiet_then("f1"))


def test_delete_confirm(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=_quiet_then("ctrl+d"))


def test_export_screen(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=_quiet_then("ctrl+e"))


def test_no_model_notice(snap_compare, snapshot_store: Store) -> None:
    """Sending without a model: the message stays in the box and the notice says why."""

    def broken(settings, model):
        raise ModelError("Model file not found: /models/missing.gguf. Check the path.")

    app = ChatApp(ChatService(snapshot_store, engine_factory=broken))

    async def type_and_send(pilot) -> None:
        await _settle(pilot)
        await pilot.press(*"Hello there", "enter")
        await _until_notice(pilot, "Model file not found")  # the failed load's, from a worker

    assert snap_compare(app, terminal_size=SIZE, run_before=type_and_send)
