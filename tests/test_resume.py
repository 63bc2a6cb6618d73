"""Persisted memory on the real default model: exact resume, and every reason to rebuild."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccm_chat.app.errors import NotSavedError, RebuildCancelled
from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.engine import Engine
from ccm_chat.engine.errors import StateError
from ccm_chat.engine.state_blob import StateBlob
from ccm_chat.storage import Store
from tests.conftest import TickingClock
from tests.device import TEST_DEVICE

GREEDY = Settings(temperature=0.0, max_tokens=30, context_size=2048)


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, Engine]]:
    """One engine per level used here, as the app loads them (by level name), without the
    shipped compressor: these tests are about the training-free window (see test_ccm_resume)."""
    loaded = {level: Engine.load(n_ctx=2048, device=TEST_DEVICE, compression=level,
                                 compressor=False)
              for level in ("off", "balanced")}
    yield loaded
    for eng in loaded.values():
        eng.close()


def service(store: Store, engines: dict[str, Engine], **changes) -> ChatService:
    settings = Settings(**{**GREEDY.__dict__, **changes})
    return ChatService(store, settings=settings,
                       engine_factory=lambda s, m: engines[s.compression])


def two_turns(svc: ChatService) -> int:
    conv = svc.new_conversation()
    "".join(svc.send(conv.id, "My name is Ada and I have a dog called Pixel."))
    "".join(svc.send(conv.id, "What is the capital of France?"))
    return conv.id


def copy_db(src: Path, dst: Path) -> Store:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    return Store(dst, clock=TickingClock())


def tamper(store: Store, conv_id: int, sql: str, *params: object) -> None:
    store.db.execute(sql.replace("{id}", str(conv_id)), params)
    store.db.conn.commit()


def test_each_reply_saves_one_state_with_its_metadata(store: Store, engines) -> None:
    svc = service(store, engines)
    conv_id = two_turns(svc)
    state = store.latest_memory_state(conv_id)
    messages = store.messages(conv_id)
    assert store.memory_state_count() == 1  # older states pruned in the same transaction
    assert state.message_id == messages[-1].id
    assert state.backend == "llamacpp" and state.model_fingerprint == engines["off"].fingerprint
    assert state.policy == {"level": "off", "method": "full", "params": {}, "kv_type": "f16"}
    assert state.intact and state.tokens_held == state.position == state.tokens_seen > 50
    assert svc.memory_error is None


def test_resume_restores_and_continues_exactly(db_path: Path, tmp_path: Path, engines) -> None:
    store = Store(db_path, clock=TickingClock())
    svc = service(store, engines)
    conv_id = two_turns(svc)
    later = copy_db(db_path, tmp_path / "later.db")
    expected = "".join(svc.send(conv_id, "What is my dog called?"))

    resumed = service(later, engines)
    report = resumed.open(conv_id)
    assert report.kind == "restored", report.reason
    assert report.tokens == later.latest_memory_state(conv_id).tokens_held
    assert "".join(resumed.send(conv_id, "What is my dog called?")) == expected
    live = resumed._live[conv_id]
    # only the new message and the reply were decoded: the transcript was not re-read
    assert live.last_reply.prompt_tokens < 25
    assert resumed.status(conv_id).memory_note == "memory restored"
    later.close()
    store.close()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("UPDATE memory_states SET blob = zeroblob(size) WHERE conversation_id = {id}",
         "damaged"),
        ("UPDATE memory_states SET blob = substr(blob, 1, 1000), size = 1000 "
         "WHERE conversation_id = {id}", "damaged"),
        ("UPDATE memory_states SET model_fingerprint = 'another' WHERE conversation_id = {id}",
         "another model"),
        ("UPDATE memory_states SET backend = 'hf' WHERE conversation_id = {id}",
         "hf back end"),
    ],
    ids=["corrupted", "truncated", "other-model", "other-backend"],
)
def test_unusable_state_is_detected_and_rebuilt(store: Store, engines, damage, reason) -> None:
    conv_id = two_turns(service(store, engines))
    before = store.messages(conv_id)
    tamper(store, conv_id, damage)
    svc = service(store, engines)
    report = svc.open(conv_id)
    assert report.kind == "rebuilt" and reason in report.reason
    assert store.messages(conv_id) == before
    assert store.latest_memory_state(conv_id).intact  # the rebuilt memory was saved again
    assert "Berlin" in "".join(svc.send(conv_id, "And what is the capital of Germany?"))


def test_blob_damaged_behind_a_valid_checksum_is_caught_by_its_own(store: Store,
                                                                   engines) -> None:
    from ccm_chat.storage.store import checksum

    conv_id = two_turns(service(store, engines))
    blob = bytearray(store.latest_memory_state(conv_id).blob)
    blob[len(blob) // 2] ^= 0xFF
    tamper(store, conv_id, "UPDATE memory_states SET blob = ?, checksum = ? "
           "WHERE conversation_id = {id}", bytes(blob), checksum(bytes(blob)))
    report = service(store, engines).open(conv_id)
    assert report.kind == "rebuilt" and "could not be loaded" in report.reason


def test_a_read_state_hands_its_payload_on_without_copying_it(store: Store,
                                                             engines) -> None:
    """The KV payload is a view into the bytes read from the store, all the way to the
    context (an 8B model's state at 32k tokens is 4.3 GB); the envelope still checks."""
    conv_id = two_turns(service(store, engines))
    data = store.latest_memory_state(conv_id).blob
    blob = StateBlob.from_bytes(data)
    assert isinstance(blob.payload, memoryview) and blob.payload.obj is data
    again = StateBlob.from_bytes(StateBlob(
        {k: v for k, v in blob.header.items() if k not in ("format", "payload_len")},
        blob.payload).to_bytes())
    assert bytes(again.payload) == bytes(blob.payload) and again.header == blob.header
    with pytest.raises(StateError, match="checksum"):
        StateBlob.from_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    report = service(store, engines).open(conv_id)
    assert report.kind == "restored" and report.reason == ""


def test_a_large_memory_waits_after_a_reply_and_is_saved_on_closing(
        store: Store, db_path: Path, tmp_path: Path, engines, monkeypatch) -> None:
    """A memory over LARGE_STATE_BYTES is saved after a reply at most once a minute (saving
    one is seconds); what waited is saved when the window closes, and
    after a crash the next window restores the older state and replays the rest."""
    import ccm_chat.app.service as service_module

    monkeypatch.setattr(service_module, "LARGE_STATE_BYTES", 0)  # every memory is large
    svc = service(store, engines)
    conv_id = two_turns(svc)
    messages = store.messages(conv_id)
    assert store.latest_memory_state(conv_id).message_id == messages[1].id  # the first reply
    crashed = service(copy_db(db_path, tmp_path / "crashed.db"), engines).open(conv_id)
    assert "2 message(s) behind the transcript; replayed them" in crashed.reason
    svc.save_pending()  # what close() does first
    assert store.latest_memory_state(conv_id).message_id == messages[-1].id
    report = service(store, engines).open(conv_id)
    assert report.kind == "restored" and report.reason == ""


def test_state_behind_the_transcript_is_caught_up(store: Store, engines) -> None:
    conv_id = two_turns(service(store, engines))
    store.add_message(conv_id, "user", "I also like sailing.")
    store.add_message(conv_id, "assistant", "Sailing is a lovely hobby.")
    tamper(store, conv_id, "UPDATE memory_states SET message_id = "
           "(SELECT min(id) + 1 FROM messages WHERE conversation_id = {id})")
    svc = service(store, engines)
    report = svc.open(conv_id)
    assert report.kind == "rebuilt" and "behind" in report.reason
    assert len(svc._live[conv_id].messages) == 1 + len(store.messages(conv_id))


def test_changed_transcript_and_changed_level_rebuild(store: Store, engines) -> None:
    svc = service(store, engines)
    conv_id = two_turns(svc)
    "".join(svc.regenerate(conv_id))  # a new last reply: its state is saved again
    assert service(store, engines).open(conv_id).kind == "restored"
    store.delete_message(store.messages(conv_id)[-1].id)
    report = service(store, engines).open(conv_id)
    assert report.kind == "rebuilt" and "transcript changed" in report.reason

    balanced = service(store, engines, compression="balanced")
    report = balanced.open(conv_id)
    assert report.kind == "rebuilt" and "compression level 'off'" in report.reason
    assert store.latest_memory_state(conv_id).policy["method"] == "window"
    assert service(store, engines, compression="balanced").open(conv_id).kind == "restored"


def test_long_conversation_under_window_saves_a_bounded_state(store: Store, engines) -> None:
    svc = service(store, engines, compression="balanced", max_tokens=60)
    conv = svc.new_conversation()
    for i in range(40):  # until the transcript is well past the 512-token budget
        "".join(svc.send(conv.id, f"Tell me one fact about the number {i + 1}, in detail."))
        state = store.latest_memory_state(conv.id)
        if state.tokens_seen > 640:
            break
    assert state.tokens_held == 512  # the balanced budget, after the last exchange
    assert state.tokens_seen > state.tokens_held
    assert svc.status(conv.id).ratio > 1.0
    report = service(store, engines, compression="balanced").open(conv.id)
    assert report.kind == "restored"
    header = StateBlob.from_bytes(state.blob).header
    assert header["evicted"] == state.tokens_seen - state.tokens_held


WRITER = """
import os, sys
from ccm_chat.storage import Store
store = Store(sys.argv[1])
conv = store.create_conversation("crash test")
blob = os.urandom(8 << 20)
i = 0
while True:
    i += 1
    msg = store.add_message(conv.id, "user", f"message {i}")
    print(msg.id, flush=True)
    store.save_memory_state(conv.id, msg.id, blob[i % 97:] + blob[: i % 97], backend="llamacpp",
                            model_fingerprint="x", policy={}, position=i, tokens_held=i,
                            tokens_seen=i)
"""


def test_sigkill_during_a_save_keeps_the_database_sound(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parent.parent)
    committed = []
    while len(committed) < 6:
        line = proc.stdout.readline()
        assert line, "the writer died early"
        committed.append(int(line))
    time.sleep(0.05)  # somewhere inside an 8 MB state write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed += [int(x) for x in proc.stdout.read().split()]

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = Store(db)
    ids = {m.id for m in store.messages(1)}
    assert set(committed) <= ids
    state = store.latest_memory_state(1)
    assert state.intact and store.memory_state_count() == 1
    store.close()


def test_hf_back_end_saves_and_restores_through_the_store(db_path: Path, tmp_path: Path,
                                                          hf_engine: Engine, engines) -> None:
    store = Store(db_path, clock=TickingClock())
    hf = service(store, {"balanced": hf_engine}, compression="balanced", max_tokens=12)
    conv = hf.new_conversation()
    "".join(hf.send(conv.id, "My name is Ada and I have a dog called Pixel."))
    state = store.latest_memory_state(conv.id)
    assert state.backend == "hf" and state.policy["kv_type"] == "f16"
    later = copy_db(db_path, tmp_path / "later.db")
    expected = "".join(hf.send(conv.id, "What is my dog called?"))

    resumed = service(later, {"balanced": hf_engine}, compression="balanced", max_tokens=12)
    assert resumed.open(conv.id).kind == "restored"
    assert "".join(resumed.send(conv.id, "What is my dog called?")) == expected

    llama = service(later, engines, compression="balanced", max_tokens=12)
    report = llama.open(conv.id)
    assert report.kind == "rebuilt" and "hf back end" in report.reason
    later.close()
    store.close()


def test_ccm_memory_saves_restores_and_rebuilds_through_the_store(db_path: Path,
                                                                  tmp_path: Path) -> None:
    """The default model at balanced runs its shipped compressor (ccm-hybrid: recent exchanges
    verbatim, older ones as slots): that memory is saved, restored, and rebuilt (replayed
    exchange by exchange) when unusable."""
    with Engine.load(n_ctx=2048, device=TEST_DEVICE, compression="balanced") as eng:
        ccm = {"balanced": eng}
        store = Store(db_path, clock=TickingClock())
        conv_id = two_turns(service(store, ccm, compression="balanced"))
        state = store.latest_memory_state(conv_id)
        assert state.policy["method"] == "ccm-hybrid"
        assert state.tokens_held == state.tokens_seen > 50  # two short exchanges: verbatim
        later = copy_db(db_path, tmp_path / "later.db")
        expected = "".join(service(store, ccm, compression="balanced").send(
            conv_id, "What is my dog called?"))

        resumed = service(later, ccm, compression="balanced")
        assert resumed.open(conv_id).kind == "restored"
        assert "".join(resumed.send(conv_id, "What is my dog called?")) == expected

        # a state made with other compressor weights is not reused: rebuilt from the text
        # (re-tokenized, so not bit-identical to the sampled tokens), it holds what the live
        # memory held and answers as it did
        again = copy_db(db_path, tmp_path / "again.db")
        tamper(again, conv_id, "UPDATE memory_states SET policy = json_set(policy, "
               "'$.params.compressor', 'other') WHERE conversation_id = {id}")
        rebuilt = service(again, ccm, compression="balanced")
        report = rebuilt.open(conv_id)
        assert report.kind == "rebuilt" and "another compressor" in report.reason
        live_held = store.latest_memory_state(conv_id).tokens_held  # after the 3rd exchange
        assert abs(report.tokens - live_held) <= 3
        answer = "".join(rebuilt.send(conv_id, "What is my dog called?"))
        assert answer.split()[:4] == expected.split()[:4]
        assert again.latest_memory_state(conv_id).policy == state.policy
        for s in (store, later, again):
            s.close()


def test_a_paste_longer_than_the_window_under_off_is_refused_unsaved(store: Store,
                                                                     engines) -> None:
    svc = service(store, engines)
    conv_id = two_turns(svc)
    before = store.messages(conv_id)
    paste = "The quick brown fox jumps over the lazy dog. " * 1200  # ~54,000 characters
    with pytest.raises(NotSavedError) as caught:
        list(svc.send(conv_id, paste))
    assert "compression level" in str(caught.value) and "not saved" in str(caught.value)
    assert store.messages(conv_id) == before
    assert "Berlin" in "".join(svc.send(conv_id, "And what is the capital of Germany?"))
    assert svc._reports[conv_id].kind == "restored"  # the saved memory was still good
    assert all(m.content != paste for m in svc._live[conv_id].messages)


def test_edit_and_delete_keep_the_real_memory_in_step(store: Store, engines) -> None:
    svc = service(store, engines)
    conv_id = two_turns(svc)
    msgs = store.messages(conv_id)
    svc.edit_message(conv_id, msgs[2].id, "What is the capital of Italy?")
    assert [m.content for m in store.messages(conv_id)][2:] == ["What is the capital of Italy?"]
    reply = "".join(svc.regenerate(conv_id))
    assert "Rome" in reply
    live = svc._live[conv_id]
    assert live.last_reply.prompt_tokens < 30  # the first exchange stayed in memory
    transcript = [(m.role, m.content) for m in store.messages(conv_id)]
    assert [(m.role, m.content) for m in live.messages][1:] == transcript
    svc.delete_message(conv_id, msgs[1].id)  # the first reply
    "".join(svc.send(conv_id, "Thanks!"))
    transcript = [(m.role, m.content) for m in store.messages(conv_id)]
    assert [(m.role, m.content) for m in svc._live[conv_id].messages][1:] == transcript
    assert service(store, engines).open(conv_id).kind == "restored"  # saved in step


def test_a_cancelled_rebuild_of_the_real_model_rebuilds_on_next_use(store: Store,
                                                                    engines) -> None:
    svc = service(store, engines)
    conv = svc.new_conversation()
    fact = "Pixel the dog lives in Lisbon and likes long walks by the river. " * 12
    for i in range(6):  # a transcript of three llama.cpp batches (512 tokens each)
        store.add_message(conv.id, "user", f"Note {i}: {fact}")
        store.add_message(conv.id, "assistant", f"Noted {i}.")
    cancel = threading.Event()
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        cancel.set()

    with pytest.raises(RebuildCancelled):
        svc.open(conv.id, progress, cancel)
    assert len(calls) == 1 and calls[0] < 1200
    assert store.latest_memory_state(conv.id) is None and conv.id not in svc._live
    report = svc.open(conv.id)
    assert report.kind == "rebuilt" and report.tokens > 1000
    assert "Lisbon" in "".join(svc.send(conv.id, "In which city does Pixel live?"))
