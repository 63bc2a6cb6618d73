"""ChatService: the one place where the engine and the store meet.

The transcript in SQLite is the source of truth; an engine conversation is built from it on
first use and kept in step afterwards. A user message is committed before the model runs; the
reply is committed when it ends, marked interrupted when it was stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from app.export import export_conversation
from app.settings import Settings
from engine import CompressionConfig, Engine, EngineInfo, MemoryStats, ReplyStats, SamplingParams
from storage import ConversationRecord, MessageRecord, SearchHit, Store

TITLE_LENGTH = 48


class EngineConversation(Protocol):
    messages: list[Any]
    last_reply: ReplyStats | None
    compression: CompressionConfig

    def send(self, text: str, params: SamplingParams | None = ...,
             cancel: threading.Event | None = ...) -> Iterator[str]: ...
    def generate(self, params: SamplingParams | None = ...,
                 cancel: threading.Event | None = ...) -> Iterator[str]: ...
    def add_turn(self, role: str, text: str, decode: bool = ...) -> None: ...
    def truncate(self, n_messages: int) -> None: ...
    def stats(self) -> MemoryStats: ...


class EngineLike(Protocol):
    info: EngineInfo

    def new_conversation(self, system: str | None = ...,
                         compression: CompressionConfig | None = ...) -> EngineConversation: ...
    def close(self) -> None: ...


EngineFactory = Callable[[Settings, str | None], EngineLike]


def load_engine(settings: Settings, model_override: str | None) -> EngineLike:
    return Engine.load(
        model=model_override or settings.model_path or None,
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
        self._lock = threading.RLock()

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
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def update_settings(self, settings: Settings) -> None:
        settings.save(self.store)
        self.settings = settings
        level = CompressionConfig.for_level(settings.compression)
        for conv in self._live.values():
            conv.compression = level

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
        self._live.pop(conversation_id, None)

    def set_system_prompt(self, conversation_id: int, prompt: str) -> ConversationRecord:
        record = self.store.update_conversation(conversation_id, system_prompt=prompt or None)
        self._live.pop(conversation_id, None)
        return record

    def export(self, conversation_id: int, fmt: str) -> str:
        record = self.store.get_conversation(conversation_id)
        return export_conversation(record, self.store.messages(conversation_id), fmt)

    # -- chatting -------------------------------------------------------------------------------

    def _engine_conversation(self, record: ConversationRecord) -> EngineConversation:
        """The live engine conversation for a stored one, built from its transcript if needed."""
        live = self._live.get(record.id)
        if live is None:
            live = self.engine.new_conversation(
                system=record.system_prompt,
                compression=CompressionConfig.for_level(self.settings.compression),
            )
            for msg in self.store.messages(record.id):
                live.add_turn(msg.role, msg.content, decode=False)
            self._live[record.id] = live
        return live

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
        record = self.store.get_conversation(conversation_id)
        user = self.store.add_message(conversation_id, "user", text)  # kept whatever happens
        if record.title == "New chat" and not any(
            m.role == "user" and m.id != user.id for m in self.store.messages(conversation_id)
        ):
            self.store.rename_conversation(conversation_id, make_title(text))
        live = self._live.get(conversation_id)
        if live is None:
            live = self._engine_conversation(record)  # built from the transcript, this turn too
        else:
            live.add_turn("user", text, decode=False)
        yield from self._stream(conversation_id, live, cancel)

    def regenerate(
        self, conversation_id: int, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Replace the last reply with a new one."""
        record = self.store.get_conversation(conversation_id)
        stored = self.store.messages(conversation_id)
        if not stored or stored[-1].role != "assistant":
            raise ValueError("There is no reply to regenerate yet.")
        live = self._engine_conversation(record)
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
                self.store.add_message(
                    conversation_id, "assistant", reply.text, status=status,
                    token_count=reply.tokens,
                )

    def status(self, conversation_id: int | None) -> Status | None:
        if self._engine is None:
            return None
        info = self._engine.info
        live = self._live.get(conversation_id) if conversation_id is not None else None
        level = CompressionConfig.for_level(self.settings.compression)
        if live is None:
            return Status(info.model_name, info.device, level.level, level.method, 0, info.n_ctx,
                          0, 1.0, None)
        stats = live.stats()
        speed = live.last_reply.tokens_per_second if live.last_reply else None
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
        )

    def with_settings(self, **changes: Any) -> Settings:
        return replace(self.settings, **changes)
