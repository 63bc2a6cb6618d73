"""The CCM step's second ("beside") llama.cpp context, which keeps the compressor's adapter
on, and the KV moves made on a state in host memory (keys re-rotated with llama.cpp's RoPE)
in place of llama.cpp's position shift, where checked against it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ccm_chat.engine.backend import slots_in_place
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.host_buffer import HostBuffer
from ccm_chat.engine.llama_state import FirstKeys, SeqState, same_cells

if TYPE_CHECKING:
    from ccm_chat.engine.llama_backend import LlamaContext

log = logging.getLogger(__name__)

# The largest CCM step run in the second context (LlamaContext.slots_over_text): its cache
# stays allocated at its biggest use, and an 8B model's 4,096 cells take 512 MB.
BESIDE_MAX_CELLS = 4096


@dataclass(frozen=True)
class HostMoved:
    """A CCM step or an eviction made on a state in host memory (LlamaContext._host_moved)."""

    state: np.ndarray  # what llama.cpp loads
    kind: str  # what moved ("up", "down", "drop down", ...): each kind is checked once
    checked: bool  # a step of this kind gave what llama.cpp's shift gives
    up: int  # how far the base moved (LlamaContext._base_step)
    restore: Callable[[], np.ndarray] | None = None  # checked: the source's cells as they were



class HostMoves:
    """LlamaContext's CCM step beside it and its host-side moves (a mixin on
    engine.llama_context's primitives and engine.llama_compact's compaction)."""

    host_rotate_max: int  # HOST_ROTATE_MAX (engine.llama_backend)

    def _init_moves(self, pin: bool, beside: bool, host_moves: bool) -> None:
        self._made = HostBuffer(pin=pin)  # the states made in host memory
        self._beside: LlamaContext | None = None  # see slots_over_text
        self.adapter_beside = beside  # False: toggle the adapter here (bench/turn_profile.py)
        # a CCM step's cells moved in host memory (slots_over_text): None until a step of
        # each kind (moving only the new slots; dropping old ones too) has been checked
        # against llama.cpp's own shift; False: never
        self.moves_on_host: bool | None = None if host_moves else False
        self._moves_checked: set[str] = set()  # kinds checked (see _host_moved)
        self._pristine = FirstKeys()  # cells that move up: their keys as first read

    def slots_over_text(self, vectors: np.ndarray, start: int, end: int,
                        adapter: object, drop: int = 0) -> None:
        """A CCM step (engine.backend.Context's), in a second context that keeps the adapter.

        Any change of a context's adapters makes llama.cpp re-reserve its scheduler (a new
        one, with the graphs and compute buffers of a worst-case batch) before the next
        decode: turning the adapter on for the slots and off after them cost 13-14 ms of
        the <COMP> decode and 16-18 ms of the text decoded after it on an H200, most of a CCM
        level's after-turn work. So a second context of the same model, its adapter left on,
        gets a copy of this cache (which ends at `end`), decodes the slots, and the text
        (and the `drop` oldest cells) goes; this cache takes the result back, compacted. The
        two copies replace the compaction round trip the step needs here anyway. The drop
        and the move are made in host memory on the state on its way back (`_host_moved`);
        where that cannot be, llama.cpp's position shift moves the cells in the second
        context. That context holds as many cells as its biggest use so far (it grows in
        steps), at most BESIDE_MAX_CELLS: a longer step runs here, as does one with a
        position shift pending (which a copy would lose); and if the second context fails
        (no memory for it), every step runs here from then on, as before.
        """
        n = len(vectors)
        touched = False
        if (self.adapter_beside and not self._shifted and self.pos_max() == end - 1
                and end + n <= BESIDE_MAX_CELLS):
            try:
                beside = self._beside_for(end + n, n, adapter)
                self._copy_state(self, beside)
                beside.decode_embeddings(vectors, end, adapter)
                moved = self._host_moved(beside, start, end, drop)
                if moved is not None and moved.checked:
                    if self._loaded(moved.state):
                        return
                    moved = None
                    touched = True  # this cache is empty now: beside's result must land
                # llama.cpp's shift: as the state to check against it has it, else the cells
                # after the gap move down
                up = moved.up if moved else beside._base_step(start, end, drop, False, self.n_ctx)
                beside._shift_gaps(start, end, drop, up)
                beside._apply_shift()
            except EngineError as exc:
                if touched:
                    raise
                log.warning("The CCM step's second context failed (%s): every step runs in "
                            "the chat's own context from now on.", exc)
                self._close_beside()  # this cache is untouched so far
                self.adapter_beside = False
            else:
                self._copy_state(beside, self)
                if moved is not None:
                    self._check_moves(moved)
                return
        slots_in_place(self, vectors, start, end, adapter, drop)

    def close_gaps(self, start: int, end: int, drop: int) -> None:
        """engine.backend.close_gaps, moving the side of the gap with fewer cells (`_base`);
        in host memory, as one state round trip with the compaction it needs anyway, where
        that is checked (`_host_moved`), else by llama.cpp's position shift."""
        base = self._base
        moved = self._host_moved(self, start, end, drop)
        if moved is not None and moved.checked:
            if self._loaded(moved.state):
                self._stale = True
                return
            try:  # the kept cells as they were (the dropped ones gone): the shift does the step
                self.set_state(moved.restore())
            except EngineError as exc:
                raise EngineError("llama.cpp refused a memory state it wrote itself; the "
                                  "chat's memory has to be rebuilt from its messages.") from exc
            self._base = base  # not the first kept cell's: the indices are those before
            moved = None
        # llama.cpp's shift: as the state to check against it has it, else the cells after
        # the gap move down
        up = moved.up if moved else self._base_step(start, end, drop, False, self.n_ctx)
        self._shift_gaps(start, end, drop, up)
        if moved is not None:
            self._apply_shift()
            self._round_trip()
            self._stale = True
            self._check_moves(moved)

    def _base_step(self, start: int, end: int, drop: int, on_host: bool, room: int) -> int:
        """How far `_base` moves when [start, end) and [0, drop) go: by `drop` if the cells
        after the gap move down, by `drop + end - start` if those before it move up
        (whichever are fewer, where the move is made in host memory: llama.cpp's shift costs
        the same for any number, and the cells before a gap would turn at every step, their
        roundings adding up), by -_base (every cell back to 0, once in a long while) where
        a context of `room` cells could then reach past the model's position_limit before
        the next step."""
        held = self.pos_max() + 1
        gap = end - start
        _, up = min((held - end, drop), (start - drop, drop + gap)) if on_host else (0, drop)
        if self._base + up + room > self.model.position_limit:
            return -self._base
        return up

    def _shift_gaps(self, start: int, end: int, drop: int, up: int) -> None:
        """The cells of [start, end) and [0, drop) go, the rest close up by llama.cpp's
        shift (applied at the next decode), and `_base` moves `up`."""
        self.remove(start, end)
        if drop:
            self.remove(0, drop)
        self.shift(drop, start, up - drop)
        self.shift(end, -1, up - drop - (end - start))
        self._base += up

    def _host_moved(self, source: LlamaContext, start: int, end: int,
                    drop: int) -> HostMoved | None:
        """Source's cache as `_shift_gaps(start, end, drop, up)` leaves it, the side of the
        gap with fewer cells moving (`up`: `_base_step`), made as state bytes in host
        memory: the kept cells at their new positions, the moved ones' keys
        re-rotated with llama.cpp's RoPE angles. None where that cannot be done (then never
        again), or would re-rotate more than HOST_ROTATE_MAX key elements (this step only).

        The first step of its kind (what turned, and whether old cells went) is made on a
        copy, kept beside the source's state for the check against llama.cpp's shift; once
        checked, llama.cpp drops the cells in the source (no shift: nothing moves yet) and
        the state it writes, the kept cells only, is turned in place: no copy of the cells
        in host memory (2,000 cells of a light window are 35 MB)."""
        if self.moves_on_host is False or source._shifted:  # a shift pending: not in a state
            return None
        up = source._base_step(start, end, drop, True, self.n_ctx)
        held = source.pos_max() + 1
        shifts = ((up - drop, start - drop), (up - drop - (end - start), held - end))
        signs = {int(np.sign(d)) for d, cells in shifts if d and cells > 0}
        kind = ("drop " if drop else "") + (" ".join(
            name for name, sign in (("up", 1), ("down", -1)) if sign in signs) or "still")
        checked = bool(self.moves_on_host) and kind in self._moves_checked
        try:
            rope = self.model.rope
            if rope is None:
                raise ValueError("no RoPE to move keys with")
            basis = self.model.key_basis(self.kv_type)
            if checked:
                source.remove(start, end)
                if drop:
                    source.remove(0, drop)
            state = SeqState(self._read_state(source))
            index = state.positions - source._base
            kept = (index >= drop) & ((index < start) | (index >= end))
            new = state.positions + np.where(index < start, shifts[0][0], shifts[1][0])
            turning = np.nonzero(kept & (new != state.positions))[0]
            if len(turning) * state.key_elements > self.host_rotate_max:
                log.debug("A step turning %d keys is left to llama.cpp's shift.", len(turning))
                return None  # this step only
            if not checked:
                keep = np.nonzero(kept)[0]
                rising = keep[new[keep] > state.positions[keep]]
                undo = self._pristine.turn_from_first(state, rising)
                made = state.moved(keep, new[keep], rope, self._made.array, basis)
                undo()
                return HostMoved(made, kind, False, up)
            old = state.positions[turning].copy()
            self._pristine.turn_from_first(state, turning[new[turning] > old])
            state.turn(turning, new[turning], rope, basis)
        except ValueError as exc:
            log.info("KV moves in host memory are off (%s): llama.cpp's shift moves the "
                     "cells from now on.", exc)
            self.moves_on_host = False
            return None

        def restore() -> np.ndarray:  # the cells back where they were, for llama.cpp's shift
            state.turn(turning, old, rope, basis)
            return state.buf
        return HostMoved(state.buf, kind, True, up, restore)

    def _check_moves(self, moved: HostMoved) -> None:
        """Compare a state made in host memory with llama.cpp's, in this cache just now."""
        if same_cells(moved.state, self._read_state(self)):
            self._moves_checked.add(moved.kind)
            self.moves_on_host = True
        else:
            log.warning("KV cells moved in host memory (%s) differ from llama.cpp's shift: "
                        "the shift moves them from now on.", moved.kind)
            self.moves_on_host = False

    def _loaded(self, state: np.ndarray) -> bool:
        """Load state bytes made here; False (and never again) if llama.cpp refuses them."""
        try:
            self.set_state(state)
        except EngineError as exc:
            log.warning("llama.cpp refused a state made in host memory (%s): its shift moves "
                        "the cells from now on.", exc)
            self.moves_on_host = False
            return False
        return True

    def _close_beside(self) -> None:
        if self._beside is not None:
            self._beside.close()
            self._beside = None

    def _beside_for(self, cells: int, n: int, adapter: object) -> LlamaContext:
        """The context beside this one, with room for `cells` and `adapter` on."""
        beside = self._beside
        if beside is None or beside.n_ctx < cells:
            room = min(self.n_ctx, BESIDE_MAX_CELLS, max(512, 1 << (cells - 1).bit_length()))
            self._close_beside()
            beside = type(self)(self.model, n_ctx=room, n_batch=max(n, 32),
                                n_threads=self._n_threads, kv_type=self.kv_type,
                                flash_attn=self.flash_attn, options=self.options)
            beside._keeps_adapter = True
            beside.adapter_beside = False
            self._beside = beside
        beside._use_adapter(adapter)
        return beside
