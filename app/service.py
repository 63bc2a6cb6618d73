"""ChatService: the one place where the engine and the store meet.

The transcript in SQLite is the source of truth; an engine conversation is resumed from the
saved memory (or rebuilt from the transcript) on first use and kept in step afterwards. A user
message is committed before the model runs; the reply is committed when it ends, marked
interrupted when it was stopped, and then the memory is saved. One lock serializes engine use:
the engine has one context, shared by every conversation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from app.engine_api import EngineConversation, EngineLike, Progress
from app.export import export_conversation
from app.resume import ResumeReport, resume, save_memory
from app.settings import Settings
from engine import (
    Engine,
    EngineError,
    MemoryStats,
    SamplingParams,
)
from storage import ConversationRecord, MessageRecord, SearchHit, StorageError, Store

TITLE_LENGTH = 48


EngineFactory = Callable[[Settings, str | None], EngineLike]


def load_engine(settings: Settings, model_override: str | None) -> EngineLike:
    return Engine.load(
        model=model_override or settings.model_path or None,
        backend=settings.backend,
        compression=settings.compression,
        n_ctx=settings.context_size,
        n_gpu_layers=settings.n_gpu_layers if settings.n_gpu_layers >= 0 else None,
    )


@dataclass(frozen=True)
class Status:
    """What the status bar shows."""

    model: str
    device: str
    level: str
    method: str
    tokens_in_context: int
    context_window: int
    memory_bytes: int
    ratio: float
    tokens_per_second: float | None
    memory_note: str | None = None


def make_title(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1].rstrip() + "…"


class ChatService:
    def __init__(
        self,
        store: Store,
        settings: Settings | None = None,
        engine_factory: EngineFactory = load_engine,
        model_override: str | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or Settings.load(store)
        self._engine_factory = engine_factory
        self._model_override = model_override
        self._engine: EngineLike | None = None
        self._engine_key: tuple[Any, ...] | None = None
        self._live: dict[int, EngineConversation] = {}
        self._reports: dict[int, ResumeReport] = {}
        self._stats: dict[int, MemoryStats] = {}  # read by the UI thread, never the engine
        self.memory_error: str | None = None  # why the last memory save failed, if it did
        self._lock = threading.RLock()
        self._use = threading.RLock()  # held while a conversation's memory is in the engine

    # -- engine ---------------------------------------------------------------------------------

    @property
    def engine(self) -> EngineLike:
        """The loaded engine; (re)loaded when the model settings changed."""
        with self._lock:
            key = (self._model_override, *self.settings.engine_key())
            if self._engine is None or key != self._engine_key:
                self.close_engine()
                self._engine = self._engine_factory(self.settings, self._model_override)
                self._engine_key = key
            return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    def close_engine(self) -> None:
        with self._lock:
            self._live.clear()
            self._reports.clear()
            self._stats.clear()
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def update_settings(self, settings: Settings) -> None:
        settings.save(self.store)
        self.settings = settings  # a new level reloads the engine: memories resume under it

    # -- conversations --------------------------------------------------------------------------

    def list_conversations(self) -> list[ConversationRecord]:
        return self.store.list_conversations()

    def search(self, query: str) -> list[SearchHit]:
        return self.store.search(query)

    def conversation(self, conversation_id: int) -> ConversationRecord:
        return self.store.get_conversation(conversation_id)

    def messages(self, conversation_id: int) -> list[MessageRecord]:
        return self.store.messages(conversation_id)

    def new_conversation(self, title: str = "New chat") -> ConversationRecord:
        model = self._model_override or self.settings.model_path or "default"
        return self.store.create_conversation(
            title=title, model=model, system_prompt=self.settings.system_prompt
        )

    def rename(self, conversation_id: int, title: str) -> ConversationRecord:
        return self.store.rename_conversation(conversation_id, title)

    def delete(self, conversation_id: int) -> None:
        self.store.delete_conversation(conversation_id)
        self._forget(conversation_id)

    def set_system_prompt(self, conversation_id: int, prompt: str) -> ConversationRecord:
        record = self.store.update_conversation(conversation_id, system_prompt=prompt or None)
        self._forget(conversation_id)
        return record

    def _forget(self, conversation_id: int) -> None:
        self._live.pop(conversation_id, None)
        self._reports.pop(conversation_id, None)
        self._stats.pop(conversation_id, None)

    def export(self, conversation_id: int, fmt: str) -> str:
        record = self.store.get_conversation(conversation_id)
        return export_conversation(record, self.store.messages(conversation_id), fmt)

    # -- chatting -------------------------------------------------------------------------------

    def open(self, conversation_id: int, progress: Progress | None = None) -> ResumeReport:
        """Make the conversation's memory ready: restored from its saved state, or rebuilt."""
        with self._use:
            record = self.store.get_conversation(conversation_id)
            self._engine_conversation(record, self.store.messages(conversation_id), progress)
            return self._reports[conversation_id]

    def _engine_conversation(
        self, record: ConversationRecord, messages: list[MessageRecord],
        progress: Progress | None = None,
    ) -> EngineConversation:
        """The live engine conversation for a stored one, resumed if it is not live yet."""
        live = self._live.get(record.id)
        if live is None:
            engine = self.engine
            live, report = resume(
                engine, self.store, record, messages,
                engine.compression_for(self.settings.compression), progress,
            )
            self._live[record.id] = live
            self._reports[record.id] = report
            self._stats[record.id] = live.stats()
            if report.kind == "rebuilt":
                self._save(record.id, messages[-1].id, live)
        return live

    def _save(self, conversation_id: int, message_id: int, live: EngineConversation) -> None:
        """Save the memory; a failure is reported, never raised: the transcript is safe."""
        try:
            save_memory(self.store, self.engine, conversation_id, message_id, live)
            self.memory_error = None
        except (StorageError, EngineError, OSError) as exc:
            self.memory_error = f"Could not save the conversation's memory: {exc}"

    def _params(self) -> SamplingParams:
        s = self.settings
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p)

    def send(
        self, conversation_id: int, text: str, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Commit the user's message, then stream and commit the reply."""
        text = text.strip()
        if not text:
            raise ValueError("Cannot send an empty message.")
        with self._use:
            record = self.store.get_conversation(conversation_id)
            before = self.store.messages(conversation_id)
            self.store.add_message(conversation_id, "user", text)  # kept whatever happens
            if record.title == "New chat" and not any(m.role == "user" for m in before):
                self.store.rename_conversation(conversation_id, make_title(text))
            live = self._engine_conversation(record, before)
            live.add_turn("user", text, decode=False)
            yield from self._stream(conversation_id, live, cancel)

    def regenerate(
        self, conversation_id: int, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Replace the last reply with a new one."""
        with self._use:
            record = self.store.get_conversation(conversation_id)
            stored = self.store.messages(conversation_id)
            if not stored or stored[-1].role != "assistant":
                raise ValueError("There is no reply to regenerate yet.")
            live = self._engine_conversation(record, stored)
            self.store.delete_message(stored[-1].id)
            live.truncate(len(live.messages) - 1)
            yield from self._stream(conversation_id, live, cancel)

    def _stream(
        self, conversation_id: int, live: EngineConversation, cancel: threading.Event | None
    ) -> Iterator[str]:
        before = live.last_reply
        pieces = live.generate(self._params(), cancel)
        try:
            yield from pieces
        finally:
            pieces.close()
            reply = live.last_reply
            if reply is not None and reply is not before:
                status = "interrupted" if reply.interrupted else "complete"
                saved = self.store.add_message(
                    conversation_id, "assistant", reply.text, status=status,
                    token_count=reply.tokens,
                )
                self._stats[conversation_id] = live.stats()
                self._save(conversation_id, saved.id, live)

    def reply_notice(self, conversation_id: int) -> str | None:
        """What the user should know about how the last reply ended, if anything."""
        live = self._live.get(conversation_id)
        reply = live.last_reply if live is not None else None
        if reply is not None and reply.finish_reason == "context_full":
            return ("The context window is full, so the reply was cut short. Pick a compression "
                    "level in settings (Ctrl+S) to keep the conversation going, or raise the "
                    "context size.")
        if self.memory_error:
            return f"{self.memory_error} The reply is saved; the memory will be rebuilt."
        return None

    def status(self, conversation_id: int | None) -> Status | None:
        if self._engine is None:
            return None
        info = self._engine.info
        live = self._live.get(conversation_id) if conversation_id is not None else None
        stats = self._stats.get(conversation_id) if conversation_id is not None else None
        level = self._engine.compression_for(self.settings.compression)
        if live is None or stats is None:
            return Status(info.model_name, info.device, level.level, level.method, 0, info.n_ctx,
                          0, 1.0, None)
        speed = live.last_reply.tokens_per_second if live.last_reply else None
        report = self._reports.get(conversation_id)
        return Status(
            model=info.model_name,
            device=info.device,
            level=live.compression.level,
            method=stats.method,
            tokens_in_context=stats.memory_tokens,
            context_window=stats.context_window,
            memory_bytes=stats.memory_bytes,
            ratio=stats.ratio,
            tokens_per_second=speed,
            memory_note=report.short if report else None,
        )

    def with_settings(self, **changes: Any) -> Settings:
        return replace(self.settings, **changes)
