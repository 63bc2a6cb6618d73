"""The Reply object, the thread defaults and the sampler's loop guards, on the real engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ccm_chat.engine import Engine, SamplingParams, StateError
from ccm_chat.engine.kv_sequence import KVSequence
from ccm_chat.engine.threads import default_threads, physical_cores, resolve_threads
from tests.device import TEST_DEVICE

HYPERTHREADED = "".join(f"processor: {i}\nphysical id: 0\ncore id: {i // 2}\n\n"
                        for i in range(8))
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine.load(n_ctx=512, device=TEST_DEVICE) as eng:
        yield eng


def test_threads_start_from_physical_cores_and_leave_one_to_the_ui() -> None:
    assert physical_cores(HYPERTHREADED) <= 4  # eight hyper-threads on four cores
    assert default_threads(4).decode == 3 and default_threads(4).batch == 4
    assert default_threads(1).decode == 1  # never none
    assert resolve_threads(2).decode == resolve_threads(2).batch == 2
    assert resolve_threads(None) == resolve_threads(0) == default_threads()


def test_the_engine_runs_the_thread_counts_it_was_given(engine) -> None:
    assert engine.ctx.threads == default_threads()
    with Engine.load(n_ctx=256, device=TEST_DEVICE, n_threads=1) as one:
        assert one.ctx.threads.decode == one.ctx.threads.batch == 1
        assert "".join(one.new_conversation().send("Hi!", GREEDY))


def test_a_reply_streams_then_finishes_the_turn(engine) -> None:
    conv = engine.new_conversation()
    reply = conv.send("What is the capital of France?", GREEDY)
    assert conv.messages[-1].role == "user" and reply.stats is None
    text = "".join(reply)
    assert "Paris" in text
    assert reply.stats is not None and reply.stats.text == text == conv.messages[-1].content
    assert conv.last_reply == reply.stats and reply.finish() is reply.stats  # idempotent
    assert list(reply) == [] and reply.stats.text == text  # read once


def test_a_reply_read_in_part_is_finished_by_the_next_call(engine) -> None:
    conv = engine.new_conversation()
    reply = conv.send("Count from one to twenty in words.", GREEDY)
    pieces = iter(reply)
    first = next(pieces)
    assert first and reply.stats is None  # still open: the caller may read on
    held = conv.stats().memory_tokens  # the conversation's next call ends the turn first
    assert reply.stats is not None and reply.stats.finish_reason == "cancelled"
    assert conv.messages[-1].content == reply.stats.text and held == conv.held
    assert "".join(conv.send("Thanks!", GREEDY))  # and the chat goes on
    assert [m.role for m in conv.messages[-4:]] == ["user", "assistant", "user", "assistant"]


def test_cancel_stops_a_reply_at_the_next_token(engine) -> None:
    conv = engine.new_conversation()
    reply = conv.send("Write a long story about a lighthouse.", max_tokens=200)
    for i, _ in enumerate(reply):
        if i == 2:
            reply.cancel()
    assert reply.stats.finish_reason == "cancelled" and reply.stats.tokens <= 4


def test_penalties_break_a_greedy_loop(engine) -> None:
    """Greedy decoding on the 135M model repeats itself; the default penalties stop that."""
    prompt = "Write a short poem about the sea."
    plain = SamplingParams(temperature=0.0, max_tokens=160, repeat_penalty=1.0,
                           dry_multiplier=0.0)
    guarded = SamplingParams(temperature=0.0, max_tokens=160)
    looped = engine.new_conversation().send(prompt, plain)
    text = "".join(looped)
    guarded_reply = engine.new_conversation().send(prompt, guarded)
    guarded_text = "".join(guarded_reply)
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) > len(set(lines)), text  # the same line again and again
    guarded_lines = [line for line in guarded_text.splitlines() if line.strip()]
    assert len(guarded_lines) == len(set(guarded_lines)), guarded_text
    with pytest.raises(ValueError):
        SamplingParams(repeat_penalty=0)


def test_a_state_header_with_bounds_outside_its_cells_is_refused() -> None:
    seq = KVSequence(tokens=[1, 2, 3], ends=[1, 2, 3], bounds=[2, 3])
    assert KVSequence.from_header(seq.header(), 16).exchanges == [2, 1]
    bad = {**seq.header(), "bounds": [5]}
    with pytest.raises(StateError, match="bounds"):
        KVSequence.from_header(bad, 16)
    with pytest.raises(StateError, match="fit"):
        KVSequence.from_header(seq.header(), 2)
