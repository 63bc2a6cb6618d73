"""`window`: StreamingLLM's attention sinks plus a recent window (Xiao et al., 2023).

The first `sink` tokens stay because attention piles onto them; the most recent `window`
tokens stay because that is what the next turn needs most. The middle is evicted and the
recent tokens are shifted down so positions stay contiguous.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ccm_chat.engine.memory.base import MemoryPolicy

if TYPE_CHECKING:
    from ccm_chat.engine.kv_memory import KVMemory


class WindowPolicy(MemoryPolicy):
    name = "window"
    rebuilds = "kept"

    def __init__(self, sink: int = 4, window: int = 512) -> None:
        if sink < 0 or window < 1:
            raise ValueError("window needs sink >= 0 and window >= 1.")
        self.sink = sink
        self.window = window

    def params(self) -> dict[str, Any]:
        return {"sink": self.sink, "window": self.window}

    @property
    def budget(self) -> int:
        return self.sink + self.window

    @property
    def kept_after_rebuild(self) -> tuple[int, int]:
        return self.sink, self.window

    def after_turn(self, memory: KVMemory) -> None:
        self._trim(memory, self.budget)

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        if memory.held + needed <= capacity:
            return True
        keep = capacity - needed
        if keep < self.sink:
            return False
        self._trim(memory, keep)
        return True

    def _trim(self, memory: KVMemory, keep: int) -> None:
        excess = memory.held - max(keep, self.sink)
        if excess > 0:
            memory.evict(self.sink, self.sink + excess)

    def describe(self) -> str:
        return f"sink {self.sink} + recent window {self.window} tokens"
