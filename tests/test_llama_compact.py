"""llama.cpp's compaction on the real default model: the state round trip runs only when an
edit left a hole or a pending shift, and what it leaves is what a restore gives."""

from __future__ import annotations

import numpy as np

from ccm_chat.engine import Engine


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
