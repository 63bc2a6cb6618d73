"""ChatService: the transcript in SQLite stays the source of truth around the engine."""

from __future__ import annotations

import threading

import pytest

from ccm_chat.app.errors import ChatError
from ccm_chat.app.levels import describe_level
from ccm_chat.app.service import ChatService, make_title
from ccm_chat.app.settings import Settings
from ccm_chat.engine import Engine
from ccm_chat.storage import Store
from tests.conftest import scripted_factory
from tests.scripted_engine import ScriptedEngine


def test_send_commits_both_messages_and_titles_the_chat(service: ChatService) -> None:
    conv = service.new_conversation()
    text = "".join(service.send(conv.id, "  Plan a trip to Lisbon  "))
    assert text == "You said: Plan a trip to Lisbon"
    msgs = service.messages(conv.id)
    assert [(m.role, m.content, m.status) for m in msgs] == [
        ("user", "Plan a trip to Lisbon", "complete"),
        ("assistant", "You said: Plan a trip to Lisbon", "complete"),
    ]
    assert msgs[1].token_count == 7  # one scripted token per word
    assert service.conversation(conv.id).title == "Plan a trip to Lisbon"
    "".join(service.send(conv.id, "second message"))
    assert service.conversation(conv.id).title == "Plan a trip to Lisbon"


def test_empty_message_is_refused(service: ChatService) -> None:
    conv = service.new_conversation()
    with pytest.raises(ChatError, match="empty"):
        list(service.send(conv.id, "   "))
    assert service.messages(conv.id) == []


def test_interrupted_reply_keeps_what_was_streamed(service: ChatService) -> None:
    conv = service.new_conversation()
    cancel = threading.Event()
    seen = []
    for piece in service.send(conv.id, "one two three four five six", cancel):
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()
    last = service.messages(conv.id)[-1]
    assert last.role == "assistant"
    assert last.status == "interrupted"
    assert last.content == "".join(seen) == "You said: one"


def test_abandoned_stream_is_saved_as_interrupted(service: ChatService) -> None:
    conv = service.new_conversation()
    stream = service.send(conv.id, "alpha beta gamma")
    next(stream)
    next(stream)
    stream.close()  # what happens when the worker is torn down mid-reply
    last = service.messages(conv.id)[-1]
    assert (last.content, last.status) == ("You said:", "interrupted")


def test_regenerate_replaces_the_last_reply(service: ChatService, scripted) -> None:
    conv = service.new_conversation()
    "".join(service.send(conv.id, "hello"))
    again = "".join(service.regenerate(conv.id))
    assert again == "You said: hello (take 2)"
    msgs = service.messages(conv.id)
    assert [m.content for m in msgs] == ["hello", "You said: hello (take 2)"]
    live = scripted.conversations[0]
    assert [m.content for m in live.messages][-2:] == ["hello", "You said: hello (take 2)"]


def test_regenerate_without_a_message_is_refused(service: ChatService) -> None:
    conv = service.new_conversation()
    with pytest.raises(ChatError, match="no message to reply to"):
        list(service.regenerate(conv.id))


def test_resumed_conversation_is_rebuilt_from_the_transcript(store: Store) -> None:
    first = ScriptedEngine()
    svc = ChatService(store, engine_factory=scripted_factory(first))
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "remember the number 42"))
    svc.close_engine()
    second = ScriptedEngine()
    svc2 = ChatService(store, engine_factory=scripted_factory(second))
    "".join(svc2.send(conv.id, "what number?"))
    live = second.conversations[0]
    assert [m.content for m in live.messages][:3] == [
        Settings().system_prompt, "remember the number 42", "You said: remember the number 42"]


def test_system_prompt_per_conversation(service: ChatService, scripted) -> None:
    conv = service.new_conversation()
    service.set_system_prompt(conv.id, "Talk like a pirate.")
    "".join(service.send(conv.id, "hi"))
    assert scripted.conversations[-1].messages[0].content == "Talk like a pirate."
    assert service.conversation(conv.id).system_prompt == "Talk like a pirate."


def test_settings_persist_and_reload_the_engine_when_needed(store: Store) -> None:
    loads = []

    def factory(settings, model):
        loads.append(settings.context_size)
        return ScriptedEngine()

    svc = ChatService(store, engine_factory=factory)
    svc.engine  # noqa: B018
    svc.update_settings(svc.with_settings(temperature=0.2))
    svc.engine  # noqa: B018
    assert loads == [4096]
    svc.update_settings(svc.with_settings(context_size=2048))
    svc.engine  # noqa: B018
    assert loads == [4096, 2048]
    assert Settings.load(store).context_size == 2048
    assert Settings.load(store).temperature == 0.2


def test_invalid_settings_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="Temperature"):
        Settings(temperature=5).save(store)
    assert Settings.load(store) == Settings()


def test_status_reports_engine_and_memory(service: ChatService) -> None:
    conv = service.new_conversation()
    assert service.status(conv.id) is None  # nothing loaded yet
    "".join(service.send(conv.id, "hello there"))
    status = service.status(conv.id)
    assert status.model == "Scripted model"
    assert status.tokens_in_context > 0
    assert status.tokens_per_second == pytest.approx(4 / 0.5)  # 4 words in 0.5 s


def test_export_formats(service: ChatService) -> None:
    conv = service.new_conversation()
    "".join(service.send(conv.id, "hello"))
    md = service.export(conv.id, "md")
    assert md.startswith("# hello\n") and "## User\n\nhello" in md
    assert "## Assistant\n\nYou said: hello" in md
    import json

    doc = json.loads(service.export(conv.id, "json"))
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"]
    with pytest.raises(ChatError, match="Unknown export format"):
        service.export(conv.id, "pdf")


def test_make_title_shortens_long_text() -> None:
    assert make_title("short\nline") == "short line"
    long = make_title("word " * 40)
    assert len(long) <= 48 and long.endswith("…")


def test_real_engine_through_the_service(store: Store, real_engine: Engine) -> None:
    svc = ChatService(
        store, settings=Settings(temperature=0.0, max_tokens=30),
        engine_factory=lambda s, m: real_engine,
    )
    conv = svc.new_conversation()
    reply = "".join(svc.send(conv.id, "What is the capital of France?"))
    assert "Paris" in reply
    second = "".join(svc.send(conv.id, "And of Germany?"))
    assert "Berlin" in second
    assert [m.role for m in svc.messages(conv.id)] == ["user", "assistant"] * 2
    status = svc.status(conv.id)
    assert status.tokens_in_context > 20 and status.device == "CPU"
    assert svc.bytes_per_cell == 23040  # 2 (K, V) x 2 bytes x 30 layers x 3 kv heads x 64
    sized = describe_level("balanced", "llamacpp", "", svc.bytes_per_cell)
    assert "MB at most" in sized and "MB at most" not in describe_level("balanced", "llamacpp")
    svc._engine = None  # the session-wide engine stays open for other tests


def test_a_failed_memory_save_loses_nothing_and_is_told(service: ChatService,
                                                        monkeypatch) -> None:
    from ccm_chat.storage import StorageError

    def disk_full(*args, **kwargs):
        raise StorageError("database or disk is full")

    conv = service.new_conversation()
    monkeypatch.setattr(service.store, "save_memory_state", disk_full)
    reply = "".join(service.send(conv.id, "hello"))
    assert [m.content for m in service.messages(conv.id)] == ["hello", reply]
    notice = service.reply_notice(conv.id)
    assert "disk is full" in notice and "reply is saved" in notice
    monkeypatch.undo()
    "".join(service.send(conv.id, "again"))
    assert service.reply_notice(conv.id) is None
    assert service.store.latest_memory_state(conv.id) is not None


def test_closing_saves_the_large_memory_a_reply_left_unsaved(service: ChatService,
                                                            store: Store,
                                                            monkeypatch) -> None:
    import ccm_chat.app.service as service_module

    monkeypatch.setattr(service_module, "LARGE_STATE_BYTES", 0)
    conv = service.new_conversation()
    for text in ("one", "two", "three"):
        "".join(service.send(conv.id, text))
    messages = store.messages(conv.id)
    assert store.latest_memory_state(conv.id).message_id == messages[1].id
    service.close()
    assert store.latest_memory_state(conv.id).message_id == messages[-1].id
    monkeypatch.setattr(service_module, "LARGE_STATE_SAVE_S", 0.0)  # no wait: each is saved
    again = ChatService(store, engine_factory=service._engine_factory)
    "".join(again.send(conv.id, "four"))
    assert store.latest_memory_state(conv.id).message_id == store.messages(conv.id)[-1].id

