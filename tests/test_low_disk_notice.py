"""A nearly full disk (issue 26): the store keeps its last MiB for the transcript and skips
saving a chat's memory; the chat goes on, the memory is rebuilt on the next open, and the
user is told why, once a session. The free space is faked (storage.memory_states.free_space);
the scripted engine and a real SQLite file."""

from __future__ import annotations

import pytest

from ccm_chat.app.service import LOW_DISK_NOTICE, ChatService
from ccm_chat.storage import Store, memory_states
from tests.helpers import SIZE, make_app, notes, scripted_factory, send, until, until_idle
from tests.scripted_engine import ScriptedEngine

NEARLY_FULL = 1 << 20  # bytes free: under the room the store keeps for the transcript


@pytest.fixture
def nearly_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_states, "free_space", lambda folder: NEARLY_FULL)


def test_a_memory_not_saved_for_room_is_said_once(store: Store, nearly_full: None) -> None:
    service = ChatService(store, engine_factory=scripted_factory(ScriptedEngine()))
    list(service.send(None, "hello"))
    cid = store.latest_conversation().id
    assert store.memory_state_count() == 0  # skipped: the transcript keeps the room
    assert [m.role for m in store.messages(cid)] == ["user", "assistant"]
    assert service.memory_error is None  # not a failure: a choice of the store
    assert service.low_disk_notice() == LOW_DISK_NOTICE
    list(service.send(cid, "again"))
    assert service.low_disk_notice() is None  # once a session
    service.close()
    other = ChatService(store, engine_factory=scripted_factory(ScriptedEngine()))
    assert other.open(cid).kind == "rebuilt"  # from the transcript, as the notice said
    other.close()


def test_no_notice_while_the_disk_has_room(store: Store) -> None:
    service = ChatService(store, engine_factory=scripted_factory(ScriptedEngine()))
    list(service.send(None, "hello"))
    assert store.memory_state_count() == 1
    assert service.low_disk_notice() is None
    service.close()


async def test_the_app_shows_the_notice_once(store: Store, nearly_full: None) -> None:
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await until_idle(pilot)
        await until(pilot, lambda: LOW_DISK_NOTICE in notes(app))
        await send(pilot, "and again")
        await until_idle(pilot)
        await pilot.pause()
        assert notes(app).count(LOW_DISK_NOTICE) == 1
        assert app.is_running
        assert [m.content for m in store.messages(app.current_id) if m.role == "user"] == [
            "hello", "and again"]
