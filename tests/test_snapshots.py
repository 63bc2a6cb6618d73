"""SVG snapshots of the main screens (pytest-textual-snapshot); update with --snapshot-update."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.service import ChatService
from storage import Store
from tests.conftest import TickingClock, scripted_factory
from tests.scripted_engine import ScriptedEngine
from ui.app import ChatApp

SIZE = (110, 34)
REPLY = (
    "Sure. Here is a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\n"
    "It prints **0, 1, 2**."
)


@pytest.fixture
def snapshot_app(tmp_path: Path) -> ChatApp:
    store = Store(tmp_path / "snap.db", clock=TickingClock())
    other = store.create_conversation("Weekend plans")
    store.add_message(other.id, "user", "Any ideas for Saturday?")
    conv = store.create_conversation("Python loops")
    store.add_message(conv.id, "user", "Show me a loop in Python.")
    store.add_message(conv.id, "assistant", REPLY)
    engine = ScriptedEngine()
    service = ChatService(store, engine_factory=scripted_factory(engine))
    return ChatApp(service, resume_last=True)


async def _settle(pilot) -> None:
    await pilot.app.workers.wait_for_complete()
    await pilot.pause(0.2)


def test_main_screen(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, terminal_size=SIZE, run_before=_settle)


def test_settings_screen(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, press=["ctrl+s"], terminal_size=SIZE, run_before=_settle)


def test_help_screen(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, press=["f1"], terminal_size=SIZE, run_before=_settle)


def test_delete_confirm(snap_compare, snapshot_app: ChatApp) -> None:
    assert snap_compare(snapshot_app, press=["ctrl+d"], terminal_size=SIZE, run_before=_settle)
