"""ChatService under daily use (issue 14): a locked database, a message too long, no model,
two windows on one chat, editing the transcript, a cancelled rebuild, the export folder.

A scripted engine stands in for the model; the database is a real SQLite file, and a lock is
a real second connection holding BEGIN IMMEDIATE.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccm_chat.app import export
from ccm_chat.app.errors import ChatError, NotSavedError, RebuildCancelled
from ccm_chat.app.service import ChatService, load_engine
from ccm_chat.app.settings import Settings
from ccm_chat.engine import EngineError
from ccm_chat.storage import ConversationRecord, MessageRecord, StorageError, Store
from tests.conftest import TickingClock, scripted_factory
from tests.helpers import locked
from tests.scripted_engine import ScriptedEngine


@pytest.fixture
def quick_store(db_path: Path) -> Iterator[Store]:
    """A store that gives up on a lock in a fraction of a second, so the tests stay fast."""
    s = Store(db_path, clock=TickingClock(), timeout=0.2)
    yield s
    s.close()


def scripted_service(store: Store, engine: ScriptedEngine, **kw) -> ChatService:
    return ChatService(store, engine_factory=scripted_factory(engine), **kw)


def chatted(svc: ChatService, *texts: str) -> tuple[ConversationRecord, list[MessageRecord]]:
    """A new chat with these user messages, each answered."""
    conv = svc.new_conversation()
    for text in texts:
        "".join(svc.send(conv.id, text))
    return conv, svc.messages(conv.id)


def contents(svc: ChatService, conv_id: int) -> list[str]:
    return [m.content for m in svc.messages(conv_id)]


# -- a locked database ----------------------------------------------------------------------


def test_a_locked_database_refuses_a_new_chat_and_keeps_nothing(quick_store: Store,
                                                                 db_path: Path) -> None:
    svc = scripted_service(quick_store, ScriptedEngine())
    with locked(db_path), pytest.raises(NotSavedError, match="not saved.*locked by another"):
        list(svc.send(None, "my first message"))
    assert quick_store.list_conversations() == []  # no empty chat left behind
    with locked(db_path), pytest.raises(ChatError, match="Could not start a new chat"):
        svc.new_conversation()
    assert quick_store.list_conversations() == []
    created = []
    reply = "".join(svc.send(None, "my first message", on_saved=created.append))
    (conv,) = quick_store.list_conversations()
    assert created[0].conversation_id == conv.id and conv.title == "my first message"
    assert contents(svc, conv.id) == ["my first message", reply]


def test_a_locked_database_refuses_a_message_in_a_chat_and_keeps_memory_in_step(
        quick_store: Store, db_path: Path) -> None:
    engine = ScriptedEngine()
    svc = scripted_service(quick_store, engine)
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "hello"))
    svc.release(conv.id)  # so that the next send has a lease to write, under the lock
    with locked(db_path), pytest.raises(NotSavedError, match="not sent.*locked"):
        list(svc.send(conv.id, "blocked message"))
    assert contents(svc, conv.id) == ["hello", "You said: hello"]
    "".join(svc.send(conv.id, "again"))
    live = [m.content for m in engine.conversations[-1].messages]
    assert "blocked message" not in live  # the refused text did not stay in the memory
    assert contents(svc, conv.id) == ["hello", "You said: hello", "again", "You said: again"]


def test_the_message_write_meets_the_lock_after_the_model_took_it_in(
        quick_store: Store, db_path: Path, monkeypatch) -> None:
    """The lease is held; the lock starts while the message is decoded: it is not saved and
    the memory drops it again."""
    engine = ScriptedEngine()
    svc = scripted_service(quick_store, engine)
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "hello"))
    holder: dict[str, sqlite3.Connection] = {}
    live = engine.conversations[-1]
    plain_add = live.add_turn

    def add_then_lock(role: str, text: str, decode: bool = True) -> None:
        plain_add(role, text, decode)
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        holder["conn"] = other

    monkeypatch.setattr(live, "add_turn", add_then_lock)
    with pytest.raises(NotSavedError, match="not saved, nothing of it was written"):
        list(svc.send(conv.id, "typed during a lock"))
    holder["conn"].execute("ROLLBACK")
    holder["conn"].close()
    monkeypatch.undo()
    assert contents(svc, conv.id) == ["hello", "You said: hello"]
    assert [m.content for m in live.messages][-1] == "You said: hello"
    "".join(svc.send(conv.id, "after"))
    assert contents(svc, conv.id)[-2:] == ["after", "You said: after"]


def test_a_locked_database_still_opens_a_chat_to_read(quick_store: Store,
                                                        db_path: Path) -> None:
    first = scripted_service(quick_store, ScriptedEngine())
    conv = first.new_conversation()
    "".join(first.send(conv.id, "hello"))
    first.close()
    svc = scripted_service(quick_store, ScriptedEngine())
    with locked(db_path):
        report = svc.open(conv.id)  # the lease could not be written: it opens all the same
        assert report.kind == "restored" and not report.read_only
        assert contents(svc, conv.id) == ["hello", "You said: hello"]
        with pytest.raises(NotSavedError, match="locked"):
            list(svc.send(conv.id, "not now"))
    assert "".join(svc.send(conv.id, "now")) == "You said: now"


def test_a_write_waits_for_a_short_lock(db_path: Path) -> None:
    store = Store(db_path, timeout=5.0)
    svc = scripted_service(store, ScriptedEngine())
    conv = svc.new_conversation()
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, lambda: other.execute("ROLLBACK")).start()
    "".join(svc.send(conv.id, "patient"))
    other.close()
    assert contents(svc, conv.id) == ["patient", "You said: patient"]
    store.close()


# -- messages too long, and no model --------------------------------------------------------


def test_a_message_too_long_under_off_is_refused_before_it_is_saved(store: Store) -> None:
    engine = ScriptedEngine(n_ctx=256)
    svc = scripted_service(store, engine)
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "hello"))
    paste = "word " * 1000
    with pytest.raises(NotSavedError) as caught:
        list(svc.send(conv.id, paste))
    text = str(caught.value)
    assert "not saved" in text and "compression level" in text
    assert "new chat" in text and "context size" in text
    assert contents(svc, conv.id) == ["hello", "You said: hello"]
    assert "".join(svc.send(conv.id, "short again")) == "You said: short again"
    with pytest.raises(NotSavedError, match="compression level"):
        list(svc.send(None, paste))
    assert [c.id for c in store.list_conversations()] == [conv.id]


def test_no_model_refuses_before_creating_or_saving_anything(store: Store, tmp_path) -> None:
    def missing(settings: Settings, model: str | None):
        raise EngineError(f"Model file not found: {tmp_path / 'none.gguf'}.")

    svc = ChatService(store, engine_factory=missing)
    with pytest.raises(NotSavedError, match="No model is loaded.*Model file not found"):
        list(svc.send(None, "anyone there?"))
    assert store.list_conversations() == []
    conv = store.create_conversation("Old chat")
    with pytest.raises(NotSavedError, match="No model is loaded"):
        list(svc.send(conv.id, "anyone there?"))
    with pytest.raises(NotSavedError, match="No model is loaded"):
        list(svc.regenerate(conv.id))
    assert store.messages(conv.id) == []
    assert "Model file not found" in svc.load_error
    with pytest.raises(ChatError, match="Model file not found"):
        svc.engine  # noqa: B018 - the UI's load worker meets the same ChatError


def test_load_engine_passes_threads_through(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr("ccm_chat.app.service.Engine.load", lambda **kw: seen.append(kw))
    load_engine(Settings(threads=3, compression="balanced", n_gpu_layers=0), None)
    load_engine(Settings(), "other.gguf")
    assert seen[0]["n_threads"] == 3 and seen[1]["n_threads"] is None  # 0: the engine picks
    assert seen[0]["compression"] == "balanced" and seen[0]["n_gpu_layers"] == 0
    assert seen[1]["model"] == "other.gguf" and seen[1]["n_gpu_layers"] is None


def test_loop_guards_are_settings_and_reach_every_reply(store: Store) -> None:
    from ccm_chat.app.service import sampling_params
    from ccm_chat.engine import SamplingParams

    assert Settings().repeat_penalty == SamplingParams().repeat_penalty > 1.0  # on by default
    assert Settings().dry_multiplier == SamplingParams().dry_multiplier > 0.0
    Settings(repeat_penalty=1.0, dry_multiplier=0.0).save(store)  # both off: allowed
    params = sampling_params(Settings.load(store), max_tokens=20)
    assert (params.repeat_penalty, params.dry_multiplier, params.max_tokens) == (1.0, 0.0, 20)
    with pytest.raises(ValueError, match="Repeat penalty"):
        Settings(repeat_penalty=0.5).save(store)
    with pytest.raises(ValueError, match="DRY"):
        Settings(dry_multiplier=-1).save(store)


def test_threads_setting_is_validated_and_reloads_the_engine(store: Store) -> None:
    with pytest.raises(ValueError, match="Threads"):
        Settings(threads=-2).save(store)
    loads = []
    svc = ChatService(store, engine_factory=lambda s, m: loads.append(s.threads) or
                      ScriptedEngine())
    svc.engine  # noqa: B018
    svc.update_settings(svc.with_settings(threads=1))
    svc.engine  # noqa: B018
    assert loads == [0, 1] and Settings.load(store).threads == 1


# -- editing and deleting messages ----------------------------------------------------------


def test_deleting_a_message_removes_it_and_the_memory_follows(service: ChatService,
                                                             scripted) -> None:
    conv, msgs = chatted(service, "one", "two", "three")
    service.delete_message(conv.id, msgs[2].id)  # the user message "two"
    assert contents(service, conv.id) == ["one", "You said: one", "You said: two", "three",
                                          "You said: three"]
    live = scripted.conversations[-1]
    assert [m.content for m in live.messages][1:] == contents(service, conv.id)
    service.delete_message(conv.id, msgs[-1].id)
    "".join(service.regenerate(conv.id))  # the last message is "three": it gets a reply
    assert contents(service, conv.id)[-2:] == ["three", "You said: three (take 2)"]
    with pytest.raises(ChatError, match="no message 999"):
        service.delete_message(conv.id, 999)


def test_editing_a_user_message_drops_the_replies_after_it(service: ChatService,
                                                           scripted) -> None:
    conv, msgs = chatted(service, "one", "two", "three")
    edited = service.edit_message(conv.id, msgs[2].id, "  TWO  ")
    assert edited.content == "TWO" and edited.id == msgs[2].id
    assert contents(service, conv.id) == ["one", "You said: one", "TWO"]
    reply = "".join(service.regenerate(conv.id))
    assert reply == "You said: TWO"
    live = scripted.conversations[-1]
    assert [m.content for m in live.messages][1:] == contents(service, conv.id)
    assert service.search("three") == []  # the dropped messages left the index too


def test_editing_a_reply_changes_only_that_reply(service: ChatService, scripted) -> None:
    conv, msgs = chatted(service, "one", "two")
    service.edit_message(conv.id, msgs[1].id, "A better first answer.")
    assert contents(service, conv.id) == ["one", "A better first answer.", "two",
                                          "You said: two"]
    live = scripted.conversations[-1]
    assert [m.content for m in live.messages][1:] == contents(service, conv.id)
    with pytest.raises(ChatError, match="cannot be empty"):
        service.edit_message(conv.id, msgs[1].id, "   ")


def test_an_edit_too_long_under_off_is_refused_before_it_is_saved(store: Store) -> None:
    engine = ScriptedEngine(n_ctx=256)
    svc = scripted_service(store, engine)
    conv, msgs = chatted(svc, "one", "two")
    with pytest.raises(NotSavedError, match="the edit was not saved. Pick a compression"):
        svc.edit_message(conv.id, msgs[0].id, "word " * 1000)
    assert contents(svc, conv.id) == ["one", "You said: one", "two", "You said: two"]
    "".join(svc.send(conv.id, "three"))
    assert [m.content for m in engine.conversations[-1].messages][1:] == contents(svc, conv.id)


def test_a_chat_broken_by_an_old_oversized_message_can_be_mended(store: Store) -> None:
    """Saved before such messages were refused: it cannot be opened, but it can be fixed."""
    conv = store.create_conversation("Broken")
    store.add_message(conv.id, "user", "hello")
    store.add_message(conv.id, "assistant", "You said: hello")
    huge = store.add_message(conv.id, "user", "word " * 1000)
    svc = scripted_service(store, ScriptedEngine(n_ctx=256))
    with pytest.raises(ChatError, match="needs .* tokens.*delete or edit its longest message"):
        svc.open(conv.id)
    svc.edit_message(conv.id, huge.id, "a short question")
    assert svc.open(conv.id).kind == "rebuilt"
    assert "".join(svc.regenerate(conv.id)) == "You said: a short question"
    store.add_message(conv.id, "user", "word " * 1000)
    svc.close()
    again = scripted_service(store, ScriptedEngine(n_ctx=256))
    svc_msgs = again.messages(conv.id)
    again.delete_message(conv.id, svc_msgs[-1].id)
    assert again.open(conv.id).kind == "restored"


def test_an_edit_survives_a_restart_by_rebuilding(store: Store) -> None:
    first = ScriptedEngine()
    svc = scripted_service(store, first)
    conv = svc.new_conversation()
    for text in ("one", "two"):
        "".join(svc.send(conv.id, text))
    svc.edit_message(conv.id, svc.messages(conv.id)[0].id, "uno")
    svc.close()
    second = ScriptedEngine()
    again = scripted_service(store, second)
    report = again.open(conv.id)
    assert report.kind == "rebuilt"  # the saved memory still held "one"
    assert [m.content for m in second.conversations[-1].messages][1:] == ["uno"]


# -- two windows on one conversation --------------------------------------------------------


def test_a_second_window_opens_a_held_chat_read_only(store: Store) -> None:
    a = scripted_service(store, ScriptedEngine(), owner="window-a")
    b = scripted_service(store, ScriptedEngine(), owner="window-b")
    conv = a.new_conversation()
    "".join(a.send(conv.id, "from a"))
    report = b.open(conv.id)
    assert report.read_only and report.kind == "read_only"
    assert "ccm-chat process" in report.held_by and "another window" in report.message()
    with pytest.raises(NotSavedError, match="open in another window"):
        list(b.send(conv.id, "from b"))
    with pytest.raises(NotSavedError, match="open in another window"):
        b.delete_message(conv.id, a.messages(conv.id)[0].id)
    with pytest.raises(NotSavedError, match="not deleted: this chat is open in another"):
        b.delete(conv.id)
    with pytest.raises(NotSavedError, match="open in another window"):
        b.set_system_prompt(conv.id, "Be terse.")
    assert contents(a, conv.id) == ["from a", "You said: from a"]
    b.take_over(conv.id)
    assert not b.open(conv.id).read_only
    "".join(b.send(conv.id, "from b"))
    assert b.held_elsewhere(conv.id) is None and not a.read_only(conv.id)
    assert "ccm-chat process" in a.held_elsewhere(conv.id)  # a learns it was taken over
    assert a.read_only(conv.id) and a.status(conv.id).read_only
    with pytest.raises(NotSavedError, match="open in another window"):
        list(a.send(conv.id, "a again"))
    b.release(conv.id)
    assert not a.open(conv.id).read_only  # free again: the first window writes on


def test_a_changed_transcript_is_reloaded_not_interleaved(store: Store) -> None:
    engine_a, engine_b = ScriptedEngine(), ScriptedEngine()
    a = scripted_service(store, engine_a, owner="window-a")
    b = scripted_service(store, engine_b, owner="window-b")
    conv = a.new_conversation()
    "".join(a.send(conv.id, "one"))
    a.messages(conv.id)  # what window a shows
    b.take_over(conv.id)
    assert b.open(conv.id).kind == "restored"  # from the memory a saved
    "".join(b.send(conv.id, "two"))
    assert a.transcript_changed(conv.id) and not b.transcript_changed(conv.id)
    a.take_over(conv.id)
    "".join(a.send(conv.id, "three"))
    expected = ["one", "You said: one", "two", "You said: two", "three", "You said: three"]
    assert contents(a, conv.id) == expected
    assert [m.content for m in engine_a.conversations[-1].messages][1:] == expected
    assert not a.transcript_changed(conv.id)


def test_a_lease_of_a_process_that_is_gone_is_taken(store: Store) -> None:
    conv = store.create_conversation("C")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    store.db.execute(
        "INSERT INTO leases VALUES (?, 'crashed-window', ?, ?, '2026-01-01T12:00:00', ?)",
        (conv.id, int(gone.stdout), socket.gethostname(),
         "2099-01-01T00:00:00+00:00"))
    store.db.conn.commit()
    svc = scripted_service(store, ScriptedEngine(), owner="window-a")
    assert not svc.open(conv.id).read_only
    assert store.lease(conv.id).owner == "window-a"


def test_close_releases_every_lease(store: Store) -> None:
    a = scripted_service(store, ScriptedEngine(), owner="window-a")
    first, second = a.new_conversation(), a.new_conversation()
    a.open(first.id)
    "".join(a.send(second.id, "hi"))
    assert store.lease(first.id) and store.lease(second.id)
    a.close()
    assert store.lease(first.id) is None and store.lease(second.id) is None


# -- a cancelled rebuild --------------------------------------------------------------------


def test_a_cancelled_rebuild_leaves_the_chat_usable(store: Store) -> None:
    svc = scripted_service(store, ScriptedEngine())
    conv = svc.new_conversation()
    for text in ("one", "two", "three"):
        "".join(svc.send(conv.id, text))
    svc.close()
    other = ScriptedEngine(fingerprint="another-model")  # the saved memory is of no use
    again = scripted_service(store, other)
    cancel = threading.Event()
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 2:
            cancel.set()  # the user pressed Cancel

    with pytest.raises(RebuildCancelled, match="rebuilt when you open it or send"):
        again.open(conv.id, progress, cancel)
    assert seen == [(1, 7), (2, 7)] and other.rebuilds_done == 0
    assert again.status(conv.id).tokens_in_context == 0  # nothing half-built is live
    report = again.open(conv.id, progress)
    assert report.kind == "rebuilt" and other.rebuilds_done == 1
    assert "".join(again.send(conv.id, "four")) == "You said: four"


# -- status and export ----------------------------------------------------------------------


def test_status_counts_exchanges(service: ChatService) -> None:
    conv = service.new_conversation()
    for text in ("one", "two"):
        "".join(service.send(conv.id, text))
    status = service.status(conv.id)
    assert status.verbatim_exchanges == 2 and status.compressed_exchanges == 0
    assert not status.read_only


def test_export_names_the_real_model_and_goes_to_the_documents_folder(
        service: ChatService, store: Store, tmp_path: Path, monkeypatch) -> None:
    conv = service.new_conversation()
    "".join(service.send(conv.id, "hello"))
    assert "model: Scripted model" in service.export(conv.id, "md")
    old = store.create_conversation("Old", model="default")
    assert "model: SmolLM2-135M-Instruct (Q4_1)" in scripted_service(
        store, ScriptedEngine()).export(old.id, "md")  # no engine loaded: the embedded name
    monkeypatch.delenv("CCM_CHAT_EXPORT_DIR", raising=False)
    docs = tmp_path / "Documents"
    monkeypatch.setattr("platformdirs.user_documents_dir", lambda: str(docs))
    monkeypatch.setattr("platformdirs.user_downloads_dir", lambda: str(tmp_path / "Downloads"))
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    monkeypatch.chdir(tmp_path / "..")
    assert export.default_export_dir() == tmp_path  # neither exists yet: home
    (tmp_path / "Downloads").mkdir()
    assert export.default_export_dir() == tmp_path / "Downloads"
    docs.mkdir()
    assert export.default_export_dir() == docs
    path = export.default_export_path(service.conversation(conv.id))
    assert path == docs / f"ccm-chat-{conv.id}-hello.md"
    monkeypatch.setenv("CCM_CHAT_EXPORT_DIR", str(tmp_path / "mine"))
    assert export.default_export_dir() == tmp_path / "mine"


OTHER_WINDOW = """
import sys
from ccm_chat.app.service import ChatService
from ccm_chat.storage import Store
from tests.scripted_engine import ScriptedEngine
store = Store(sys.argv[1])
svc = ChatService(store, engine_factory=lambda s, m: ScriptedEngine())
report = svc.open(int(sys.argv[2]))
print(report.read_only, report.held_by)
svc.close()
"""


def test_another_process_sees_the_chat_held_until_this_one_closes(db_path: Path) -> None:
    """Two real processes: the lease is this process's while it lives and holds it."""
    store = Store(db_path)
    svc = scripted_service(store, ScriptedEngine())
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "mine"))

    def other_window() -> str:
        done = subprocess.run([sys.executable, "-c", OTHER_WINDOW, str(db_path), str(conv.id)],
                              capture_output=True, text=True, timeout=60, check=True,
                              cwd=Path(__file__).resolve().parent.parent)
        return done.stdout.strip()

    seen = other_window()
    assert seen.startswith("True ccm-chat process") and str(os.getpid()) in seen
    svc.close()
    assert other_window() == "False None"
    assert store.lease(conv.id) is None  # the other window released it when it closed
    store.close()


def test_a_failed_read_after_a_write_makes_the_memory_re_read(service: ChatService, scripted,
                                                              monkeypatch) -> None:
    conv = service.new_conversation()
    "".join(service.send(conv.id, "one"))

    def unreadable(conversation_id: int) -> tuple[int, int, int]:
        raise StorageError("disk I/O error")

    monkeypatch.setattr(service.store, "transcript_signature", unreadable)
    assert "".join(service.send(conv.id, "two")) == "You said: two"  # saved all the same
    monkeypatch.undo()
    restores = scripted.restores
    "".join(service.send(conv.id, "three"))
    assert scripted.restores == restores + 1  # not sure it was in step: resumed from the save
    assert contents(service, conv.id)[-2:] == ["three", "You said: three"]


def test_a_held_chat_is_kept_alive_by_the_heartbeat(db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("ccm_chat.app.leases.HEARTBEAT_SECONDS", 0.05)
    store = Store(db_path)
    svc = scripted_service(store, ScriptedEngine())
    conv = svc.new_conversation()
    svc.open(conv.id)
    first = store.lease(conv.id).heartbeat
    deadline = time.monotonic() + 5
    while store.lease(conv.id).heartbeat == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.lease(conv.id).heartbeat > first
    svc.close()
    assert store.lease(conv.id) is None
    store.close()


def test_a_memory_saved_by_another_method_of_the_same_level_says_so(store: Store) -> None:
    svc = scripted_service(store, ScriptedEngine())
    svc.update_settings(svc.with_settings(compression="balanced"))
    conv, _ = chatted(svc, "one")
    store.db.execute("UPDATE memory_states SET policy = json_set(policy, '$.method', 'other')")
    store.db.conn.commit()
    svc.close()
    report = scripted_service(store, ScriptedEngine()).open(conv.id)
    assert report.kind == "rebuilt"
    assert report.reason == ("the saved memory was made by other, and level 'balanced' now "
                             "runs window")


def test_levels_pick_the_back_end_as_the_engine_does() -> None:
    from ccm_chat.app.levels import compressor_for

    files, on_llama = compressor_for("", "auto")  # the embedded GGUF: llama.cpp
    assert on_llama and files is not None and files.n_comp >= 1
    assert compressor_for("", "hf")[1] is False
    assert compressor_for("", "nonsense") == (None, True)  # said by the settings check instead
