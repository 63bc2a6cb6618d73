"""The interface every memory policy implements, and what each declares about itself."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    from ccm_chat.engine.kv_memory import KVMemory


class MemoryPolicy(ABC):
    """Decides which KV cells a conversation keeps.

    `after_turn` runs when a turn is complete (a reply, or a teacher-forced turn);
    `make_room` runs when the next decode would not fit the context window. Both edit the
    conversation's memory through its handle (engine.kv_memory.KVMemory). What a policy
    needs, and how its memory is rebuilt, it declares below: no caller matches its name.
    """

    name: ClassVar[str]
    reads_finished_exchange: ClassVar[bool] = False  # after_turn wants the rendered exchange
    needs_compressor: ClassVar[bool] = False  # runs a trained CCM compressor (engine.ccm)
    merges: ClassVar[bool] = False  # averages cells into others (a context's `merges`)
    # how a rebuild recomputes the memory from the messages: "prefill" (every token, one
    # batch), "kept" (only the tokens `kept_after_rebuild` names, one batch) or "replay"
    # (turn by turn through `after_turn`, as if chatted live)
    rebuilds: ClassVar[Literal["prefill", "kept", "replay"]] = "replay"
    # methods this one replaces at the same level, and why a memory saved by one of them
    # cannot serve (app.resume says so)
    supersedes: ClassVar[dict[str, str]] = {}

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
        keeps whole tokens (`rebuilds` "kept"); None otherwise."""
        return None

    def after_turn(self, memory: KVMemory) -> None:  # noqa: B027  (default: keep all)
        """Compress or evict once a turn has finished."""

    def make_room(self, memory: KVMemory, needed: int, capacity: int) -> bool:
        """Free cells so `needed` more fit in `capacity`; False when this policy cannot."""
        return memory.held + needed <= capacity

    def describe(self) -> str:
        return self.name
