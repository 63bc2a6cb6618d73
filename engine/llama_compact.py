"""Compaction of a llama.cpp cache after an edit: the state round trip that makes the cache
what a save of it would restore, and the state copies between two contexts it runs on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import llama_cpp
import numpy as np

from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.host_buffer import HostBuffer
from ccm_chat.engine.llama_context import SEQ

if TYPE_CHECKING:
    from ccm_chat.engine.llama_backend import LlamaContext


class Compaction:
    """LlamaContext's compaction (a mixin on engine.llama_context's primitives)."""

    def _init_compaction(self, pin: bool) -> None:
        self._scratch = HostBuffer(pin=pin)  # what states are copied through

    def compact(self, last_token: int) -> None:
        """Make the cache after an eviction exactly what a save of it would restore.

        llama.cpp defers a position shift to the next decode, and a state saved before that
        restores wrong; so the last cell is decoded again, which applies it. Then the cache
        is compacted by a state round trip: decoding into the holes an eviction leaves gave
        logits far (up to 20) from the same cache compacted (CPU, llama-cpp-python 0.3.36).
        The last cell is decoded once more in the compacted cache, so its KV and the logits
        that sampling reads next come from there. A <COMP> slot (`last_token` < 0) cannot be
        decoded again: a throwaway token applies the shift instead (the next decode is new
        text, so no logits are needed). Decoding where cells of higher positions, or holes,
        sat before the new ones in the buffer also gave wrong logits (off by up to 24), so
        whatever decodes after an edit comes after a compaction.

        Nothing is done when the edits since the last compaction left no hole and shifted
        nothing (only the tail was removed): the cache is then already what a restore
        gives, and on a GPU the round trip is most of the memory work of a turn.
        """
        if not (self._holes or self._shifted):
            if self._stale and last_token >= 0:  # loaded by a host-made step: its logits
                self._pending = last_token  # when read (after a turn, the next one decodes)
            return
        last = self.pos_max()
        if last_token < 0:
            self._apply_shift()
            self._round_trip()
            return
        self.redecode(last_token, last)
        self._round_trip()
        self.redecode(last_token, last)

    def _apply_shift(self) -> None:
        """Apply a pending position shift with a throwaway token, decoded after the last cell
        and removed again (llama.cpp applies shifts at a decode)."""
        last = self.pos_max()
        self.decode([max(self.model.bos, 0)], last + 1)
        self.remove(last + 1)

    def _round_trip(self) -> None:
        """Save the sequence and load it back: it lands compacted."""
        self._copy_state(self, self)

    def _copy_state(self, source: LlamaContext, target: LlamaContext) -> None:
        """Make target's cache a copy of source's (compacted), through one buffer kept for
        the purpose: no bytes object, no copies of the state in Python."""
        written = self._read_into_scratch(source)
        base = source._base
        target.clear(data=False)
        buf = self._scratch.at_least(written)
        if llama_cpp.llama_state_seq_set_data(target.ptr, buf, written, SEQ) == 0:
            target.clear()
            raise EngineError("llama.cpp rejected its own memory state while copying it.")
        target._base, target._stale = base, True

    def _read_into_scratch(self, source: LlamaContext) -> int:
        size = source.state_size()
        return llama_cpp.llama_state_seq_get_data(source.ptr, self._scratch.at_least(size),
                                                  size, SEQ)

    def _read_state(self, source: LlamaContext) -> np.ndarray:
        """Source's state as bytes in the scratch buffer (valid until it is used again)."""
        return self._scratch.array(self._read_into_scratch(source))

