"""A chat's replies: streamed from the engine, committed when they end, and kept (never
dropped) when the store refuses them: a locked database or a full disk must never cost a
generated reply. A kept reply is saved again before anything comes after it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace

from ccm_chat.app.chat_state import ChatState, user_errors
from ccm_chat.app.engine_api import EngineConversation
from ccm_chat.app.errors import ChatError, NotSavedError
from ccm_chat.app.open_chat import UnsavedReply
from ccm_chat.engine import ReplyStats
from ccm_chat.storage import MessageRecord, StorageError


class ReplyNotSaved(ChatError):
    """The reply was written but the store refused it (locked, disk full): it is kept here
    (ChatService.unsaved_reply) and saved again later, never dropped."""


class ReplyKeeping(ChatState):
    """ChatService's replies: streaming, committing, keeping, regenerating."""

    def regenerate(
        self, conversation_id: int, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Replace the last reply with a new one, or reply to a last message that has none
        (after an edit, or a reply that failed)."""
        with self._use:
            self._require_engine()
            with user_errors("No new reply"):
                record = self.store.get_conversation(conversation_id)
                self._writable(conversation_id, "No new reply")
                self._discard_reply(conversation_id)
                stored = self.store.messages(conversation_id)
                if not stored:
                    raise ChatError("There is no message to reply to yet.")
                self._follow(conversation_id, stored)
                live = self._engine_conversation(record, stored)
                if stored[-1].role == "assistant":
                    self.store.delete_message(stored[-1].id)
                    live.truncate(len(live.messages) - 1)
                    self._wrote(conversation_id)
            yield from self._stream(conversation_id, live, cancel)

    def _stream(
        self, conversation_id: int, live: EngineConversation, cancel: threading.Event | None
    ) -> Iterator[str]:
        before = live.last_reply
        live.recall = self.settings.recall
        writing = live.generate(self._params(), cancel)
        try:
            with user_errors("The reply failed"):
                yield from writing
        finally:
            writing.finish()  # also when the caller stopped reading: the turn ends here
            reply = live.last_reply
            if reply is not None and reply is not before:
                self._commit_reply(conversation_id, reply)

    def _commit_reply(self, conversation_id: int, reply: ReplyStats) -> None:
        """Save the reply, or keep it (and its place in the memory) when the store refuses
        it: a locked database or a full disk must never cost a generated reply."""
        self._chat(conversation_id).unsaved_reply = UnsavedReply(
            reply.text, "interrupted" if reply.interrupted else "complete", reply.tokens,
            self._engine.info.model_name if self._engine is not None else None, "")
        self._store_reply(conversation_id)

    def _store_reply(self, conversation_id: int) -> MessageRecord:
        """Write the chat's unsaved reply, then its memory; ReplyNotSaved when it fails."""
        chat = self._chat(conversation_id)
        kept = chat.unsaved_reply
        assert kept is not None
        try:
            saved = self.store.add_message(
                conversation_id, "assistant", kept.text, status=kept.status,
                token_count=kept.tokens, model=kept.model)
        except StorageError as exc:
            chat.unsaved_reply = replace(kept, error=str(exc))
            raise ReplyNotSaved(
                f"The reply is on screen but not saved yet: {exc} It is kept, and saved as "
                "soon as the database can be written (tried again every few seconds, and "
                "before your next message).") from exc
        chat.unsaved_reply = None
        if chat.live is not None and not chat.holds_reply(kept):
            self._forget(conversation_id)  # re-read since: it follows the transcript again
        live = chat.live
        self._wrote(conversation_id)
        if live is not None:  # the memory stands for the reply too: save it with it
            stats = chat.stats = live.stats()
            self._save(conversation_id, saved.id, live, reply_bytes=stats.memory_bytes)
        return saved

    def unsaved_reply(self, conversation_id: int | None) -> UnsavedReply | None:
        """The chat's reply that the store refused and that is kept to be saved, if any."""
        chat = self._chats.get(conversation_id) if conversation_id else None
        return chat.unsaved_reply if chat is not None else None

    @property
    def has_unsaved_replies(self) -> bool:
        return any(chat.unsaved_reply is not None for chat in self._chats.values())

    def save_unsaved_replies(self, wait: bool = True) -> list[int]:
        """Try again to save every reply the store refused; return the chats whose reply is
        saved now. Without `wait`, a reply running in the engine means: not now."""
        if not self._use.acquire(blocking=wait):
            return []
        try:
            saved = []
            for conversation_id in sorted(i for i, chat in self._chats.items()
                                          if chat.unsaved_reply is not None):
                with suppress(ReplyNotSaved):
                    self._store_reply(conversation_id)
                    saved.append(conversation_id)
            return saved
        finally:
            self._use.release()

    def _flush_reply(self, conversation_id: int, doing: str) -> None:
        """A chat's unsaved reply goes into the store before anything comes after it."""
        chat = self._chats.get(conversation_id)
        if chat is None or chat.unsaved_reply is None:
            return
        try:
            self._store_reply(conversation_id)
        except ReplyNotSaved as exc:
            raise NotSavedError(
                f"{doing}: the last reply is not saved yet, and it must be first "
                f"({chat.unsaved_reply.error}). Try again once the "
                "database can be written.") from exc

    def _discard_reply(self, conversation_id: int) -> None:
        """The user asked for a new reply: the unsaved one leaves the memory too."""
        chat = self._chats.get(conversation_id)
        if chat is None:
            return
        kept, chat.unsaved_reply = chat.unsaved_reply, None
        if kept is not None and chat.live is not None and chat.holds_reply(kept):
            chat.live.truncate(len(chat.live.messages) - 1)

    def reply_notice(self, conversation_id: int) -> str | None:
        """What the user should know about how the last reply ended, if anything."""
        chat = self._chats.get(conversation_id)
        reply = chat.live.last_reply if chat is not None and chat.live is not None else None
        if reply is not None and reply.finish_reason == "context_full":
            return ("The context window is full, so the reply was cut short. Pick a compression "
                    "level in settings (Ctrl+S) to keep the conversation going, or raise the "
                    "context size.")
        if self.memory_error:
            return f"{self.memory_error} The reply is saved; the memory will be rebuilt."
        return None
