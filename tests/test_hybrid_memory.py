"""The hybrid memory on the real default model: recent exchanges verbatim, older ones as
CCM slots, each exchange's slots computed exactly as pure CCM computes them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from ccm_chat.engine import CompressionConfig, Engine
from ccm_chat.engine.errors import StateError
from ccm_chat.engine.kv_memory import KVMemory
from ccm_chat.engine.state_blob import StateBlob
from tests.device import TEST_DEVICE
from tests.test_ccm_engine import ANSWERS, FACT, QUESTION, pure_ccm

EXCHANGES = [
    FACT,
    ("What should I cook tonight?", "How about a simple pasta with tomatoes and basil?"),
    ("I live in Lisbon, by the sea.", "Lisbon is lovely, especially the old town."),
    ("My sister plays the cello.", "That is a beautiful instrument."),
    ("Any tips for sleeping better?", "Keep a regular bedtime and avoid screens late."),
]
PROBE = b"<|im_start|>user\nWhat is my dog called?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine.load(n_ctx=2048, device=TEST_DEVICE, compression="balanced") as eng:
        yield eng


def hybrid(engine: Engine, verbatim: int, cap: int = len(EXCHANGES)) -> CompressionConfig:
    """A budget of `verbatim` cells beside room for `cap` groups of slots: the text takes what
    the slots leave, so in these short chats it holds about `verbatim` cells."""
    files = engine.ccm.files
    return CompressionConfig("balanced", "ccm-hybrid",
                             {"n_comp": files.n_comp, "cap": cap, "verbatim": verbatim,
                              "compressor": files.fingerprint}, "f16")


def chat(engine: Engine, config: CompressionConfig, exchanges) -> object:
    conv = engine.new_conversation(compression=config)
    conv.recall = False  # these read what the memory holds; recall: tests/test_recall.py
    for user, assistant in exchanges:
        conv.add_turn("user", user)
        conv.add_turn("assistant", assistant)
    return conv


def probe_logits(engine: Engine, conv) -> np.ndarray:
    """Logits over a fixed probe read from the memory's slots alone (text evicted)."""
    copy = engine.restore_conversation(conv.save_state())
    if copy.held > copy.slots:
        copy.memory.evict(copy.slots, copy.held)
    copy.messages = copy.messages[:1]
    copy.add_turn("user", QUESTION, decode=False)
    return copy.next_token_logits()


@pytest.mark.parametrize("verbatim", [60, 90])
def test_slots_equal_pure_ccm_slots_for_the_same_history(engine, verbatim) -> None:
    conv = chat(engine, hybrid(engine, verbatim), EXCHANGES)
    view = conv.memory_view()
    compressed = view.slots // engine.ccm.files.n_comp
    assert 0 < compressed < len(EXCHANGES) and view.exchanges  # both parts are held
    assert view.slots + sum(view.exchanges) == conv.held
    pure = chat(engine, pure_ccm(engine), EXCHANGES[:compressed])
    assert pure.held == view.slots
    # positions stay contiguous after the edits (on a GPU the verbatim text is decoded with
    # the next message, after the slots)
    ctx = engine.activate(conv)
    assert (ctx.pos_min(), ctx.pos_max()) == (0, conv.kv.cached - 1)
    conv.next_token_logits()
    assert (ctx.pos_min(), ctx.pos_max()) == (0, conv.held - 1)
    got, want = probe_logits(engine, conv), probe_logits(engine, pure)
    # bit-exact on the CPU; other kernels may batch differently
    assert np.abs(got - want).max() < (1e-3 if TEST_DEVICE == "cpu" else 0.5)


def test_save_restore_is_exact_after_compressing_beside_verbatim_text(engine) -> None:
    conv = chat(engine, hybrid(engine, 60), EXCHANGES[:4])
    assert conv.slots and conv.exchanges
    restored = engine.restore_conversation(conv.save_state())
    assert restored.memory_view() == conv.memory_view()
    assert restored.stats() == conv.stats()
    np.testing.assert_allclose(restored.next_token_logits(), conv.next_token_logits(),
                               atol=1e-4)
    # both go on the same way: one more exchange compresses one more
    for c in (conv, restored):
        c.messages.pop() if c.messages[-1].role == "user" else None
        c.add_turn("user", EXCHANGES[4][0])
        c.add_turn("assistant", EXCHANGES[4][1])
    assert restored.memory_view() == conv.memory_view()


def test_rebuild_from_the_transcript_gives_the_live_memory(engine) -> None:
    live = chat(engine, hybrid(engine, 60), EXCHANGES)
    rebuilt = engine.new_conversation(compression=hybrid(engine, 60))
    rebuilt.messages = list(live.messages)
    rebuilt.rebuild()
    assert rebuilt.memory_view() == live.memory_view()
    np.testing.assert_allclose(rebuilt.next_token_logits(), live.next_token_logits(),
                               atol=1e-3)


def test_the_hybrid_memory_still_recalls_the_fact_after_compressing_it(engine) -> None:
    conv = chat(engine, hybrid(engine, 60), EXCHANGES)
    assert conv.stats().compressed_exchanges >= 1  # the fact is in a slot now
    conv.add_turn("user", QUESTION, decode=False)
    right, *wrong = [conv.score(a) for a in ANSWERS]
    assert right < min(wrong), (right, wrong)


def test_levels_hold_different_memory_on_a_forty_exchange_chat(engine) -> None:
    exchanges = [EXCHANGES[i % len(EXCHANGES)] for i in range(40)]
    longest = max(len(engine.model.tokenize(  # an exchange's cells, in the chat template
        f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n".encode(),
        False, True)) for u, a in EXCHANGES)
    held = {}
    for level in ("light", "balanced", "aggressive"):
        conv = chat(engine, engine.compression_for(level), exchanges)
        stats = conv.stats()
        assert stats.method == "ccm-hybrid"
        assert stats.memory_tokens <= conv.policy.budget
        assert stats.verbatim_exchanges >= 1
        if stats.full_context_tokens > conv.policy.budget:  # long enough: the budget is used,
            # to within the one exchange whose compression took the memory under it
            assert stats.memory_tokens > conv.policy.budget - longest, (level, stats, longest)
        held[level] = (stats.memory_tokens, stats.verbatim_exchanges,
                       stats.compressed_exchanges)
    assert held["light"][0] > held["balanced"][0] > held["aggressive"][0], held
    assert held["light"][1] > held["balanced"][1] > held["aggressive"][1], held
    assert held["light"][1] + held["light"][2] == 40  # nothing dropped yet at light


def test_a_paste_longer_than_the_context_is_taken_in(engine) -> None:
    """Under a level a huge message slides through the memory; it keeps its end."""
    with Engine.load(n_ctx=256, device=TEST_DEVICE, compression="balanced") as small:
        for config in (small.compression, pure_ccm(small)):
            conv = small.new_conversation(compression=config)
            conv.add_turn("user", FACT[0])
            conv.add_turn("assistant", FACT[1])
            paste = " ".join(f"word{i}" for i in range(800)) + " The last word is zebra."
            reply = "".join(conv.send(paste, max_tokens=8, temperature=0))
            assert conv.last_reply is not None and conv.messages[-1].content == reply
            assert conv.held < small.n_ctx
            assert b"zebra" in conv.memory_view().rendered


def test_a_hybrid_state_is_refused_by_a_pure_ccm_conversation_key(engine) -> None:
    """What a saved state must match names the policy: an old pure-CCM state is told
    apart from a hybrid one (the app then rebuilds it and says why)."""
    old = pure_ccm(engine).key()
    new = engine.compression_for("balanced").key()
    assert old != new and old["method"] == "ccm-concat" and new["method"] == "ccm-hybrid"


def test_both_back_ends_keep_the_same_hybrid_memory(engine, hf_engine) -> None:
    """transformers cuts its cache to the cells the slots may see, as llama.cpp's scratch
    round trip does: the two memories score the question alike."""
    with Engine.load(backend="hf", n_ctx=1024, device="cpu", compression="balanced",
                     cache_dir=hf_engine.model.cache_dir) as hf:
        scores = {}
        for name, eng in (("llamacpp", engine), ("hf", hf)):
            conv = chat(eng, hybrid(eng, 60), EXCHANGES[:4])
            assert conv.slots and conv.exchanges  # slots before verbatim text on both
            conv.add_turn("user", QUESTION, decode=False)
            scores[name] = [conv.score(a) for a in ANSWERS]
        assert all(abs(a - b) < 0.25 for a, b in zip(*scores.values(), strict=True)), scores
        restored = hf.restore_conversation(conv.save_state())
        assert restored.memory_view() == conv.memory_view()


def test_an_old_pure_ccm_state_is_rebuilt_under_the_hybrid_level_and_says_why(
        engine, tmp_path) -> None:
    from ccm_chat.app.resume import resume, save_memory
    from ccm_chat.storage import Store

    store = Store(tmp_path / "chat.db")
    record = store.create_conversation(system_prompt="You are a helpful assistant.")
    old = engine.new_conversation(system=record.system_prompt, compression=pure_ccm(engine))
    last = None
    for user, assistant in EXCHANGES[:3]:
        old.add_turn("user", user)
        old.add_turn("assistant", assistant)
        store.add_message(record.id, "user", user)
        last = store.add_message(record.id, "assistant", assistant)
    save_memory(store, engine, record.id, last.id, old)
    level = engine.compression_for("balanced")
    live, report = resume(engine, store, record, store.messages(record.id), level)
    assert report.kind == "rebuilt" and "pure-CCM" in report.reason
    assert live.stats().method == "ccm-hybrid" and live.stats().verbatim_exchanges >= 1
    # saved again under the hybrid level, the next open restores it
    save_memory(store, engine, record.id, last.id, live)
    again, report = resume(engine, store, record, store.messages(record.id), level)
    assert report.kind == "restored" and again.memory_view() == live.memory_view()
    store.close()


def test_text_behind_new_slots_is_decoded_with_the_next_message_and_reads_the_same(
        engine, monkeypatch) -> None:
    """A compression moves the verbatim text after it behind the new slots; that text is
    decoded with the next message (one batch, not in the turn's after-work), and the model
    reads the same memory as when it is decoded at once. A state saved in between keeps it."""
    monkeypatch.setattr(engine.ctx, "batches_cheaply", True)  # as on a GPU
    lazy = chat(engine, hybrid(engine, 60), EXCHANGES)
    view = lazy.memory_view()
    assert view.slots and lazy.kv.undecoded == sum(view.exchanges) > 0
    size = lazy.stats().memory_bytes
    restored = engine.restore_conversation(lazy.save_state())
    assert restored.kv.undecoded == lazy.kv.undecoded and restored.memory_view() == view
    monkeypatch.setattr(engine.ctx, "batches_cheaply", False)  # as on a CPU
    eager = chat(engine, hybrid(engine, 60), EXCHANGES)
    assert eager.kv.undecoded == 0 and eager.memory_view() == view
    assert abs(size - eager.stats().memory_bytes) < 0.02 * size  # the estimate is close
    logits = []
    for conv in (lazy, restored, eager):
        conv.add_turn("user", QUESTION, decode=False)
        logits.append(conv.next_token_logits())
        assert conv.kv.undecoded == 0
    assert lazy.memory_view() == restored.memory_view() == eager.memory_view()
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-3 if TEST_DEVICE == "cpu" else 0.5)


def test_dropping_old_slots_in_the_compression_step_equals_evicting_them_after(
        engine, monkeypatch) -> None:
    """Past its cap a hybrid memory drops its oldest group in the same step that adds one
    (one position shift); the memory is what a separate eviction after it leaves."""
    config = hybrid(engine, 30, cap=2)
    monkeypatch.setattr(engine.ctx, "moves_on_host", False)  # both moved by llama.cpp
    monkeypatch.setattr(engine.ctx, "batches_cheaply", True)  # only slots held when moved
    fused = chat(engine, config, EXCHANGES)
    assert fused.slots == 2 * engine.ccm.files.n_comp and fused.kv.groups > 2  # some dropped
    plain = KVMemory.compress
    monkeypatch.setattr(KVMemory, "compress", lambda self, cells=None, merge=False,
                        max_slots=None: plain(self, cells, merge))
    apart = chat(engine, config, EXCHANGES)
    assert apart.memory_view() == fused.memory_view()
    logits = []
    for conv in (fused, apart):
        conv.add_turn("user", QUESTION, decode=False)
        logits.append(conv.next_token_logits())
        ctx = engine.activate(conv)
        assert (ctx.pos_min(), ctx.pos_max()) == (0, conv.held - 1)
    # Not bit-exact: a separate eviction rotates the kept keys once more, and each rotation
    # rounds them to f16; one more no-op pair of rotations moved these logits by 0.61 (CPU).
    assert np.abs(logits[0] - logits[1]).max() < 1.0


def test_a_reply_that_fills_the_context_compresses_mid_reply_and_reads_on(monkeypatch) -> None:
    """Mid-reply the hybrid memory compresses its oldest exchange to make room; the text
    after it is decoded again before the next token, so the reply goes on as it does with
    that text decoded at once, and the cache holds every cell the memory says it does."""
    replies = []
    with Engine.load(n_ctx=160, device=TEST_DEVICE, compression="balanced") as small:
        for defer in (True, False):
            monkeypatch.setattr(small.ctx, "batches_cheaply", defer)
            conv = small.new_conversation(compression=small.compression)
            # the context (llama.cpp pads it to 256 cells) nearly full when the reply starts;
            # under the budget (512), so nothing is compressed before it
            for user, assistant in [*EXCHANGES, *EXCHANGES[1:4]]:
                conv.add_turn("user", user)
                conv.add_turn("assistant", assistant)
            assert conv.slots == 0
            replies.append("".join(conv.send("Write a long story about a dragon.",
                                             max_tokens=120, temperature=0)))
            assert conv.slots > 0 and conv.last_reply.tokens > 20  # compressed mid-reply
            ctx = small.activate(conv)
            assert (ctx.pos_min(), ctx.pos_max()) == (0, conv.kv.cached - 1)
            assert conv.score(" The end.") > 0
    assert "dragon" in replies[0].lower()
    if TEST_DEVICE == "cpu":
        assert replies[0] == replies[1]


@pytest.mark.parametrize("undecoded", [0, 1, 10_000])
def test_a_state_whose_undecoded_count_does_not_fit_its_payload_is_refused(
        engine, undecoded, monkeypatch) -> None:
    monkeypatch.setattr(engine.ctx, "batches_cheaply", True)  # as on a GPU
    conv = chat(engine, hybrid(engine, 60), EXCHANGES[:4])
    assert conv.kv.undecoded > 1
    blob = StateBlob.from_bytes(conv.save_state())
    header = {k: v for k, v in blob.header.items() if k not in ("format", "payload_len")}
    header["undecoded"] = conv.kv.undecoded - undecoded if undecoded < 10_000 else undecoded
    forged = StateBlob(header, blob.payload).to_bytes()
    if undecoded == 0:  # as saved
        assert engine.restore_conversation(forged).memory_view() == conv.memory_view()
        return
    with pytest.raises(StateError):
        engine.restore_conversation(forged)
