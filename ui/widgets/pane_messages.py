"""The chat pane's single messages: copying a reply or a code block, and deleting or
editing one message (the chat's memory follows)."""

from __future__ import annotations

import asyncio

from textual import work

from ccm_chat.ui.screens.confirm import ConfirmScreen
from ccm_chat.ui.screens.edit_message import EditMessageScreen
from ccm_chat.ui.widgets.chat_view import MessageBox
from ccm_chat.ui.widgets.pane_support import CODE_BLOCK, attempt


class PaneMessages:
    """ChatPane's copy, delete and edit of single messages (a mixin: it runs on the pane)."""

    # -- copying ---------------------------------------------------------------------------------

    def copy_reply(self) -> None:
        text = self.chat_view.last_reply_text()
        if not text:
            self.notify("There is no reply to copy yet.")
            return
        self.app.copy_to_clipboard(text)
        self.notify("Reply copied to the clipboard.")

    def copy_code(self) -> None:
        for box_text in reversed(self.chat_view.reply_texts()):
            blocks = CODE_BLOCK.findall(box_text)
            if blocks:
                self.app.copy_to_clipboard(blocks[-1])
                self.notify("Code block copied to the clipboard.")
                return
        self.notify("No code block in the replies.")

    # -- single messages -------------------------------------------------------------------------

    def _need_conversation(self) -> bool:
        if self.conversation_id is None:
            self.notify("This chat is empty: send a message first.")
            return False
        return True

    def _target(self, role: str | None) -> MessageBox | None:
        """The selected message box, else the last one (of `role`, when given)."""
        chosen = self.chat_view.selected()
        if chosen is None:
            boxes = [b for b in self.chat_view.boxes if role is None or b.role == role]
            chosen = boxes[-1] if boxes else None
        if chosen is not None and chosen.message_id is None:
            messages, _ = attempt(lambda: self.service.messages(self.conversation_id))
            self.chat_view.set_ids(messages or [])
        return chosen if chosen is not None and chosen.message_id is not None else None

    @work(group="edit")
    async def delete_message(self) -> None:
        if self.busy() or not self._need_conversation():
            return
        box, cid = self._target(None), self.conversation_id
        if box is None:
            self.notify("There is no message to delete.")
            return
        who = "your message" if box.role == "user" else "this reply"
        preview = " ".join(box.content.split())[:60]
        if not await self.app.push_screen_wait(
                ConfirmScreen(f"Delete {who} “{preview}” from this chat?")):
            return
        _, error = await asyncio.to_thread(
            attempt, lambda: self.service.delete_message(cid, box.message_id))
        if error:
            self.notify(error, title="Not deleted", severity="error")
            return
        await self.reload()
        self.notify("Message deleted; the chat's memory follows.")

    @work(group="edit")
    async def edit_message(self) -> None:
        if self.busy() or not self._need_conversation():
            return
        box, cid = self._target("user"), self.conversation_id
        if box is None:
            self.notify("There is no message of yours to edit.")
            return
        text = await self.app.push_screen_wait(EditMessageScreen(box.content))
        if text is None or text == box.content:
            return
        _, error = await asyncio.to_thread(
            attempt, lambda: self.service.edit_message(cid, box.message_id, text))
        if error:
            self.notify(error, title="Not edited", severity="error")
            return
        await self.reload()
        if box.role == "user":  # the messages after it were dropped: answer the new text
            self.notify("Message edited: writing a new reply to it.")
            await self._regenerate()
        else:
            self.notify("Reply edited; the chat's memory follows.")
