"""Editing a chat's transcript (deleting a message, changing its text) with its memory
following: cut back to the change and the rest taken in again, or dropped and re-read."""

from __future__ import annotations

from contextlib import suppress

from ccm_chat.app.chat_state import ChatState, user_errors
from ccm_chat.app.errors import ChatError, NotSavedError
from ccm_chat.app.intake import too_long
from ccm_chat.engine import ContextFullError, EngineError
from ccm_chat.storage import MessageRecord, StorageError


class TranscriptEditing(ChatState):
    """ChatService's edits of the stored transcript."""

    def delete_message(self, conversation_id: int, message_id: int) -> None:
        """Delete one message; the memory follows (cut back to it, the rest re-read)."""
        with self._use, user_errors("The message was not deleted"):
            stored, index = self._locate(conversation_id, message_id, "The message was not deleted")
            self.store.delete_message(message_id)
            self._wrote(conversation_id)
            rest = [(m.role, m.content) for m in stored[index + 1:]]
            with suppress(EngineError, ValueError):  # dropped then: re-read at its next use
                self._memory_follows(conversation_id, stored, index, rest)

    def edit_message(self, conversation_id: int, message_id: int, text: str) -> MessageRecord:
        """Replace a message's text. Editing a user message drops every message after it (as
        in ChatGPT): regenerate() then answers the edited message. Editing a reply changes
        only that reply. The memory follows; with a model loaded it takes the new text in
        first, so that an edit too long for it is refused before it is saved."""
        text = text.strip()
        if not text:
            raise ChatError("A message cannot be empty; delete it instead.")
        doing = "The message was not changed"
        with self._use, user_errors(doing):
            stored, index = self._locate(conversation_id, message_id, doing)
            is_user = stored[index].role == "user"
            tail = [(stored[index].role, text)] + (
                [] if is_user else [(m.role, m.content) for m in stored[index + 1:]])
            if self._engine is not None and self._resumable(conversation_id, stored):
                try:
                    self._memory_follows(conversation_id, stored, index, tail)
                except ContextFullError as exc:
                    why = too_long(self.settings.compression, exc, "the edit was not saved")
                    raise NotSavedError(why) from exc
            try:
                edited = self.store.edit_message(message_id, text, drop_later=is_user)
            except StorageError:
                self._forget(conversation_id)  # the memory took in an edit that was not saved
                raise
            self._wrote(conversation_id)
            return edited

    def _resumable(self, conversation_id: int, stored: list[MessageRecord]) -> bool:
        """Whether the conversation's memory is (now) live; a transcript the memory cannot
        hold (a message too long, from before such messages were refused) is still editable."""
        try:
            self._engine_conversation(self.store.get_conversation(conversation_id), stored)
        except (EngineError, ValueError):
            return False
        return True

    def _locate(self, conversation_id: int, message_id: int,
                doing: str) -> tuple[list[MessageRecord], int]:
        self._writable(conversation_id, doing)
        self._flush_reply(conversation_id, doing)
        stored = self.store.messages(conversation_id)
        self._follow(conversation_id, stored)
        for index, message in enumerate(stored):
            if message.id == message_id:
                return stored, index
        raise ChatError(f"{doing}: there is no message {message_id} in this chat.")

    def _memory_follows(self, conversation_id: int, stored: list[MessageRecord], index: int,
                        tail: list[tuple[str, str]]) -> None:
        """Cut the live memory back to message `index` of `stored` and take `tail` in after it,
        as if chatted: the engine keeps the common prefix, and rebuilds by itself when the
        change reaches into what its policy evicted or compressed. On an engine error the
        live memory is dropped (re-read at its next use) and the error raised."""
        chat = self._chats.get(conversation_id)
        live = chat.live if chat is not None else None
        if live is None:
            return
        offset = len(live.messages) - len(stored)  # the system prompt, when there is one
        if offset not in (0, 1) or [m.content for m in live.messages[offset:]] != [
                m.content for m in stored]:
            self._forget(conversation_id)  # not in step: re-read it all
            return
        live.truncate(offset + index)
        try:
            for role, content in tail:
                live.add_turn(role, content)
        except (EngineError, ValueError):
            self._forget(conversation_id)
            raise
