"""End to end: the real app, the real default model on the CPU, a real SQLite file."""

from __future__ import annotations

from pathlib import Path

from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from tests.helpers import SIZE, boxes, send, titles, until


async def test_chat_quit_relaunch_and_continue(db_path: Path) -> None:
    store = Store(db_path)
    Settings(temperature=0.0, max_tokens=40, context_size=2048).save(store)
    app = ChatApp(ChatService(store))  # the real engine factory: embedded default model
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "SmolLM2" in str(app.status_bar.render()), timeout=60)
        assert "CPU" in str(app.status_bar.render())
        await send(pilot, "What is the capital of France?")
        await until(pilot, lambda: not app.generating, timeout=60)
        await pilot.pause()
        (role, reply), = boxes(app)[1:]
        assert role == "assistant" and "Paris" in reply
        status = str(app.status_bar.render())
        assert "tok/s" in status and "/2,048 tok" in status
        await pilot.press("ctrl+q")
    app.service.close_engine()
    store.close()

    store = Store(db_path)
    app = ChatApp(ChatService(store), resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        assert titles(app) == ["What is the capital of France?"]
        assert boxes(app)[0] == ("user", "What is the capital of France?")
        await until(pilot, lambda: "memory restored" in str(
            app.status_bar.render()), timeout=60)
        await send(pilot, "And what is the capital of Germany?")
        await until(pilot, lambda: not app.generating, timeout=60)
        await pilot.pause()
        assert "Berlin" in boxes(app)[-1][1]
    app.service.close_engine()
    msgs = store.messages(store.latest_conversation().id)
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert all(m.status == "complete" for m in msgs)
    store.close()
