"""The state ChatService keeps of the chats this window has touched (one OpenChat each), the
engine they share, and the leases it holds; what every part of the service builds on.

ChatService (app/service.py) is this with its jobs: sending and opening (there), replies
(app/replies.py) and editing the transcript (app/transcript_edits.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ccm_chat.app.engine_api import EngineConversation, EngineLike, Progress
from ccm_chat.app.engine_extras import bytes_per_cell, release_memory
from ccm_chat.app.errors import ChatError, NotSavedError
from ccm_chat.app.leases import Leases
from ccm_chat.app.open_chat import OpenChat
from ccm_chat.app.resume import ResumeReport
from ccm_chat.app.settings import Settings
from ccm_chat.engine import EngineError, SamplingParams
from ccm_chat.engine.models import DEFAULT_MODEL_NAME
from ccm_chat.storage import ConversationRecord, MessageRecord, StorageError, Store

EngineFactory = Callable[[Settings, str | None], EngineLike]


@contextmanager
def user_errors(doing: str, error: type[ChatError] = ChatError) -> Iterator[None]:
    """Turn a storage or engine failure into a ChatError that starts with what failed."""
    try:
        yield
    except ChatError:
        raise
    except (StorageError, EngineError, OSError) as exc:
        raise error(f"{doing}: {exc}") from exc
    except ValueError as exc:  # the engine and settings refuse bad input with ValueError
        raise error(str(exc)) from exc


class ChatState:
    """What the service knows beyond the store; ChatService.__init__ sets it up."""

    store: Store
    settings: Settings
    owner: str
    load_error: str | None  # why the last model load failed, if it did
    memory_error: str | None  # why the last memory save failed, if it did
    _engine_factory: EngineFactory
    _model_override: str | None
    _engine: EngineLike | None
    _engine_key: tuple[Any, ...] | None
    _chats: dict[int, OpenChat]  # every chat this window has touched
    _lock: threading.RLock  # guards loading and closing the engine
    _use: threading.RLock  # held while a conversation's memory is in the engine
    _leases: Leases

    def _chat(self, conversation_id: int) -> OpenChat:
        chat = self._chats.get(conversation_id)
        if chat is None:
            chat = self._chats[conversation_id] = OpenChat(conversation_id)
        return chat

    @property
    def _live(self) -> dict[int, EngineConversation]:
        """Each chat's live memory, by id (a view, for tests and benchmarks)."""
        return {i: c.live for i, c in self._chats.items() if c.live is not None}

    @property
    def _reports(self) -> dict[int, ResumeReport]:
        """How each live memory was made, by id (a view, for tests and benchmarks)."""
        return {i: c.report for i, c in self._chats.items() if c.report is not None}

    # -- engine ---------------------------------------------------------------------------------

    @property
    def engine(self) -> EngineLike:
        """The loaded engine; (re)loaded when the model settings changed.

        Raises ChatError saying why no model could be loaded (also kept in load_error).
        """
        with self._lock:
            key = (self._model_override, *self.settings.engine_key())
            if self._engine is None or key != self._engine_key:
                self.close_engine()
                try:
                    self._engine = self._engine_factory(self.settings, self._model_override)
                except (EngineError, OSError, ValueError) as exc:
                    self.load_error = str(exc)
                    raise ChatError(str(exc)) from exc
                self.load_error = None
                self._engine_key = key
            return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    @property
    def bytes_per_cell(self) -> int | None:
        """The loaded model's f16 bytes per KV cell (for app.levels.describe_level), if any."""
        return bytes_per_cell(self._engine)

    def _require_engine(self) -> EngineLike:
        try:
            return self.engine
        except ChatError as exc:
            raise NotSavedError(
                f"No model is loaded, so nothing was sent: {exc} Pick a model file in "
                "settings (Ctrl+S), or leave the model path empty for the embedded default."
            ) from exc

    def close_engine(self) -> None:
        with self._lock:
            for chat in self._chats.values():
                chat.unload()
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def _model_name(self) -> str:
        if self._engine is not None:
            return self._engine.info.model_name
        return self._model_override or self.settings.model_path or DEFAULT_MODEL_NAME

    def _forget(self, conversation_id: int) -> None:
        """Drop the live memory: the next use resumes it from the saved state or the text."""
        chat = self._chats.get(conversation_id)
        live = chat.forget_memory() if chat is not None else None
        if live is not None:
            release_memory(self._engine, live)  # its KV cells are dead weight now

    # -- one writer per conversation ------------------------------------------------------------

    def _claim(self, conversation_id: int, force: bool = False) -> str | None:
        """Take the conversation's lease; None when held, else who holds it."""
        holder = self._leases.claim(conversation_id, force)
        self._chat(conversation_id).read_only = holder is not None
        return holder

    def take_over(self, conversation_id: int) -> None:
        """Make this window the conversation's writer, whoever held it; the memory is
        re-read from the stored transcript at the next open or send."""
        with user_errors("Could not take the conversation over"):  # no wait on the engine
            self._claim(conversation_id, force=True)
            self._forget(conversation_id)

    def release(self, conversation_id: int) -> None:
        """Let another window write the conversation (on switching away, or quitting)."""
        if conversation_id in self._chats:
            self._chats[conversation_id].read_only = False
        with user_errors("Could not release the conversation"):
            self._leases.release(conversation_id)

    def read_only(self, conversation_id: int) -> bool:
        chat = self._chats.get(conversation_id)
        return chat is not None and chat.read_only

    def held_elsewhere(self, conversation_id: int) -> str | None:
        """Who holds the conversation if another window does (it may have taken it over since
        this one opened it), else None. Only reads; for the UI to poll."""
        with user_errors("Could not read the conversation"):
            holder = self._leases.held_elsewhere(conversation_id)
        if holder is not None:
            self._chat(conversation_id).read_only = True
        return holder

    def _writable(self, conversation_id: int, doing: str) -> None:
        with user_errors(doing, NotSavedError):
            holder = self._claim(conversation_id)
        if holder is not None:
            raise NotSavedError(
                f"{doing}: this chat is open in another window ({holder}). Close it there, "
                "or take it over here."
            )

    def _follow(self, conversation_id: int, stored: list[MessageRecord]) -> None:
        """When another window wrote since the live memory was made, drop it: it is re-read
        from the transcript (its saved state, or a rebuild) instead of interleaving."""
        chat = self._chats.get(conversation_id)
        if chat is not None and chat.live is not None and not chat.in_step(stored):
            self._forget(conversation_id)

    def _wrote(self, conversation_id: int) -> None:
        """This window wrote: the memory and the view are in step with the store again."""
        chat = self._chat(conversation_id)
        try:
            chat.shown = chat.synced = self.store.transcript_signature(conversation_id)
        except StorageError:  # unknown: the memory is re-read before its next use
            chat.synced = None


    # -- what the jobs call of each other ---------------------------------------------------------

    def _engine_conversation(
        self, record: ConversationRecord, messages: list[MessageRecord],
        progress: Progress | None = None, cancel: threading.Event | None = None,
    ) -> EngineConversation:
        raise NotImplementedError  # ChatService

    def _params(self) -> SamplingParams:
        raise NotImplementedError  # ChatService

    def _save(self, conversation_id: int, message_id: int, live: EngineConversation,
              reply_bytes: int = 0) -> None:
        raise NotImplementedError  # ChatService

    def _stream(self, conversation_id: int, live: EngineConversation,
                cancel: threading.Event | None) -> Iterator[str]:
        raise NotImplementedError  # ReplyKeeping

    def _flush_reply(self, conversation_id: int, doing: str) -> None:
        raise NotImplementedError  # ReplyKeeping

    def _discard_reply(self, conversation_id: int) -> None:
        raise NotImplementedError  # ReplyKeeping
