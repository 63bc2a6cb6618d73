"""ChatService hardening (issue 26): a long message is stopped mid-intake with nothing saved and
the chat still usable (9), a reply the store refuses (a lock, a full disk) is kept and saved
later, never dropped (11, 12), and a read-only database is said before a send (14b).

The database is a real SQLite file; a lock is a second connection holding BEGIN IMMEDIATE
with a write, a full disk is SQLite's own page limit. The real default model runs where the
path needs it; the scripted engine covers the rest, fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccm_chat.app.errors import NotSavedError
from ccm_chat.app.service import (
    STOPPED_BEFORE_SENT,
    ChatService,
    ReplyNotSaved,
    SendCancelled,
)
from ccm_chat.app.settings import Settings
from ccm_chat.engine import Engine
from ccm_chat.storage import Store
from tests import test_service_daily as service_daily
from tests.conftest import TickingClock, scripted_factory
from tests.device import TEST_DEVICE
from tests.helpers import locked_with_a_write
from tests.scripted_engine import ScriptedEngine

quick_store = service_daily.quick_store  # a store that gives up on a lock in 0.2 s


def stored(store: Store, conversation_id: int) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in store.messages(conversation_id)]


# -- 9: a long message is cancelled mid-intake ---------------------------------------------------


@pytest.fixture(scope="module")
def long_engine() -> Iterator[Engine]:
    """The default model with room for a message that takes seconds to take in."""
    eng = Engine.load(n_ctx=8192, device=TEST_DEVICE, compression="balanced")
    yield eng
    eng.close()


def long_message(words: int) -> str:
    return " ".join(f"item{i} is number {i}." for i in range(words // 4))


def test_a_long_message_stopped_mid_intake_saves_nothing_and_the_chat_goes_on(
        store: Store, long_engine: Engine) -> None:
    svc = ChatService(store, settings=Settings(compression="balanced", temperature=0.0,
                                               max_tokens=12, context_size=8192),
                      engine_factory=lambda s, m: long_engine)
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "Hello there."))
    before = stored(store, conv.id)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def send_long() -> None:
        try:
            "".join(svc.send(conv.id, long_message(2900), cancel))  # 7,700 tokens
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome.append(exc)

    worker = threading.Thread(target=send_long, daemon=True)
    worker.start()
    time.sleep(1.5)  # into the intake: the whole of it takes many seconds here
    assert worker.is_alive(), "the intake ended before it could be stopped"
    stopped_at = time.monotonic()
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    # within a decode batch (512 tokens) and the roll-back: seconds on an idle 2-core CPU,
    # far less than the 15 batches of the whole message
    assert time.monotonic() - stopped_at < 60.0
    assert len(outcome) == 1 and isinstance(outcome[0], SendCancelled), outcome
    assert str(outcome[0]) == STOPPED_BEFORE_SENT
    assert stored(store, conv.id) == before  # nothing of it was written
    reply = "".join(svc.send(conv.id, "What is the capital of France?"))
    assert reply
    assert stored(store, conv.id) == [*before, ("user", "What is the capital of France?"),
                                      ("assistant", reply)]
    svc._engine = None  # the module's engine stays open for the next test


def test_a_send_cancelled_before_it_starts_saves_nothing(service: ChatService,
                                                         store: Store) -> None:
    conv = service.new_conversation()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SendCancelled, match="back in the box"):
        list(service.send(conv.id, "never sent", cancel))
    assert stored(store, conv.id) == []
    assert "".join(service.send(conv.id, "sent")) == "You said: sent"


# -- 11: a database locked while the reply is written --------------------------------------------


def test_a_reply_finished_under_a_lock_is_kept_and_saved_once_it_goes(
        quick_store: Store, db_path: Path, real_engine: Engine) -> None:
    svc = ChatService(quick_store, settings=Settings(temperature=0.0, max_tokens=24),
                      engine_factory=lambda s, m: real_engine)
    conv = svc.new_conversation()
    stream = svc.send(conv.id, "Tell me a short story about a cat.")
    pieces = [next(stream)]  # the message is saved, the reply under way
    with locked_with_a_write(db_path):
        with pytest.raises(ReplyNotSaved, match="not saved yet.*locked"):
            for piece in stream:
                pieces.append(piece)
        kept = svc.unsaved_reply(conv.id)
        assert kept is not None and kept.text == "".join(pieces) and kept.text
        assert stored(quick_store, conv.id) == [("user", "Tell me a short story about a cat.")]
        assert svc.save_unsaved_replies() == []  # still locked: still kept
        assert svc.unsaved_reply(conv.id) == kept
    assert svc.save_unsaved_replies() == [conv.id]
    assert svc.unsaved_reply(conv.id) is None
    messages = quick_store.messages(conv.id)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Tell me a short story about a cat."), ("assistant", kept.text)]
    assert quick_store.latest_memory_state(conv.id).message_id == messages[-1].id
    again = "".join(svc.send(conv.id, "What is the capital of France?"))
    assert [m.role for m in quick_store.messages(conv.id)] == ["user", "assistant"] * 2
    assert quick_store.messages(conv.id)[-1].content == again
    svc._engine = None  # the session-wide engine stays open for other tests


def test_an_unsaved_reply_goes_in_before_the_next_message(quick_store: Store,
                                                          db_path: Path) -> None:
    svc = ChatService(quick_store, engine_factory=scripted_factory(ScriptedEngine()))
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "first"))
    stream = svc.send(conv.id, "second")
    next(stream)
    with locked_with_a_write(db_path):
        with pytest.raises(ReplyNotSaved):
            list(stream)
        with pytest.raises(NotSavedError, match="not sent.*locked"):
            list(svc.send(conv.id, "third"))
        assert svc.unsaved_reply(conv.id).text == "You said: second"
    assert "".join(svc.send(conv.id, "third")) == "You said: third"
    assert [c for _, c in stored(quick_store, conv.id)] == [
        "first", "You said: first", "second", "You said: second", "third", "You said: third"]
    live = svc._live[conv.id]  # the memory is in step with the transcript
    assert [m.content for m in live.messages][-6:] == [c for _, c in stored(quick_store,
                                                                           conv.id)]


def test_regenerating_replaces_an_unsaved_reply(quick_store: Store, db_path: Path) -> None:
    svc = ChatService(quick_store, engine_factory=scripted_factory(ScriptedEngine()))
    conv = svc.new_conversation()
    stream = svc.send(conv.id, "hello")
    next(stream)  # the message is saved before the lock
    with locked_with_a_write(db_path), pytest.raises(ReplyNotSaved):
        list(stream)
    assert "".join(svc.regenerate(conv.id)) == "You said: hello (take 2)"
    assert stored(quick_store, conv.id) == [("user", "hello"),
                                            ("assistant", "You said: hello (take 2)")]
    assert svc.unsaved_reply(conv.id) is None


def test_closing_saves_an_unsaved_reply(quick_store: Store, db_path: Path) -> None:
    svc = ChatService(quick_store, engine_factory=scripted_factory(ScriptedEngine()))
    conv = svc.new_conversation()
    stream = svc.send(conv.id, "keep it")
    next(stream)
    with locked_with_a_write(db_path), pytest.raises(ReplyNotSaved):
        list(stream)
    svc.close()
    assert stored(quick_store, conv.id) == [("user", "keep it"),
                                            ("assistant", "You said: keep it")]


# -- 12: a full disk while the reply is written --------------------------------------------------


def test_a_reply_the_full_disk_refused_is_kept_and_saved_when_room_comes(
        store: Store) -> None:
    long_reply = " ".join(f"word{i}" for i in range(40_000))  # needs pages the file lacks
    engine = ScriptedEngine(replies={"write a lot": long_reply})
    svc = ChatService(store, engine_factory=scripted_factory(engine))
    conv = svc.new_conversation()
    stream = svc.send(conv.id, "write a lot")
    next(stream)
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here
    with pytest.raises(ReplyNotSaved, match="not saved yet.*full"):
        list(stream)
    assert svc.unsaved_reply(conv.id).text == long_reply
    assert stored(store, conv.id) == [("user", "write a lot")]
    store.db.execute("PRAGMA max_page_count = 1073741823")  # room again
    assert svc.save_unsaved_replies() == [conv.id]
    assert stored(store, conv.id) == [("user", "write a lot"), ("assistant", long_reply)]


# -- 14b: a read-only database -------------------------------------------------------------------


def test_a_read_only_database_refuses_a_send_before_the_model_runs(db_path: Path) -> None:
    writer = Store(db_path, clock=TickingClock())
    conv = writer.create_conversation("Kept")
    writer.close()
    store = Store(db_path, read_only=True)
    engine = ScriptedEngine()
    svc = ChatService(store, engine_factory=scripted_factory(engine))
    assert not svc.writable
    with pytest.raises(NotSavedError, match="read-only: you can read and search"):
        list(svc.send(conv.id, "hello"))
    assert engine.conversations == []  # refused before any work
    assert store.messages(conv.id) == []
    store.close()
