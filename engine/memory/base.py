"""The interface between memory policies and a conversation's KV memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol


class KVMemory(Protocol):
    """The edits a back end offers a policy, on one conversation's sequence of KV cells.

    Cells are indexed 0..held-1 and their positions stay contiguous: after `evict` the cells
    behind the gap move down so the next token goes at position `held`. A compressing policy
    (CCM) uses one more edit, `compress`: the memory then is `slots` <COMP> cells at the front,
    followed by text: the finished exchanges still held verbatim (`exchanges`), then the
    exchange in progress.
    """

    @property
    def held(self) -> int: ...

    @property
    def slots(self) -> int:
        """<COMP> cells held (at the front)."""
        ...

    @property
    def exchanges(self) -> list[int]:
        """Cells of each finished exchange held as text after the slots, oldest first."""
        ...

    def compress(self, cells: int | None = None, merge: bool = False,
                 max_slots: int | None = None) -> None:
        """Run the <COMP> slots over the first `cells` text cells after the slots (None: all)
        and keep only them in that text's place (merge: fold them into the running mean);
        the oldest whole groups of slots past `max_slots` go in the same step."""

    def evict(self, start: int, end: int) -> None:
        """Drop cells [start, end) and close the gap."""


class MemoryPolicy(ABC):
    """Decides which KV cells a conversation keeps.

    `after_turn` runs when a turn is complete (a reply, or a teacher-forced turn);
    `make_room` runs when the next decode would not fit the context window.
    """

    name: ClassVar[str]
    reads_finished_exchange: ClassVar[bool] = False  # after_turn wants the rendered exchange

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The parameters that make two memories comparable (saved with a state)."""

    @property
    def budget(self) -> int | None:
        """Cells held after a turn at most (None: unbounded)."""
        return None

    @property
    def kept_after_rebuild(self) -> tuple[int, int] | None:
        """(first n, last m) tokens of a transcript that a rebuild decodes, for a policy that
        keeps whole tokens; None: replay the transcript turn by turn through `after_turn`."""
        return None

    def after_turn(self, memory: KVMemory) -> None:  # noqa: B027  (default: keep all)
        """Compress or evict once a turn has finished."""

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        """Free cells so `needed` more fit in `capacity`; False when this policy cannot."""
        return memory.held + needed <= capacity

    def describe(self) -> str:
        return self.name
