"""The Textual app driven by its pilot, on the scripted engine (fast) and a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

from textual.command import CommandList, CommandPalette
from textual.widgets import Input, Label, Select

from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.engine import ModelError
from ccm_chat.storage import Store
from ccm_chat.ui.app import ChatApp
from ccm_chat.ui.screens.confirm import ConfirmScreen
from ccm_chat.ui.screens.export import ExportScreen
from ccm_chat.ui.screens.help import HelpScreen
from ccm_chat.ui.screens.settings import SettingsScreen
from ccm_chat.ui.screens.text_prompt import TextPromptScreen
from ccm_chat.ui.widgets.chat_view import MessageBox
from ccm_chat.ui.widgets.prompt_input import PromptInput
from ccm_chat.ui.widgets.sidebar import ConversationItem
from tests.helpers import (
    SIZE,
    TickingClock,
    boxes,
    make_app,
    notes,
    send,
    settled,
    titles,
    until,
    until_idle,
    until_quit,
)
from tests.helpers import wait_for as wait_for  # noqa: F401  (test_model_picker imports it)
from tests.scripted_engine import ScriptedEngine


async def test_send_a_message_and_see_the_reply(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await until_idle(pilot)
        assert boxes(app) == [("user", "hello"), ("assistant", "You said: hello")]
        conv = store.latest_conversation()
        assert [m.content for m in store.messages(conv.id)] == ["hello", "You said: hello"]
        assert titles(app) == ["hello"]
        assert "Scripted model" in str(app.status_bar.render())
        assert app.query_one(PromptInput).text == ""


async def test_reply_streams_in_before_it_ends(store: Store) -> None:
    # 300 words, 30 ms apart: 9 s of streaming, so a loaded machine still sees it midway
    engine = ScriptedEngine(delay=0.03, replies={"go": " ".join(f"w{i}" for i in range(300))})
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        reply_box = list(app.query(MessageBox))[-1]
        await until(pilot, lambda: "w5 " in reply_box.markdown.source)
        partial = reply_box.markdown.source
        assert app.generating and "w299" not in partial
        await until_idle(pilot)
        assert reply_box.markdown.source.startswith(partial.rstrip())
        assert reply_box.content.endswith("w299")


async def test_a_fast_reply_reaches_the_screen_whole_in_batches(store: Store,
                                                                 monkeypatch) -> None:
    """The worker queues pieces and the pane writes them out every reply_flush_s (a message
    a token held the GIL the decode needs): 400 words 2 ms apart reach the screen in far
    fewer writes, the first at once, and none is lost."""
    from ccm_chat.ui.widgets.chat_view import ChatView

    words = " ".join(f"w{i}" for i in range(400))
    engine = ScriptedEngine(delay=0.002, replies={"go": words})
    written: list[str] = []
    original = ChatView.write_reply

    async def spy(self, piece: str) -> None:
        written.append(piece)
        await original(self, piece)

    monkeypatch.setattr(ChatView, "write_reply", spy)
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        await until_idle(pilot)
        reply_box = list(app.query(MessageBox))[-1]
        assert reply_box.content == words and "".join(written) == words
        assert written[0] == "w0" and 2 <= len(written) < 100, len(written)


async def test_the_end_of_a_reply_shows_before_the_memory_work_after_it(store: Store,
                                                                         monkeypatch) -> None:
    """The last pieces are on screen while the turn's after-work (compression, the save)
    still runs: the pane's timer writes them, not the end of the worker."""
    import threading as threading_module

    from ccm_chat.app.service import ChatService

    engine = ScriptedEngine(replies={"go": "the whole reply"})
    release = threading_module.Event()
    original = ChatService._commit_reply

    def slow_commit(self, *args, **kwargs):
        release.wait(10)  # the after-turn work, held until the test has looked
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ChatService, "_commit_reply", slow_commit)
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        reply_box = list(app.query(MessageBox))[-1]
        await until(pilot, lambda: "the whole reply" in reply_box.markdown.source)
        assert app.generating  # still in the turn's after-work
        release.set()
        await until_idle(pilot)
        assert reply_box.content == "the whole reply"


async def test_escape_stops_the_reply_and_keeps_it(store: Store) -> None:
    engine = ScriptedEngine(delay=0.05, replies={"go": " ".join(f"w{i}" for i in range(200))})
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        reply_box = list(app.query(MessageBox))[-1]
        await until(pilot, lambda: "w3" in reply_box.markdown.source)
        await pilot.press("escape")
        await until_idle(pilot)
        last = store.messages(store.latest_conversation().id)[-1]
        assert last.status == "interrupted"
        assert last.content.startswith("w0 w1 w2 w3") and "w199" not in last.content
        assert reply_box.content == last.content
        assert "(interrupted)" in str(reply_box.query_one(".role", Label).render())


async def test_ctrl_c_mid_reply_stops_and_saves_then_quits(store: Store) -> None:
    engine = ScriptedEngine(delay=0.05, replies={"go": " ".join(f"w{i}" for i in range(200))})
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        await until(pilot, lambda: "w2" in list(app.query(MessageBox))[-1].markdown.source)
        await pilot.press("ctrl+c")
        await until_idle(pilot)
        assert app.is_running
        assert store.messages(store.latest_conversation().id)[-1].status == "interrupted"
        await pilot.press("ctrl+c")
        await pilot.pause()
    assert not app.is_running


async def test_quit_mid_reply_saves_what_was_written(store: Store) -> None:
    engine = ScriptedEngine(delay=0.05, replies={"go": " ".join(f"w{i}" for i in range(200))})
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        await until(pilot, lambda: "w2" in list(app.query(MessageBox))[-1].markdown.source)
        await pilot.press("ctrl+q")
        await until_quit(pilot)
    last = store.messages(store.latest_conversation().id)[-1]
    assert last.role == "assistant" and last.status == "interrupted"
    assert last.content.startswith("w0 w1 w2")


async def test_switch_conversations_from_the_sidebar(store: Store, scripted) -> None:
    a = store.create_conversation("Alpha")
    store.add_message(a.id, "user", "about alpha")
    b = store.create_conversation("Beta")
    store.add_message(b.id, "user", "about beta")
    app = make_app(store, scripted, resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        assert app.current_id == b.id
        assert boxes(app) == [("user", "about beta")]
        assert titles(app) == ["Beta", "Alpha"]
        await pilot.click(ConversationItem, offset=(2, 0))  # the first item is Beta
        app.sidebar.list_view.focus()
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.current_id == a.id
        assert boxes(app) == [("user", "about alpha")]


async def test_new_chat_starts_empty_and_is_saved_on_first_message(store: Store, scripted) -> None:
    old = store.create_conversation("Old")
    store.add_message(old.id, "user", "old text")
    app = make_app(store, scripted, conversation_id=old.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.current_id is None and boxes(app) == []
        assert len(store.list_conversations()) == 1
        await send(pilot, "fresh start")
        await until_idle(pilot)
        assert titles(app) == ["fresh start", "Old"]


async def test_rename(store: Store, scripted) -> None:
    conv = store.create_conversation("Before")
    app = make_app(store, scripted, conversation_id=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        assert isinstance(app.screen, TextPromptScreen)
        app.screen.query_one(Input).value = ""
        await pilot.press(*"After", "enter")
        await pilot.pause()
        assert store.get_conversation(conv.id).title == "After"
        assert titles(app) == ["After"]


async def test_delete_asks_first(store: Store, scripted) -> None:
    conv = store.create_conversation("Doomed")
    store.add_message(conv.id, "user", "bye")
    app = make_app(store, scripted, conversation_id=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert store.list_conversations()  # cancelled: still there
        await pilot.press("ctrl+d")
        await pilot.click("#confirm")
        await pilot.pause()
        assert store.list_conversations() == []
        assert app.current_id is None and titles(app) == []


async def test_export_to_markdown_and_json(store: Store, scripted, tmp_path: Path) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "export me")
        await until_idle(pilot)
        for fmt in ("md", "json"):
            await pilot.press("ctrl+e")
            assert isinstance(app.screen, ExportScreen)
            app.screen.query_one("#path", Input).value = str(tmp_path / "out")
            await pilot.click(f"#{fmt}")
            await pilot.pause()
        md = (tmp_path / "out.md").read_text()
        assert "## User\n\nexport me" in md and "You said: export me" in md
        doc = json.loads((tmp_path / "out.json").read_text())
        assert [m["content"] for m in doc["messages"]] == ["export me", "You said: export me"]


async def test_regenerate_replaces_the_last_reply(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "again")
        await until_idle(pilot)
        await pilot.press("ctrl+r")
        await until_idle(pilot)
        assert boxes(app) == [("user", "again"), ("assistant", "You said: again (take 2)")]
        msgs = store.messages(store.latest_conversation().id)
        assert [m.content for m in msgs] == ["again", "You said: again (take 2)"]


async def test_copy_reply_and_code_block(store: Store) -> None:
    engine = ScriptedEngine(replies={"code": "Here:\n```python\nprint('hi')\n```\nDone."})
    app = make_app(store, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "code")
        await until_idle(pilot)
        await pilot.press("ctrl+y")
        assert app.clipboard == "Here:\n```python\nprint('hi')\n```\nDone."
        await pilot.press("ctrl+k")
        assert app.clipboard == "print('hi')\n"


async def test_multi_line_message(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).focus()
        await pilot.press(*"line one", "ctrl+j", *"line two")
        assert app.query_one(PromptInput).text == "line one\nline two"
        await pilot.press("enter")
        await until_idle(pilot)
        assert boxes(app)[0] == ("user", "line one\nline two")


async def test_search_finds_messages_in_any_chat(store: Store, scripted) -> None:
    a = store.create_conversation("Birds")
    store.add_message(a.id, "user", "Penguins cannot fly")
    b = store.create_conversation("Cars")
    store.add_message(b.id, "user", "Engines and wheels")
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+f")
        await pilot.press(*"penguin")
        await pilot.pause()
        assert titles(app) == ["Birds"]
        app.sidebar.list_view.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert app.current_id == a.id
        assert boxes(app) == [("user", "Penguins cannot fly")]


async def test_system_prompt_for_this_conversation(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+t")
        assert isinstance(app.screen, TextPromptScreen)
        app.screen.query_one(Input).value = "Answer in French."
        await pilot.press("enter")
        await pilot.pause()
        await send(pilot, "bonjour")
        await until_idle(pilot)
        conv = store.latest_conversation()
        assert conv.system_prompt == "Answer in French."
        assert scripted.conversations[-1].messages[0].content == "Answer in French."


async def test_settings_persist_after_restart(db_path: Path, scripted) -> None:
    store = Store(db_path, clock=TickingClock())
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        screen = app.screen
        assert isinstance(screen, SettingsScreen)
        screen.query_one("#temperature", Input).value = "0.25"
        screen.query_one("#max_tokens", Input).value = "64"
        screen.query_one("#compression", Select).value = "balanced"
        screen.query_one("#keymap", Input).value = "regenerate=ctrl+g"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not isinstance(app.screen, SettingsScreen)
    store.close()

    store2 = Store(db_path)
    app2 = make_app(store2, ScriptedEngine())
    async with app2.run_test(size=SIZE) as pilot:
        settings = app2.service.settings
        assert (settings.temperature, settings.max_tokens, settings.compression) == (
            0.25, 64, "balanced")
        await pilot.press("ctrl+s")
        assert app2.screen.query_one("#temperature", Input).value == "0.25"
        assert app2.screen.query_one("#compression", Select).value == "balanced"
        await pilot.press("escape")
        await send(pilot, "hi")
        await until_idle(pilot)
        await pilot.press("ctrl+g")  # the remapped regenerate key
        await until_idle(pilot)
        assert boxes(app2)[-1] == ("assistant", "You said: hi (take 2)")
        assert "balanced" in str(app2.status_bar.render())
    store2.close()


async def test_bad_settings_are_refused_with_a_message(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        app.screen.query_one("#top_p", Input).value = "7"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        assert any("Top-p" in n.message for n in app._notifications)
        assert Settings.load(store) == Settings()


async def test_help_lists_the_keys(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        keys = {title: key for key, title, _ in app.screen.rows}
        assert keys["Regenerate"] == "ctrl+r" and keys["Stop"] == "escape"
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


def highlighted_command(app: ChatApp) -> str:
    """The command the palette's Enter would run now ("" while it has none)."""
    if not isinstance(app.screen, CommandPalette):
        return ""
    commands = app.screen.query_one(CommandList)
    if commands.highlighted is None or not commands.option_count:
        return ""
    return str(commands.get_option_at_index(commands.highlighted).prompt)


async def test_command_palette_runs_app_commands(store: Store, scripted) -> None:
    conv = store.create_conversation("Palette")
    app = make_app(store, scripted, conversation_id=conv.id)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await pilot.press(*"Rename chat")
        await until(pilot, lambda: "Rename chat" in highlighted_command(app))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, TextPromptScreen))


async def test_no_model_sends_nothing_and_says_what_to_do(store: Store) -> None:
    def broken(settings, model):
        raise ModelError("Model file not found: /x.gguf. Check the path.")

    app = ChatApp(ChatService(store, engine_factory=broken))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "No model loaded" in str(app.status_bar.render()))
        app.query_one(PromptInput).focus()
        await pilot.press(*"hello?", "enter")
        await until(pilot, lambda: any("No model" in n and "settings" in n for n in notes(app)))
        await settled(pilot)
        assert app.is_running and not app.generating
        assert "Thinking" not in str(app.status_bar.render())
        assert any("not found" in n.message for n in app._notifications)
        assert any("No model" in n.message and "settings" in n.message
                   for n in app._notifications)
        assert store.list_conversations() == []  # no empty chat made
        assert app.query_one(PromptInput).text == "hello?"  # nothing lost
        assert boxes(app) == []


async def test_huge_paste_is_kept(store: Store) -> None:
    text = ("lorem ipsum " * (10_000 // 12)).strip()
    app = make_app(store, ScriptedEngine(replies={text: "That is a lot of text."}))
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = text
        app.query_one(PromptInput).focus()
        await pilot.press("enter")
        await until_idle(pilot)
        msgs = store.messages(store.latest_conversation().id)
        assert [m.content for m in msgs] == [text, "That is a lot of text."]
        assert boxes(app)[0] == ("user", text)


async def test_a_paste_too_long_for_off_stays_in_the_box(store: Store, scripted) -> None:
    text = ("lorem ipsum " * (200_000 // 12)).strip()  # more than the 4,096-token window
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        app.query_one(PromptInput).text = text
        app.query_one(PromptInput).focus()
        await pilot.press("enter")
        await until_idle(pilot)
        await until(pilot, lambda: any("compression level" in n for n in notes(app)))
        assert store.list_conversations() == []  # refused before anything was saved
        assert app.query_one(PromptInput).text == text and boxes(app) == []


async def test_resume_says_restored_or_rebuilt(db_path: Path) -> None:
    store = Store(db_path, clock=TickingClock())
    app = make_app(store, ScriptedEngine())
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "remember the lighthouse")
        await until_idle(pilot)
    assert store.latest_memory_state(store.latest_conversation().id) is not None

    engine = ScriptedEngine()
    app = make_app(store, engine, resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any("Restored from saved memory" in n for n in notes(app)))
        await until(pilot, lambda: "memory restored" in str(app.status_bar.render()))
        assert (engine.restores, engine.rebuilds) == (1, 0)

    conv_id = store.latest_conversation().id
    store.db.execute("UPDATE memory_states SET checksum = 'x'")
    store.db.conn.commit()
    engine = ScriptedEngine()
    app = make_app(store, engine, resume_last=True)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: any("Rebuilt memory" in n and "damaged" in n
                                          for n in notes(app)))
        await until(pilot, lambda: "memory rebuilt" in str(app.status_bar.render()))
        assert (engine.restores, engine.rebuilds) == (0, 1)
        assert boxes(app) == [("user", "remember the lighthouse"),
                              ("assistant", "You said: remember the lighthouse")]
    assert store.latest_memory_state(conv_id).intact
    store.close()


async def test_new_compression_level_takes_effect_next_turn(store: Store, scripted) -> None:
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await until_idle(pilot)
        assert "off: full" in str(app.status_bar.render())
        await pilot.press("ctrl+s")
        app.screen.query_one("#compression", Select).value = "aggressive"
        await pilot.pause()
        # the default model has a shipped compressor, so the level runs CCM and says so
        note = str(app.screen.query_one("#method_note", Label).render())
        assert "ccm-concat" in note and "trained CCM compressor" in note
        await pilot.press("ctrl+s")
        await until(pilot, lambda: any("compression level 'off'" in n for n in notes(app)))
        await send(pilot, "and again")
        await until_idle(pilot)
        assert "aggressive: window" in str(app.status_bar.render())
    state = store.latest_memory_state(store.latest_conversation().id)
    assert state.policy["level"] == "aggressive"


async def test_a_full_context_is_explained(store: Store, scripted) -> None:
    scripted.finish_reason = "context_full"
    app = make_app(store, scripted)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "a very long chat")
        await until_idle(pilot)
        assert any("context window is full" in n and "compression level" in n
                   for n in notes(app))
