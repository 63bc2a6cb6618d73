"""The engine on the real embedded default model (SmolLM2-135M-Instruct, CPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ccm_chat.engine import (
    ContextFullError,
    Engine,
    ModelError,
    SamplingParams,
    StateError,
    default_model_path,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)


def reply(conv, text: str, params: SamplingParams = GREEDY) -> str:
    return "".join(conv.send(text, params))


def next_logits(conv) -> np.ndarray:
    """The logits for the first token of the next reply (decodes the pending prompt)."""
    return conv.next_token_logits()


def test_default_model_is_found_through_the_installed_wheel() -> None:
    path = default_model_path()
    assert path.name.endswith(".gguf")
    assert path.stat().st_size > 90_000_000


def test_tokenize_round_trip(real_engine: Engine) -> None:
    model = real_engine.model
    text = "Héllo, wörld! 123 — naïve café"
    tokens = model.tokenize(text.encode(), False, False)
    assert 3 < len(tokens) < len(text)
    assert b"".join(model.piece(t, special=False) for t in tokens).decode() == text


def test_chat_template_comes_from_the_gguf(real_engine: Engine) -> None:
    conv = real_engine.new_conversation(system="Be brief.")
    conv.add_turn("user", "Hi", decode=False)
    text = real_engine.model.render_chat(conv.messages, add_assistant=True).decode()
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_answers_capital_of_france(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    assert "Paris" in reply(conv, "What is the capital of France?")
    assert conv.last_reply.finish_reason == "stop"


def test_streams_pieces_that_make_up_the_reply(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    pieces = list(conv.send("Count from one to five.", GREEDY))
    assert len(pieces) > 3
    assert "".join(pieces) == conv.last_reply.text == conv.messages[-1].content
    assert conv.messages[-1].role == "assistant"


def test_second_turn_uses_the_first(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    reply(conv, "What is the capital of France?")
    before = conv.held
    second = reply(conv, "And what is the capital of Germany?")
    assert "Berlin" in second
    assert conv.held > before


def test_max_tokens_stops_the_reply(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    params = SamplingParams(temperature=0.0, max_tokens=5)
    reply(conv, "Write a long story about a dragon.", params)
    assert conv.last_reply.tokens == 5
    assert conv.last_reply.finish_reason == "length"


def test_stop_string_cuts_the_reply_and_memory_follows(real_engine: Engine) -> None:
    question = "What is the capital of France?"
    full = reply(real_engine.new_conversation(), question)
    assert "Paris" in full
    conv = real_engine.new_conversation()
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=("Paris",))
    text = reply(conv, question, params)
    assert text == full[: full.index("Paris")]
    assert conv.last_reply.finish_reason == "stop"
    # the cut reply is what the model sees next: same as a conversation given it directly
    direct = real_engine.new_conversation()
    direct.add_turn("user", question)
    direct.add_turn("assistant", text)
    for c in (conv, direct):
        c.add_turn("user", "Thanks.", decode=False)
    np.testing.assert_allclose(next_logits(conv), next_logits(direct), atol=1e-3)


def test_cancel_event_stops_between_tokens(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    cancel = threading.Event()
    pieces = []
    for piece in conv.send("Write a long story about a dragon.", GREEDY, cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert conv.last_reply.finish_reason == "cancelled"
    assert conv.last_reply.interrupted
    assert conv.messages[-1].content == "".join(pieces)
    assert conv.last_reply.tokens == 3


def test_closing_the_stream_keeps_the_partial_reply(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    stream = conv.send("Write a long story about a dragon.", GREEDY)
    first = [next(stream), next(stream)]
    stream.close()
    assert conv.messages[-1].content == "".join(first)
    assert conv.last_reply.finish_reason == "cancelled"
    # and the conversation goes on
    assert reply(conv, "What is the capital of France?")


def test_seeded_sampling_is_reproducible(real_engine: Engine) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=20)
    a = reply(real_engine.new_conversation(), "Tell me about cats.", params)
    b = reply(real_engine.new_conversation(), "Tell me about cats.", params)
    assert a == b


def test_score_prefers_the_right_answer_and_leaves_memory_alone(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    conv.add_turn("user", "What is the capital of France?")
    right = conv.score("The capital of France is Paris.")
    wrong = conv.score("The capital of France is Madrid.")
    assert 0 < right < wrong
    assert conv.score("The capital of France is Paris.") == pytest.approx(right, abs=1e-4)
    fresh = real_engine.new_conversation()
    fresh.add_turn("user", "What is the capital of France?")
    assert conv.messages == fresh.messages
    assert "".join(conv.generate(GREEDY)) == "".join(fresh.generate(GREEDY))


def test_score_matches_teacher_forced_logits(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    conv.add_turn("user", "Name a color.")
    nll = conv.score("Blue")
    model = real_engine.model
    first = model.tokenize(b"Blue", False, False)
    assert len(first) == 1
    logits = next_logits(conv).astype(np.float64)
    expected = np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[first[0]]
    assert nll == pytest.approx(expected, rel=1e-4)


def test_stats_count_the_tokens_held(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    reply(conv, "Hi!")
    stats = conv.stats()
    assert stats.method == "full"
    assert stats.memory_tokens == conv.held > 10
    assert stats.full_context_tokens == stats.memory_tokens
    assert stats.ratio == 1.0
    per_token = stats.memory_bytes / stats.memory_tokens
    assert 15_000 < per_token < 30_000  # f16 K and V for 30 layers: about 23 KB a token


def test_conversations_share_the_context_without_mixing(real_engine: Engine) -> None:
    a = real_engine.new_conversation()
    b = real_engine.new_conversation()
    reply(a, "My name is Alice. Remember it.")
    reply(b, "What is the capital of Italy?")
    a.add_turn("user", "What is my name?", decode=False)
    alone = real_engine.new_conversation()
    alone.add_turn("user", "My name is Alice. Remember it.")
    alone.add_turn("assistant", a.messages[2].content)
    alone.add_turn("user", "What is my name?", decode=False)
    np.testing.assert_allclose(next_logits(a), next_logits(alone), atol=1e-3)


def test_truncate_then_generate_regenerates(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    first = reply(conv, "What is the capital of France?")
    conv.truncate(len(conv.messages) - 1)
    again = "".join(conv.generate(GREEDY))
    assert again == first
    assert [m.role for m in conv.messages] == ["system", "user", "assistant"]


def test_save_and_restore_gives_identical_logits_and_continuation(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    reply(conv, "My favourite fruit is mango.")
    blob = conv.save_state()
    restored = real_engine.restore_conversation(blob)
    assert restored.messages == conv.messages
    assert restored.held == conv.held
    for c in (conv, restored):
        c.add_turn("user", "What is my favourite fruit?", decode=False)
    np.testing.assert_allclose(next_logits(restored), next_logits(conv), atol=1e-4)
    assert "".join(restored.generate(GREEDY)) == "".join(conv.generate(GREEDY))


def test_restore_does_not_prefill(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    reply(conv, "Tell me a fact about the moon.")
    restored = real_engine.restore_conversation(conv.save_state())
    restored.add_turn("user", "Another one?", decode=False)
    list(restored.generate(SamplingParams(temperature=0, max_tokens=2)))
    delta = restored.last_reply.prompt_tokens
    fresh_prompt = len(real_engine.model.tokenize(
        real_engine.model.render_chat(restored.messages[:-1], True), True, True))
    assert 0 < delta < fresh_prompt / 3  # only the new turn was decoded


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-200], "truncated|corrupt"),
        (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "corrupt"),
        (lambda b: b[: len(b) // 2] + b"\x00" * 7 + b[len(b) // 2 + 7 :], "corrupt"),
        (lambda b: b"NOTSTATE" + b[8:], "Not a ccm-chat memory state"),
        (lambda b: b"", "Not a ccm-chat memory state"),
    ],
)
def test_damaged_state_is_refused(real_engine: Engine, damage, message) -> None:
    conv = real_engine.new_conversation()
    reply(conv, "Hello!")
    with pytest.raises(StateError, match=message):
        real_engine.restore_conversation(damage(conv.save_state()))


def test_a_payload_the_context_rejects_leaves_the_live_chat_whole(real_engine: Engine) -> None:
    """A state whose envelope checks out but whose KV bytes llama.cpp refuses: the restore
    fails, and the conversation that held the context (parked for it) still has its memory."""
    from ccm_chat.engine.state_blob import StateBlob

    live = real_engine.new_conversation()
    reply(live, "Hello!")
    before = live.next_token_logits()
    blob = StateBlob.from_bytes(live.save_state())
    header = {k: v for k, v in blob.header.items() if k not in ("format", "payload_len")}
    garbage = StateBlob(header, b"\x07" * len(blob.payload)).to_bytes()
    with pytest.raises(StateError):
        real_engine.restore_conversation(garbage)
    np.testing.assert_allclose(live.next_token_logits(), before, atol=1e-4)


def test_state_from_another_model_is_refused(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    reply(conv, "Hello!")
    blob = conv.save_state()
    real_engine._fingerprint = "0" * 64
    try:
        with pytest.raises(StateError, match="another model"):
            real_engine.restore_conversation(blob)
    finally:
        real_engine._fingerprint = None


def test_context_full_is_a_clear_error(real_engine: Engine) -> None:
    conv = real_engine.new_conversation()
    huge = "word " * 3000
    with pytest.raises(ContextFullError, match="context window"):
        reply(conv, huge)
    # the conversation can still be reset and used
    conv.truncate(1)
    assert "Paris" in reply(conv, "What is the capital of France?")


def test_missing_model_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found.*embedded default"):
        Engine.load(model=tmp_path / "nope.gguf")


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        Engine.load(model=path)


def test_corrupt_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(default_model_path().read_bytes()[:2_000_000])
    with pytest.raises(ModelError, match="could not load"):
        Engine.load(model=path)


def test_model_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="folder"):
        Engine.load(model=tmp_path)


def test_model_from_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CCM_CHAT_MODEL", str(tmp_path / "env.gguf"))
    with pytest.raises(ModelError, match="env.gguf"):
        Engine.load()
