"""`ccm-concat` and `ccm-merge`: Compressed Context Memory (Kim et al., ICLR 2024).

After each finished exchange the conversation runs the trained <COMP> slots through the
adapter and keeps only their keys and values (`KVMemory.compress`). Concat keeps n slots per
exchange, up to `cap` groups, dropping the oldest group first; merge folds each exchange's
slots into a running mean of n slots. A rebuild replays the transcript exchange by exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ccm_chat.engine.memory.base import MemoryPolicy

if TYPE_CHECKING:
    from ccm_chat.engine.kv_memory import KVMemory


class CCMPolicy(MemoryPolicy):
    name = "ccm-concat"
    reads_finished_exchange = True
    needs_compressor = True

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
        memory.compress(max_slots=self.budget)
        drop_oldest_groups(memory, self.n_comp, memory.slots - self.budget)

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        """Whole old groups go first (one stays); then the exchange in progress slides, so a
        paste longer than the window keeps its end."""
        excess = memory.held + needed - capacity
        if excess > 0 and memory.slots > self.n_comp:
            drop_oldest_groups(memory, self.n_comp, min(excess, memory.slots - self.n_comp))
        return slide_current_text(memory, needed, capacity)

    def describe(self) -> str:
        return (f"trained compressor, {self.n_comp} <COMP> slot(s) per exchange, "
                f"up to {self.cap} exchanges")


def drop_oldest_groups(memory: KVMemory, n_comp: int, cells: int) -> None:
    """Evict the oldest whole groups of slots that cover `cells`."""
    if cells > 0:
        groups = -(-cells // n_comp)
        memory.evict(0, min(memory.slots, groups * n_comp))


def slide_current_text(memory: KVMemory, needed: int, capacity: int) -> bool:
    """Evict the oldest text after the slots so `needed` more cells fit; one cell stays."""
    excess = memory.held + needed - capacity
    if excess <= 0:
        return True
    if excess > memory.held - memory.slots - 1:
        return False
    memory.evict(memory.slots, memory.slots + excess)
    return True


class CCMMergePolicy(CCMPolicy):
    name = "ccm-merge"
    merges = True

    def __init__(self, n_comp: int, cap: int = 1, compressor: str = "") -> None:
        super().__init__(n_comp, 1, compressor)

    def after_turn(self, memory: KVMemory) -> None:
        memory.compress(merge=True)

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        return slide_current_text(memory, needed, capacity)

    def describe(self) -> str:
        return f"trained compressor, a running mean of {self.n_comp} <COMP> slot(s)"
