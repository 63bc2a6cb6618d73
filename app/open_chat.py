"""One open chat's state in this window: its memory in the engine, how far that memory and the
view are in step with the stored transcript, whether another window holds it, and a reply
the store has not taken yet. ChatService keeps one OpenChat per chat it has touched."""

from __future__ import annotations

from dataclasses import dataclass

from ccm_chat.app.engine_api import EngineConversation
from ccm_chat.app.resume import ResumeReport
from ccm_chat.engine import MemoryStats
from ccm_chat.storage import MessageRecord

Signature = tuple[int, int, int]  # Store.transcript_signature: (count, last id, total length)
NEVER = -1e9  # a monotonic time long past: "never saved"


def signature(messages: list[MessageRecord]) -> Signature:
    """As Store.transcript_signature, from messages already read."""
    return (len(messages), messages[-1].id if messages else 0,
            sum(len(m.content) for m in messages))


@dataclass(frozen=True)
class UnsavedReply:
    """A generated reply the store has not taken yet, with all it needs to be saved."""

    text: str
    status: str  # complete or interrupted
    tokens: int
    model: str | None
    error: str  # why the last save failed

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


@dataclass
class OpenChat:
    """What this window knows of one chat beyond the store.

    `live`, `report` and `stats` are the chat's memory while it is in the engine (resumed
    on first use, dropped when it no longer follows the transcript). `shown` is the
    transcript's signature as the UI last read it, `synced` as the live memory holds it:
    another window's writes show as a difference."""

    id: int
    live: EngineConversation | None = None
    report: ResumeReport | None = None
    stats: MemoryStats | None = None  # read by the UI thread, never the engine
    shown: Signature | None = None
    synced: Signature | None = None
    read_only: bool = False  # another window holds its lease
    saved_at: float = NEVER  # when its memory was last saved (time.monotonic)
    memory_pending: bool = False  # a reply left its large memory unsaved
    unsaved_reply: UnsavedReply | None = None  # a reply the store refused, kept to be saved

    def in_step(self, stored: list[MessageRecord]) -> bool:
        """Whether the live memory was made from this transcript (no other window wrote)."""
        return self.synced == signature(stored)

    def unload(self) -> None:
        """The engine is gone: so is the memory in it (the rest stays)."""
        self.live = self.report = self.stats = None

    def forget_memory(self) -> EngineConversation | None:
        """Drop the live memory (the next use resumes it from the saved state or the text);
        the memory that was live, for the engine to release."""
        live = self.live
        self.unload()
        self.synced = None
        self.memory_pending = False
        return live

    def holds_reply(self, kept: UnsavedReply) -> bool:
        """Whether the live memory ends with this reply (not re-read from the store since)."""
        messages = self.live.messages if self.live is not None else []
        last = messages[-1] if messages else None
        return last is not None and last.role == "assistant" and last.content == kept.text
