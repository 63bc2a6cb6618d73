"""Memory policies on the real default model (CPU): what each keeps, and exact save/restore."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from ccm_chat.engine import (
    CompressionConfig,
    ContextFullError,
    Engine,
    SamplingParams,
    llama_model,
)
from ccm_chat.engine.conversation import Conversation
from ccm_chat.engine.kv_sequence import MemoryView
from ccm_chat.engine.memory import WindowPolicy, make_policy
from tests.device import TEST_DEVICE
from tests.host_moves import kl, refuse_first_load

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
FACTS = [
    ("My name is Ada and I live in Lisbon.", "Nice to meet you, Ada from Lisbon."),
    ("I have a dog called Pixel who loves the beach.", "Pixel sounds like a happy dog."),
    ("My favourite food is grilled sardines with bread.", "Grilled sardines are a classic."),
    ("I work as a lighthouse keeper on the coast.", "That sounds like a peaceful job."),
    ("On weekends I repair old radios for my neighbours.", "What a useful hobby to have."),
    ("My sister Marta is a pilot who flies to Brazil.", "Marta must travel a lot then."),
]

EngineFor = Callable[..., Engine]


@pytest.fixture(scope="module")
def engine_for() -> Iterator[EngineFor]:
    """Engines by (kv_type, n_ctx), loaded once per module: the KV type is fixed per context."""
    loaded: dict[tuple[str, int], Engine] = {}

    def get(kv_type: str = "f16", n_ctx: int = 512) -> Engine:
        key = (kv_type, n_ctx)
        if key not in loaded:
            config = window(4, 60, kv_type)  # an engine that may evict
            loaded[key] = Engine.load(n_ctx=n_ctx, device=TEST_DEVICE, compression=config)
        return loaded[key]

    yield get
    for eng in loaded.values():
        eng.close()


def window(sink: int, size: int, kv_type: str = "f16") -> CompressionConfig:
    return CompressionConfig("balanced", "window", {"sink": sink, "window": size}, kv_type)


def chat(conv: Conversation, turns: int) -> None:
    for user, reply in (FACTS * 4)[:turns]:
        conv.add_turn("user", user)
        conv.add_turn("assistant", reply)


def positions(eng: Engine) -> tuple[int, int]:
    return eng.ctx.pos_min(), eng.ctx.pos_max()


def next_logits(conv: Conversation) -> np.ndarray:
    """Logits for the first token of the next reply to a fixed question."""
    conv.add_turn("user", "Where do I live?", decode=False)
    for _ in conv.generate(SamplingParams(temperature=0.0, max_tokens=1)):
        pass
    row = conv.engine.ctx.logits(-1)  # after the one sampled token was decoded
    conv.truncate(len(conv.messages) - 2)
    return row


def test_levels_map_to_methods_and_budgets() -> None:
    off = CompressionConfig.for_level("off")
    assert (off.method, off.kv_type, off.policy().budget) == ("full", "f16", None)
    budgets = [CompressionConfig.for_level(lv).policy().budget
               for lv in ("light", "balanced", "aggressive")]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] >= 64
    balanced = CompressionConfig.for_level("balanced")
    assert balanced.method == "window" and balanced.kv_type == "q8_0"
    assert "window" in balanced.describe() and "q8_0" in balanced.describe()
    assert CompressionConfig.for_level("balanced", quantize_kv=False).kv_type == "f16"
    with pytest.raises(ValueError, match="Unknown memory method"):
        make_policy("nope")


def test_window_keeps_sinks_and_recent_tokens_with_contiguous_positions(
    engine_for: EngineFor,
) -> None:
    eng = engine_for()
    full = eng.new_conversation(compression=CompressionConfig("balanced", "full", {}, "f16"))
    chat(full, 6)
    all_tokens = full.memory_view().tokens
    conv = eng.new_conversation(compression=window(4, 60))
    for i in range(6):
        conv.add_turn("user", FACTS[i][0])
        conv.add_turn("assistant", FACTS[i][1])
        stats = conv.stats()
        assert stats.memory_tokens <= 64
        assert positions(eng) == (0, stats.memory_tokens - 1)
    stats = conv.stats()
    assert stats.memory_tokens == 64
    assert conv.memory_view().tokens[:4] == all_tokens[:4]  # the attention sinks
    assert conv.memory_view().tokens[4:] == all_tokens[-60:]  # the most recent window
    assert stats.full_context_tokens == len(all_tokens)
    assert stats.ratio == pytest.approx(len(all_tokens) / 64)
    assert stats.full_context_bytes == len(all_tokens) * eng.model.f16_bytes_per_token


def test_window_keeps_going_past_the_context_window(engine_for: EngineFor,
                                                   monkeypatch) -> None:
    eng = engine_for(n_ctx=256)
    conv = eng.new_conversation(compression=window(4, 96))
    seen = 0
    plain = SamplingParams(temperature=0.0, max_tokens=40, repeat_penalty=1.0,
                           dry_multiplier=0.0)  # the replies this test was written against
    for user, _ in FACTS * 2:
        reply = "".join(conv.send(user, plain))
        assert reply.strip()
        assert conv.last_reply.finish_reason in ("stop", "length")
        assert conv.stats().memory_tokens <= 100
        seen = conv.stats().full_context_tokens
    assert seen > 2 * eng.n_ctx
    # A reply longer than the whole context window: the window slides while it is generated.
    # Whether this small model counts on or stops (or babbles) turns on the last rounding
    # of its memory, so its end-of-generation token is not taken as the end here.
    monkeypatch.setattr(eng.model, "is_end_of_generation", lambda token: False)
    counting = SamplingParams(temperature=0.0, max_tokens=300, repeat_penalty=1.0,
                              dry_multiplier=0.0)  # a count repeats itself, by design
    long = "".join(conv.send("Count from 1 to 300, one number per line.", counting))
    assert conv.last_reply.tokens > eng.n_ctx
    assert conv.last_reply.finish_reason == "length", long[-200:]
    assert positions(eng) == (0, conv.stats().memory_tokens - 1)


def test_window_takes_a_paste_longer_than_the_context(engine_for: EngineFor) -> None:
    eng = engine_for(n_ctx=256)
    conv = eng.new_conversation(compression=window(4, 96))
    paste = " ".join(f"line {i}: the quick brown fox." for i in range(120))
    reply = "".join(conv.send(paste + "\nWhat animal is mentioned?", GREEDY))
    assert reply.strip()
    assert conv.stats().full_context_tokens > eng.n_ctx


def test_full_policy_says_when_the_context_is_full(engine_for: EngineFor) -> None:
    eng = engine_for(n_ctx=256)
    conv = eng.new_conversation(compression=CompressionConfig("off", "full", {}, "f16"))
    paste = " ".join(f"line {i}: the quick brown fox." for i in range(120))
    with pytest.raises(ContextFullError, match="compression level"):
        list(conv.send(paste, GREEDY))


def test_full_policy_ends_a_reply_when_the_context_fills(engine_for: EngineFor) -> None:
    eng = engine_for(n_ctx=256)
    conv = eng.new_conversation(compression=CompressionConfig("off", "full", {}, "f16"))
    "".join(conv.send("Write a very long story about a dragon who learns to cook.",
                      SamplingParams(temperature=0.0, max_tokens=400)))
    assert conv.last_reply.finish_reason == "context_full"
    assert conv.stats().memory_tokens == eng.n_ctx - 1


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_save_restore_after_eviction_is_exact(engine_for: EngineFor, kv_type: str) -> None:
    eng = engine_for(kv_type)
    conv = eng.new_conversation(compression=window(4, 60, kv_type))
    chat(conv, 6)
    assert conv.memory_view().evicted > 0
    blob = conv.save_state()
    stats = conv.stats()
    expected = next_logits(conv)
    expected_reply = "".join(conv.send("What is my dog called?", GREEDY))

    restored = eng.restore_conversation(blob)
    assert restored.stats() == stats
    np.testing.assert_allclose(next_logits(restored), expected, atol=1e-4)
    assert "".join(restored.send("What is my dog called?", GREEDY)) == expected_reply


@dataclass
class WindowChat:
    view: MemoryView
    logits: list[np.ndarray]  # next-token logits after each exchange
    base: int  # llama.cpp's position of the first cell at the end
    raw_max: list[int]  # llama.cpp's last position after each exchange


def window_chat(eng: Engine, turns: int, monkeypatch, moves: bool | None,
                kv_type: str = "f16") -> WindowChat:
    """A window chat with its evictions moved in host memory (None: checked at the first
    step of each kind) or by llama.cpp's shift (False)."""
    ctx = eng.ctx
    monkeypatch.setattr(ctx, "moves_on_host", moves)
    monkeypatch.setattr(ctx, "_moves_checked", set())
    conv = eng.new_conversation(compression=window(4, 60, kv_type))
    logits, raw_max = [], []
    for user, reply in (FACTS * 4)[:turns]:
        conv.add_turn("user", user)
        conv.add_turn("assistant", reply)
        assert positions(eng) == (0, conv.held - 1)
        raw_max.append(ctx._base + ctx.pos_max())
        logits.append(conv.next_token_logits())
    return WindowChat(conv.memory_view(), logits, ctx._base, raw_max)


def mean_kl(a: WindowChat, b: WindowChat) -> float:
    return float(np.mean([kl(x, y) for x, y in zip(a.logits, b.logits, strict=True)]))


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_a_window_evicted_in_host_memory_reads_as_one_on_llama_cpps_shift(
        engine_for: EngineFor, kv_type: str, monkeypatch) -> None:
    """In host memory an eviction closes its gap by moving the 4 sink cells up rather than
    the window down (RoPE reads distances only), each time from the sink's keys as first
    read (quantized keys dequantized, turned, quantized again, as llama.cpp's shift does),
    on the state round trip the compaction needs anyway. llama.cpp's shift moves the
    window down. Both read alike, and as near to unquantized keys."""
    eng = engine_for(kv_type)
    host = window_chat(eng, 10, monkeypatch, None, kv_type)
    assert eng.ctx.moves_on_host is True and eng.ctx._moves_checked == {"up"}
    shifted = window_chat(eng, 10, monkeypatch, False, kv_type)
    assert host.view == shifted.view and host.view.evicted > 0
    assert host.base > 0 and shifted.base == 0
    # f16: 4 keys rounded by two different rotations; this model's attention sinks weigh
    # much, so its next-token distribution moved by a KL of up to 0.008 nats
    if kv_type == "f16":
        assert max(kl(a, b) for a, b in zip(host.logits, shifted.logits, strict=True)) < 0.02
    # quantized keys, against the unquantized memory: a mean KL of 0.0062 (host) and
    # 0.0064 (shift) for q8_0, 0.100 and 0.087 for q4_0, over 10 exchanges
    reference = window_chat(engine_for(), 10, monkeypatch, False)
    assert mean_kl(host, reference) <= 1.5 * mean_kl(shifted, reference) + 0.01


def test_a_refused_host_made_eviction_goes_by_llama_cpps_shift(engine_for: EngineFor,
                                                                monkeypatch) -> None:
    """A checked kind is made in place on the state llama.cpp writes; if llama.cpp refused
    it, the cells are put back and its shift does the step: nothing is lost."""
    eng = engine_for()
    shifted = window_chat(eng, 6, monkeypatch, False)
    ctx = eng.ctx
    monkeypatch.setattr(ctx, "moves_on_host", True)
    monkeypatch.setattr(ctx, "_moves_checked", {"up"})
    refused = refuse_first_load(ctx, monkeypatch)
    conv = eng.new_conversation(compression=window(4, 60))
    chat(conv, 6)
    logits = conv.next_token_logits()
    assert refused and ctx.moves_on_host is False  # not tried again
    assert conv.memory_view() == shifted.view
    assert kl(logits, shifted.logits[-1]) < 0.02


def test_positions_go_back_to_zero_before_they_pass_the_limit(engine_for: EngineFor,
                                                               monkeypatch) -> None:
    """Closing gaps upward makes positions grow; a step that would let the context (512
    cells here) reach past the limit moves every cell back to 0 instead."""
    eng = engine_for()
    ctx = eng.ctx
    unlimited = window_chat(eng, 12, monkeypatch, None)
    limit = ctx.n_ctx + 100
    monkeypatch.setattr(llama_model, "POSITION_LIMIT", limit)
    reached: list[int] = []
    decode = ctx.decode

    def watched(tokens, start_pos, want=()):
        rows = decode(tokens, start_pos, want)
        reached.append(ctx._base + ctx.pos_max())
        return rows

    monkeypatch.setattr(ctx, "decode", watched)
    limited = window_chat(eng, 12, monkeypatch, None)
    assert max(reached) < limit  # at every decode
    assert 0 <= limited.base <= limit - ctx.n_ctx < unlimited.base  # back down on the way
    assert eng.ctx._moves_checked == {"up", "down"}  # every cell down to 0, in host memory
    assert limited.view == unlimited.view
    # the same distances, at other positions: f16 keys rotated by other angles
    assert kl(limited.logits[-1], unlimited.logits[-1]) < 0.02  # near ties may swap


def test_quantized_kv_is_smaller_and_still_answers(engine_for: EngineFor) -> None:
    sizes = {}
    for kv_type in ("f16", "q8_0", "q4_0"):
        conv = engine_for(kv_type).new_conversation(
            compression=CompressionConfig("balanced", "full", {}, kv_type))
        chat(conv, 2)
        sizes[kv_type] = conv.stats().memory_bytes
        answer = "".join(conv.send("What is the capital of France?", GREEDY))
        assert "Paris" in answer, (kv_type, answer)
    assert sizes["q8_0"] < 0.8 * sizes["f16"]  # K quantized, V f16
    assert sizes["q4_0"] < 0.9 * sizes["q8_0"]


def test_state_from_another_kv_type_is_refused(engine_for: EngineFor) -> None:
    from ccm_chat.engine import StateError

    conv = engine_for("q8_0").new_conversation(compression=window(4, 60, "q8_0"))
    chat(conv, 1)
    with pytest.raises(StateError, match="q8_0"):
        engine_for("f16").restore_conversation(conv.save_state())


def test_flash_attention_is_off_only_where_the_cpu_evicts(engine_for: EngineFor) -> None:
    evicting = engine_for()
    assert evicting.flash_attn is (TEST_DEVICE == "gpu")  # see LlamaContext for why
    with Engine.load(n_ctx=256, device=TEST_DEVICE) as keeps_all:
        assert keeps_all.flash_attn is True


def test_state_with_another_v_cache_layout_is_refused_then_rebuilt(
    engine_for: EngineFor,
) -> None:
    """A state saved where flash attention was on (a GPU) lays out V differently: the other
    side says why, and the conversation's memory is rebuilt from its transcript."""
    from ccm_chat.engine import StateError

    eng = engine_for()
    conv = eng.new_conversation(compression=window(4, 60))
    chat(conv, 3)
    with Engine.load(n_ctx=512, device=TEST_DEVICE, compression=window(4, 60),
                     flash_attn=not eng.flash_attn) as other:
        with pytest.raises(StateError, match="flash attention"):
            other.restore_conversation(conv.save_state())
        copy = other.new_conversation(compression=window(4, 60))
        for m in conv.messages[1:]:
            copy.add_turn(m.role, m.content, decode=False)
        copy.rebuild()
        assert copy.memory_view().tokens == conv.memory_view().tokens


def test_regenerate_after_the_reply_was_evicted_rebuilds(engine_for: EngineFor) -> None:
    eng = engine_for()
    conv = eng.new_conversation(compression=window(4, 20))
    chat(conv, 2)
    "".join(conv.send("Tell me about lighthouses.", GREEDY))
    assert conv.memory_view().frozen > 0  # the reply ran past the window: no rollback in place
    count = len(conv.messages)
    conv.truncate(count - 1)
    again = "".join(conv.generate(GREEDY))
    assert again.strip() and len(conv.messages) == count
    assert conv.messages[-2].content == "Tell me about lighthouses."
    assert conv.stats().memory_tokens <= 24
    assert positions(eng) == (0, conv.stats().memory_tokens - 1)


def test_changing_the_policy_takes_effect_next_turn(engine_for: EngineFor) -> None:
    eng = engine_for()
    conv = eng.new_conversation(compression=CompressionConfig("balanced", "full", {}, "f16"))
    chat(conv, 4)
    before = conv.stats().memory_tokens
    assert before > 64
    conv.compression = window(4, 40)
    assert isinstance(conv.policy, WindowPolicy)
    chat(conv, 1)
    assert conv.stats().memory_tokens == 44
    with pytest.raises(ValueError, match="KV cache"):
        conv.compression = window(4, 40, "q8_0")
    off = Engine.load(n_ctx=256, device=TEST_DEVICE)
    try:
        with pytest.raises(ValueError, match="keeps every token"):
            off.new_conversation(compression=window(4, 40))
    finally:
        off.close()


def test_rebuild_holds_what_the_live_window_held(engine_for: EngineFor) -> None:
    eng = engine_for()
    live = eng.new_conversation(compression=window(4, 60))
    chat(live, 5)
    copy = eng.new_conversation(compression=window(4, 60))
    for m in live.messages[1:]:
        copy.add_turn(m.role, m.content, decode=False)
    seen: list[tuple[int, int]] = []
    copy.rebuild(lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(live.messages), len(live.messages))
    # the sinks and the recent window, decoded once
    assert copy.memory_view().tokens == live.memory_view().tokens
    assert positions(eng) == (0, 63)
    assert copy.stats().full_context_tokens == live.stats().full_context_tokens


def test_full_rebuild_reports_progress_as_it_decodes(engine_for: EngineFor) -> None:
    eng = engine_for(n_ctx=2048)
    conv = eng.new_conversation(compression=CompressionConfig("off", "full", {}, "f16"))
    for user, reply in FACTS * 4:
        conv.add_turn("user", user, decode=False)
        conv.add_turn("assistant", reply, decode=False)
    seen: list[tuple[int, int]] = []
    conv.rebuild(lambda done, total: seen.append((done, total)))
    token_steps = [s for s in seen if s[1] == conv.held]
    assert len(token_steps) >= 2 and token_steps[-1] == (conv.held, conv.held) and conv.held > 512
    assert seen[-1] == (len(conv.messages), len(conv.messages))
