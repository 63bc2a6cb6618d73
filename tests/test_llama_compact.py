"""llama.cpp's compaction on the real default model: the state round trip runs only when an
edit left a hole or a pending shift, and what it leaves is what a restore gives."""

from __future__ import annotations

import numpy as np
import pytest

from ccm_chat.engine import Engine
from tests.host_moves import ALL_KINDS, kl, refuse_first_load


def test_the_round_trip_runs_only_after_a_hole_or_a_shift(real_engine: Engine) -> None:
    ctx, model = real_engine.ctx, real_engine.model
    if real_engine._active is not None:
        real_engine.release(real_engine._active)  # this test drives the shared context
    toks = model.tokenize(b"The quick brown fox jumps over the lazy dog. " * 4, False, False)
    toks = toks[:40]
    trips: list[int] = []
    original = ctx._round_trip
    ctx._round_trip = lambda: (trips.append(ctx.pos_max()), original())[1]
    try:
        ctx.clear()
        ctx.decode(toks, 0)
        ctx.remove(30)  # only the tail: no hole, nothing shifted
        ctx.compact(toks[29])
        assert trips == []
        ctx.remove(4, 10)  # a hole, and the cells after it shifted down
        ctx.shift(10, -1, -6)
        ctx.compact(toks[29])
        assert trips == [23] and ctx.pos_max() == 23
        ctx.compact(toks[29])  # compacted already: nothing left to do
        assert trips == [23]
        live = ctx.logits(-1)
        state = ctx.get_state()
        ctx.set_state(state)
        ctx.redecode(toks[29], 23)
        np.testing.assert_array_equal(live, ctx.logits(-1))
        assert ctx.get_state() == state
    finally:
        ctx._round_trip = original
        ctx.clear()


@pytest.mark.parametrize(("start", "end", "drop"), [(0, 16, 0), (10, 20, 4), (4, 20, 0)])
def test_a_refused_in_place_move_goes_by_llama_cpps_shift(real_engine: Engine, start, end,
                                                           drop, monkeypatch) -> None:
    """A step of a checked kind is turned in place on the state llama.cpp writes once the
    cells are dropped; if llama.cpp refused to load it, the cells go back and its shift
    makes the same cache (at the positions a shift gives)."""
    ctx, model = real_engine.ctx, real_engine.model
    if real_engine._active is not None:
        real_engine.release(real_engine._active)  # this test drives the shared context
    toks = model.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8, False, False)
    toks = toks[:60]
    kept = toks[drop:start] + toks[end:]
    rows, refusals = [], []
    for refuse in (False, True):
        monkeypatch.setattr(ctx, "moves_on_host", True)
        monkeypatch.setattr(ctx, "_moves_checked", ALL_KINDS)
        if refuse:
            refusals = refuse_first_load(ctx, monkeypatch)
        ctx.clear()
        ctx.decode(toks, 0)
        ctx.close_gaps(start, end, drop)
        ctx.compact(kept[-1])
        assert (ctx.pos_min(), ctx.pos_max()) == (0, len(kept) - 1)
        rows.append(ctx.logits(-1))
        assert ctx.moves_on_host is not refuse  # a refusal: llama.cpp's shift from then on
        monkeypatch.undo()
    assert refusals
    assert kl(*rows) < 0.02  # in host memory against llama.cpp's shift
    ctx.clear()


def test_each_llama_optimisation_has_its_own_switch(real_engine: Engine) -> None:
    """engine.llama_options: every optimisation on by default, and each one off alone."""
    from ccm_chat.engine import LlamaOptions
    from ccm_chat.engine.llama_backend import LlamaContext

    model = real_engine.model
    default = LlamaContext(model, n_ctx=256)
    off = LlamaContext(model, n_ctx=256, options=LlamaOptions(
        beside_context=False, host_moves=False, defer_moved_text=not model.offloaded,
        pinned_buffers=False))
    try:
        assert default.adapter_beside is True and default.moves_on_host is None
        assert default.batches_cheaply is model.offloaded
        assert off.adapter_beside is False and off.moves_on_host is False
        assert off.batches_cheaply is not model.offloaded
        off._scratch.at_least(16)
        assert not off._scratch.pinned
    finally:
        default.close()
        off.close()
