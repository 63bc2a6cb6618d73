"""What a user sees of recall: the status bar says what was brought back, settings turn it off."""

from __future__ import annotations

from textual.widgets import Switch

from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.storage import Store
from ccm_chat.ui.screens.settings import SettingsScreen
from tests.helpers import SIZE, make_app, scripted_factory, send, until_idle


async def test_the_status_bar_says_what_a_reply_recalled_and_settings_turn_it_off(
        store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "my sister plays cello")
        await until_idle(pilot)
        assert "recalled" not in str(app.status_bar.render())
        await send(pilot, "which instrument does my sister play")
        await until_idle(pilot)
        assert "recalled 1 earlier exchange" in str(app.status_bar.render())

        await pilot.press("ctrl+s")
        screen = app.screen
        assert isinstance(screen, SettingsScreen)
        assert screen.query_one("#recall", Switch).value is True
        screen.query_one("#recall", Switch).value = False
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.service.settings.recall is False
        assert Settings.load(store).recall is False  # saved with the others

        await send(pilot, "remind me, what does my sister play")
        await until_idle(pilot)
        assert "recalled" not in str(app.status_bar.render())


def test_the_service_tells_the_engine_whether_to_recall(store: Store, scripted) -> None:
    service = ChatService(store, engine_factory=scripted_factory(scripted))
    first = list(service.send(None, "my sister plays cello"))
    conv_id = store.latest_conversation().id
    assert first and service.status(conv_id).recalled is None
    list(service.send(conv_id, "what does my sister play"))
    assert service.status(conv_id).recalled == "recalled 1 earlier exchange"
    service.update_settings(service.with_settings(recall=False))
    list(service.send(conv_id, "and my sister again?"))
    assert service.status(conv_id).recalled is None
