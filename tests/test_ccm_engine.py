"""CCM in the engine: the shipped compressor for the default model, on both back ends (CPU).

A conversation under a level that picks CCM keeps n <COMP> slots per finished exchange and
none of the exchange's text; what it keeps still answers a question about an early turn.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ccm_chat.engine import CompressionConfig, Engine, llama_backend
from ccm_chat.engine.ccm.files import compressor_dirs, find_compressor
from ccm_chat.engine.errors import EngineError
from tests.device import TEST_DEVICE
from tests.host_moves import ALL_KINDS, refuse_first_load

FACT = ("I have a dog called Pixel.", "Nice, thanks for telling me!")
FILLER = ("What should I cook tonight?", "How about a simple pasta with tomatoes and basil?")
QUESTION = "What is my dog called?"
ANSWERS = ("Your dog is called Pixel.", "Your dog is called Biscuit.",
           "Your dog is called Rocket.")


@pytest.fixture(scope="module")
def ccm_llama() -> Iterator[Engine]:
    with Engine.load(n_ctx=1024, device=TEST_DEVICE, compression="balanced") as eng:
        yield eng


@pytest.fixture(scope="module")
def ccm_hf(hf_engine) -> Iterator[Engine]:
    with Engine.load(backend="hf", n_ctx=1024, device="cpu", compression="balanced",
                     cache_dir=hf_engine.model.cache_dir) as eng:
        yield eng


def n_comp(engine: Engine) -> int:
    return engine.ccm.files.n_comp


def pure_ccm(engine: Engine, level: str = "balanced") -> CompressionConfig:
    """Pure CCM-concat (every exchange compressed at once) with the level's slot budget."""
    files = engine.ccm.files
    return CompressionConfig(level, "ccm-concat",
                             {"n_comp": files.n_comp, "cap": 512 // files.n_comp,
                              "compressor": files.fingerprint}, "f16")


def chat(engine: Engine, *exchanges: tuple[str, str], config=None):
    conv = engine.new_conversation(compression=config or pure_ccm(engine))
    conv.recall = False  # these read what the slots hold; recall: tests/test_recall.py
    for user, assistant in exchanges:
        conv.add_turn("user", user)
        conv.add_turn("assistant", assistant)
    return conv


def scores(conv) -> list[float]:
    conv.recall = False  # a restored conversation recalls by default, as the app's does
    conv.add_turn("user", QUESTION, decode=False)
    return [conv.score(a) for a in ANSWERS]


def test_the_shipped_compressor_serves_the_levels_of_the_default_model(ccm_llama) -> None:
    files = find_compressor(ccm_llama.fingerprint)
    assert files is not None and files.folder.parent == compressor_dirs()[-1]  # shipped
    assert files.card["steps"] > 0 and "held_apart_reply_nll_after" in files.card
    budgets = []
    for level, cells in (("light", 2048), ("balanced", 512), ("aggressive", 128)):
        config = ccm_llama.compression_for(level)
        assert config.method == "ccm-hybrid" and config.kv_type == "f16"
        policy = config.policy()
        assert policy.budget <= cells and policy.verbatim > 0 and policy.cap >= 1
        assert "trained CCM compressor" in config.describe()
        budgets.append((policy.budget, policy.verbatim, policy.cap))
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 3
    # a model without one falls back to the training-free policy and says why
    fallback = CompressionConfig.for_level("balanced")
    assert fallback.method == "window" and "no trained CCM compressor" in fallback.reason


@pytest.mark.parametrize("backend", ["llamacpp", "hf"])
def test_ccm_memory_keeps_slots_and_still_recalls(backend, ccm_llama, ccm_hf) -> None:
    engine = ccm_llama if backend == "llamacpp" else ccm_hf
    conv = chat(engine, FACT, FILLER)
    stats = conv.stats()
    assert stats.method == "ccm-concat"
    assert stats.memory_tokens == 2 * n_comp(engine)  # n slots per exchange, no text
    assert stats.full_context_tokens > 60 and stats.ratio > 30 / n_comp(engine)
    right, *wrong = scores(conv)
    # measured 0.69 vs 1.67 with the n = 2 compressor (0.13 vs 2.3 with the old n = 1)
    assert right < min(wrong) - 0.5, (right, wrong)
    # and the memory is what carries it: with no slots the name is a guess
    bare = engine.new_conversation(compression=engine.compression_for("off"))
    assert scores(bare)[0] > right + 1.0


def test_llama_cpp_and_transformers_keep_the_same_memory(ccm_llama, ccm_hf) -> None:
    """The exported GGUF adapter and the PyTorch LoRA leave memories that score alike."""
    ll, hf = scores(chat(ccm_llama, FACT, FILLER)), scores(chat(ccm_hf, FACT, FILLER))
    # measured 0.133 / 2.462 / 2.283 (llama.cpp, Q4_1) vs 0.144 / 2.450 / 2.221 (float32)
    assert all(abs(a - b) < 0.2 for a, b in zip(ll, hf, strict=True)), (ll, hf)


@pytest.mark.parametrize("backend", ["llamacpp", "hf"])
def test_ccm_state_restores_exactly(backend, ccm_llama, ccm_hf) -> None:
    engine = ccm_llama if backend == "llamacpp" else ccm_hf
    conv = chat(engine, FACT, FILLER)
    restored = engine.restore_conversation(conv.save_state())
    assert restored.stats() == conv.stats()
    assert scores(restored) == pytest.approx(scores(conv), abs=1e-5)
    # and it goes on compressing after the restore
    restored.messages.pop()
    restored.add_turn("user", "Thanks!")
    restored.add_turn("assistant", "You're welcome.")
    assert restored.stats().memory_tokens == 3 * n_comp(engine)


def test_concat_cap_drops_the_oldest_exchange_first(ccm_llama) -> None:
    capped = pure_ccm(ccm_llama)
    capped = CompressionConfig(capped.level, capped.method, {**capped.params, "cap": 2},
                               capped.kv_type)
    conv = chat(ccm_llama, FACT, FILLER, FILLER, config=capped)
    assert conv.stats().memory_tokens == 2 * n_comp(ccm_llama)
    assert conv.stats().full_context_tokens > 80
    # the fact's own slot went first: the name is held much less surely (later slots read
    # the earlier ones, so some of it lives on; measured NLL 1.54 against 0.13 uncapped)
    uncapped = scores(chat(ccm_llama, FACT, FILLER, FILLER))[0]
    assert scores(conv)[0] > uncapped + 0.5
    # generation continues past the cap
    reply = "".join(conv.generate(max_tokens=8, temperature=0))
    assert reply and conv.stats().memory_tokens == 2 * n_comp(ccm_llama)


def test_a_generated_reply_is_compressed_with_its_end_of_turn(ccm_llama) -> None:
    conv = ccm_llama.new_conversation(compression=pure_ccm(ccm_llama))
    reply = "".join(conv.send("Say hello.", max_tokens=12, temperature=0))
    assert reply and conv.stats().memory_tokens == n_comp(ccm_llama)
    assert conv.memory_view().rendered.endswith(b"<|im_end|>\n")  # the marker went in first
    twin = chat(ccm_llama, ("Say hello.", reply))
    assert twin.stats() == conv.stats()
    # the same text, though sampled tokens may split it otherwise than the tokenizer does
    # (measured 0.05 apart)
    assert scores(twin) == pytest.approx(scores(conv), abs=0.15)


def merge_copy(tmp_path: Path) -> Path:
    """The shipped weights under a merge card: exercises the merge memory's mechanics."""
    files = find_compressor(_fingerprint())
    folder = tmp_path / "merge"
    shutil.copytree(files.folder, folder)
    card = json.loads((folder / "compressor.json").read_text())
    (folder / "compressor.json").write_text(json.dumps({**card, "method": "merge"}))
    return folder


def _fingerprint() -> str:
    from ccm_chat.engine.models import default_model_path, model_fingerprint

    return model_fingerprint(default_model_path())


def test_ccm_merge_runs_on_transformers_and_is_refused_on_llama_cpp(tmp_path, hf_engine,
                                                                     ccm_llama) -> None:
    folder = merge_copy(tmp_path)
    with Engine.load(backend="hf", n_ctx=1024, device="cpu", compression="balanced",
                     cache_dir=hf_engine.model.cache_dir, compressor=folder) as eng:
        assert eng.compression.method == "ccm-merge"
        conv = chat(eng, FACT, FILLER, FILLER, config=eng.compression)
        assert conv.stats().memory_tokens == n_comp(eng)  # a running mean of n slots
        restored = eng.restore_conversation(conv.save_state())
        assert scores(restored) == pytest.approx(scores(conv), abs=1e-5)
    merge = CompressionConfig("balanced", "ccm-merge", pure_ccm(ccm_llama).params, "f16")
    with pytest.raises(ValueError, match="not available on the llama.cpp back end"):
        ccm_llama.new_conversation(compression=merge)


def test_a_reply_that_fills_the_context_is_kept_and_compressed() -> None:
    """No old group to drop: the reply slides through the context (its oldest text goes
    first), is kept whole, the exchange is still compressed, and the chat goes on."""
    with Engine.load(n_ctx=128, device=TEST_DEVICE, compression="balanced") as eng:
        conv = eng.new_conversation(compression=pure_ccm(eng))
        reply = "".join(conv.send("Write a very long story about a dragon.", max_tokens=400,
                                  temperature=0))
        assert conv.last_reply.finish_reason == "length" and conv.last_reply.tokens == 400
        assert conv.messages[-1].content == reply
        assert conv.stats().memory_tokens == n_comp(eng)
        assert "".join(conv.send("Thanks!", max_tokens=5, temperature=0))
        assert conv.stats().memory_tokens <= 2 * n_comp(eng)


@pytest.mark.parametrize("level", ["pure", "aggressive"])
def test_slots_decoded_beside_keep_the_memory_toggling_the_adapter_keeps(ccm_llama, level,
                                                                          monkeypatch) -> None:
    """llama.cpp runs a CCM step in a second context that keeps the adapter on (an adapter
    change re-reserves a context's scheduler); the memory is the one toggling the adapter in
    the chat's own context gives, and that context's adapter is never set."""
    config = pure_ccm(ccm_llama) if level == "pure" else ccm_llama.compression_for(level)
    ctx = ccm_llama.ctx
    # long enough for the aggressive level, which holds its whole budget, to compress
    exchanges = (FACT, *[FILLER] * 6, ("And tomorrow?", "Maybe a curry with rice."))
    toggled: list[object] = []
    original = ctx._use_adapter
    monkeypatch.setattr(ctx, "_use_adapter", lambda a: (toggled.append(a), original(a))[1])
    memories = {}
    monkeypatch.setattr(ctx, "moves_on_host", False)  # llama.cpp's own shift, as in place
    for beside in (False, True):
        toggled.clear()
        monkeypatch.setattr(ctx, "adapter_beside", beside)
        conv = chat(ccm_llama, *exchanges, config=config)
        memories[beside] = (conv.memory_view().tokens, scores(conv), conv.stats())
        assert any(a is not None for a in toggled) is not beside, toggled
    (toks_in, scores_in, stats_in), (toks_beside, scores_beside, stats_beside) = (
        memories[False], memories[True])
    assert stats_beside.method == config.method and stats_beside.memory_tokens > 0
    assert stats_beside.memory_tokens < stats_beside.full_context_tokens  # it compressed
    assert toks_beside == toks_in and stats_beside == stats_in
    assert scores_beside == pytest.approx(scores_in, abs=1e-3), (scores_beside, scores_in)
    assert ctx._beside is not None and ctx._beside.n_ctx < ctx.n_ctx  # sized to its use
    assert ctx._adapter is None  # the chat's context decodes text without the LoRA


CAPPED_EXCHANGES = (FACT, FILLER, FILLER, ("And tomorrow?", "Maybe a curry with rice."), FILLER)


def capped(engine: Engine) -> CompressionConfig:
    """Pure CCM holding two groups: from the third exchange on a step drops one too."""
    return CompressionConfig("aggressive", "ccm-concat", {
        "n_comp": n_comp(engine), "cap": 2, "compressor": engine.ccm.files.fingerprint}, "f16")


def unchecked(ctx, monkeypatch) -> None:
    monkeypatch.setattr(ctx, "moves_on_host", None)
    monkeypatch.setattr(ctx, "_moves_checked", set())


def test_cells_moved_in_host_memory_are_what_llama_cpps_shift_makes(ccm_llama,
                                                                    monkeypatch) -> None:
    """The step's drop and move are made on the state on its way back, not by llama.cpp's
    position shift; checked against that shift at every step here (the app checks the first
    step of each kind: one that moves the new slots only, one that drops old ones too)."""
    ctx = ccm_llama.ctx
    checks: list[bool | None] = []
    step = type(ctx).slots_over_text

    def checked(self, *args) -> None:
        self.moves_on_host, self._moves_checked = None, set()
        step(self, *args)
        checks.append(self.moves_on_host)

    monkeypatch.setattr(type(ctx), "slots_over_text", checked)
    moved = chat(ccm_llama, *CAPPED_EXCHANGES, config=capped(ccm_llama))
    assert checks == [True] * len(CAPPED_EXCHANGES), checks
    assert moved.kv.groups == len(CAPPED_EXCHANGES) and moved.slots == 2 * n_comp(ccm_llama)


def test_a_chat_on_host_moved_cells_reads_as_one_on_llama_cpps_shift(ccm_llama,
                                                                      monkeypatch) -> None:
    ctx = ccm_llama.ctx
    unchecked(ctx, monkeypatch)
    moved = chat(ccm_llama, *CAPPED_EXCHANGES, config=capped(ccm_llama))
    # the first step moves nothing (no slots before the text: the base moves instead);
    # later ones turn only the new slots' keys, with an old group dropped once capped
    assert ctx.moves_on_host is True and ctx._moves_checked == {"still", "down", "drop down"}
    monkeypatch.setattr(ctx, "moves_on_host", False)
    shifted = chat(ccm_llama, *CAPPED_EXCHANGES, config=capped(ccm_llama))
    assert moved.memory_view() == shifted.memory_view()
    # the keys rounded to f16 by two different rotations, step after step: this model's
    # scores moved by up to 0.062 nats from that
    assert scores(moved) == pytest.approx(scores(shifted), abs=0.1)


def test_a_state_made_in_host_memory_that_llama_cpp_refuses_falls_back(ccm_llama,
                                                                        monkeypatch) -> None:
    ctx = ccm_llama.ctx
    monkeypatch.setattr(ctx, "moves_on_host", False)
    shifted = scores(chat(ccm_llama, FACT, FILLER))
    monkeypatch.setattr(ctx, "moves_on_host", True)
    monkeypatch.setattr(ctx, "_moves_checked", ALL_KINDS)
    refused = refuse_first_load(ctx, monkeypatch)
    conv = chat(ccm_llama, FACT, FILLER)
    assert refused and ctx.moves_on_host is False  # not tried again
    assert scores(conv) == shifted  # the step went on with llama.cpp's shift


def test_a_rope_that_does_not_match_llama_cpps_is_not_used(ccm_llama, monkeypatch) -> None:
    ctx = ccm_llama.ctx
    rope = ccm_llama.model.rope
    assert rope is not None
    monkeypatch.setattr(ccm_llama.model, "rope", replace(rope, theta=rope.theta * 2))
    unchecked(ctx, monkeypatch)
    wrong = chat(ccm_llama, FACT, FILLER)
    assert ctx.moves_on_host is False  # the first step that turned keys failed its check
    assert ctx._moves_checked <= {"still", "drop still"}  # none that turned keys was used
    monkeypatch.setattr(ctx, "moves_on_host", False)
    shifted = chat(ccm_llama, FACT, FILLER)
    # a step that turned nothing moved the positions up (the same distances): noise only
    assert scores(wrong) == pytest.approx(scores(shifted), abs=0.1)


def test_a_step_that_would_rotate_many_keys_leaves_them_to_llama_cpp(ccm_llama,
                                                                     monkeypatch) -> None:
    ctx = ccm_llama.ctx
    monkeypatch.setattr(ctx, "moves_on_host", False)
    shifted = scores(chat(ccm_llama, FACT, FILLER))
    unchecked(ctx, monkeypatch)
    monkeypatch.setattr(llama_backend, "HOST_ROTATE_MAX", 0)  # any key turned is too many
    limited = scores(chat(ccm_llama, FACT, FILLER))
    assert ctx._moves_checked <= {"still", "drop still"}  # only steps that turned no key
    assert limited == pytest.approx(shifted, abs=0.1)  # positions moved up: noise only


@pytest.mark.parametrize("where", ["making it", "decoding there"])
def test_when_the_second_context_fails_the_step_runs_in_place(ccm_llama, where,
                                                              monkeypatch) -> None:
    ctx = ccm_llama.ctx
    chat(ccm_llama, FACT, FILLER)  # the second context exists now

    def refuse(*args, **kwargs):
        raise EngineError("llama.cpp could not create a context (out of memory?).")

    monkeypatch.setattr(ctx, "moves_on_host", False)  # llama.cpp's shift in both runs
    if where == "making it":
        monkeypatch.setattr(ctx, "_beside_for", refuse)
    else:
        monkeypatch.setattr(ctx._beside, "decode_embeddings", refuse)
    monkeypatch.setattr(ctx, "adapter_beside", True)
    in_place = chat(ccm_llama, FACT, FILLER)
    assert not ctx.adapter_beside and ctx._beside is None  # said once, kept; its memory freed
    assert in_place.stats().memory_tokens == 2 * n_comp(ccm_llama)
    assert ctx._adapter is None  # toggled off again after each step
    reference = scores(in_place)
    monkeypatch.undo()
    monkeypatch.setattr(ctx, "moves_on_host", False)
    conv = chat(ccm_llama, FACT, FILLER)
    assert ctx._beside is not None and conv.stats().memory_tokens == 2 * n_comp(ccm_llama)
    assert scores(conv) == pytest.approx(reference, abs=1e-3)


def test_the_second_context_grows_for_a_long_exchange(ccm_llama) -> None:
    ctx = ccm_llama.ctx
    long_reply = " ".join([FILLER[1]] * 60)  # about 700 tokens: past 512 cells
    conv = chat(ccm_llama, FACT, (FILLER[0], long_reply))
    assert ctx._beside is not None and ctx._beside.n_ctx >= 1024 > 512
    assert conv.stats().memory_tokens == 2 * n_comp(ccm_llama)
    right, *wrong = scores(conv)
    assert right < min(wrong), (right, wrong)
