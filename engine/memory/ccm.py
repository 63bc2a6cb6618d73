"""`ccm-concat` and `ccm-merge`: Compressed Context Memory (Kim et al., ICLR 2024).

After each finished exchange the conversation runs the trained <COMP> slots through the
adapter and keeps only their keys and values (`KVMemory.compress`). Concat keeps n slots per
exchange, up to `cap` groups, dropping the oldest group first; merge folds each exchange's
slots into a running mean of n slots. A rebuild replays the transcript exchange by exchange.
"""

from __future__ import annotations

from typing import Any

from engine.memory.base import KVMemory, MemoryPolicy


class CCMPolicy(MemoryPolicy):
    name = "ccm-concat"
    reads_finished_exchange = True

    def __init__(self, n_comp: int, cap: int = 512, compressor: str = "") -> None:
        if n_comp < 1 or cap < 1:
            raise ValueError("CCM needs n_comp >= 1 and cap >= 1.")
        self.n_comp = n_comp
        self.cap = cap
        self.compressor = compressor  # the weights' fingerprint: part of what a state matches

    def params(self) -> dict[str, Any]:
        return {"n_comp": self.n_comp, "cap": self.cap, "compressor": self.compressor}

    @property
    def budget(self) -> int:
        return self.n_comp * self.cap

    def after_turn(self, memory: KVMemory) -> None:
        memory.compress()
        self._drop_oldest(memory, memory.slots - self.budget)

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        """Only whole old groups can go; the exchange in progress stays until compressed."""
        excess = memory.held + needed - capacity
        if excess <= 0:
            return True
        if excess > memory.slots - self.n_comp:
            return False
        self._drop_oldest(memory, excess)
        return True

    def _drop_oldest(self, memory: KVMemory, cells: int) -> None:
        if cells > 0:
            groups = -(-cells // self.n_comp)
            memory.evict(0, groups * self.n_comp)

    def describe(self) -> str:
        return (f"trained compressor, {self.n_comp} <COMP> slot(s) per exchange, "
                f"up to {self.cap} exchanges")


class CCMMergePolicy(CCMPolicy):
    name = "ccm-merge"

    def __init__(self, n_comp: int, cap: int = 1, compressor: str = "") -> None:
        super().__init__(n_comp, 1, compressor)

    def after_turn(self, memory: KVMemory) -> None:
        memory.compress(merge=True)

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        return memory.held + needed <= capacity

    def describe(self) -> str:
        return f"trained compressor, a running mean of {self.n_comp} <COMP> slot(s)"
