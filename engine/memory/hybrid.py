"""`ccm-hybrid`: the most recent exchanges verbatim, the older ones as CCM slots.

The next turn leans most on the last few exchanges, which a window keeps word for word;
what a window forgets, CCM keeps as n <COMP> cells an exchange. So the memory is
`[slots of old exchanges][recent exchanges as text]`, at most `budget` cells after a turn:
the slots hold up to `cap` groups, and the text takes whatever of the budget they leave (at
least `verbatim` cells once the slots are full), so a level holds its whole budget once a
chat is long enough. While the memory is over its budget, the oldest whole exchange held as
text is compressed (its slots see the slots before it and its own text only, as the
compressor was trained); the last exchange stays verbatim when it fits beside the slots.
When the slots pass their cap, the oldest groups go first. Pure CCM (`verbatim=0`) and a
plain window (no slots) are the two ends of this design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ccm_chat.engine.memory.base import MemoryPolicy
from ccm_chat.engine.memory.ccm import drop_oldest_groups, slide_current_text

if TYPE_CHECKING:
    from ccm_chat.engine.kv_memory import KVMemory

# What an exchange of everyday chat takes in the template, for the settings screen's estimate
# (chitchat test split: about 40 tokens; Topical-Chat: about 66).
TYPICAL_EXCHANGE_TOKENS = 50


class HybridPolicy(MemoryPolicy):
    name = "ccm-hybrid"
    reads_finished_exchange = True
    needs_compressor = True
    supersedes = {"ccm-concat": "the saved memory was made by the older pure-CCM memory "
                                "(every exchange compressed at once); this level now keeps "
                                "the latest exchanges verbatim"}

    def __init__(self, n_comp: int, cap: int, verbatim: int, compressor: str = "") -> None:
        if n_comp < 1 or cap < 1 or verbatim < 0:
            raise ValueError("ccm-hybrid needs n_comp >= 1, cap >= 1 and verbatim >= 0.")
        self.n_comp = n_comp
        self.cap = cap  # exchanges held as slots at most
        self.verbatim = verbatim  # text cells held after a turn at most
        self.compressor = compressor  # the weights' fingerprint: part of what a state matches

    def params(self) -> dict[str, Any]:
        return {"n_comp": self.n_comp, "cap": self.cap, "verbatim": self.verbatim,
                "compressor": self.compressor}

    @property
    def budget(self) -> int:
        return self.n_comp * self.cap + self.verbatim

    def after_turn(self, memory: KVMemory) -> None:
        slots = self.n_comp * self.cap
        while memory.held > self.budget and memory.exchanges:
            memory.compress(memory.exchanges[0], max_slots=slots)
        drop_oldest_groups(memory, self.n_comp, memory.slots - slots)

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        """Mid-exchange: compress finished text first, then drop old groups, then slide the
        exchange in progress (a paste longer than the window keeps its end)."""
        while memory.held + needed > capacity and memory.exchanges:
            memory.compress(memory.exchanges[0])
        excess = memory.held + needed - capacity
        if excess > 0 and memory.slots > self.n_comp:
            drop_oldest_groups(memory, self.n_comp, min(excess, memory.slots - self.n_comp))
        return slide_current_text(memory, needed, capacity)

    def describe(self) -> str:
        recent = max(1, self.verbatim // TYPICAL_EXCHANGE_TOKENS)
        return (f"recent exchanges verbatim in what the slots leave (at least "
                f"~{recent}, {self.verbatim} tokens) + up to {self.cap} older exchanges as "
                f"{self.n_comp} <COMP> slot(s) each; {self.budget} cells")
