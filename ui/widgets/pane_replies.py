"""The chat pane's replies: the reply worker (a daemon thread streaming pieces back as
messages), the reply written to the screen in batches, a message that was not saved given
back to the box, and a reply the database refused kept on screen until a retry saves it."""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from textual.widget import MountError
from textual.widgets import Label

from ccm_chat.app.records import MessageRecord
from ccm_chat.app.service import SendCancelled
from ccm_chat.ui.widgets.chat_view import MessageBox
from ccm_chat.ui.widgets.pane_support import UNSAVED_MARK, attempt, fault

if TYPE_CHECKING:
    from ccm_chat.ui.widgets.chat_pane import ChatPane


class PaneReplies:
    """ChatPane's replies (a mixin: it runs on the pane)."""

    async def _start_reply(self, conversation_id: int | None, text: str | None) -> None:
        self.generating = True
        self._cancel = threading.Event()
        self._reply_done.clear()
        await self.chat_view.start_reply()
        self.show_status("Thinking…")
        # a daemon thread, not a Textual worker (an executor thread the process waits for):
        # an engine that does not stop when asked must not keep the process alive
        threading.Thread(target=self._reply_worker, args=(conversation_id, text, self._cancel),
                         name="ccm-chat-reply", daemon=True).start()

    def _reply_worker(
        self, conversation_id: int | None, text: str | None, cancel: threading.Event
    ) -> None:
        cid, error, saved, cancelled = conversation_id, None, text is None, False
        first = True

        def on_saved(message: MessageRecord) -> None:
            nonlocal cid, saved
            cid, saved = message.conversation_id, True
            self.post_message(self.Saved(message.conversation_id, message.id))

        try:
            if text is None:
                pieces = self.service.regenerate(conversation_id, cancel)
            else:  # a new chat (None) is made by the service with its first message
                pieces = self.service.send(conversation_id, text, cancel, on_saved=on_saved)
            for piece in pieces:
                if first:  # on screen at once, by itself; the timer writes the rest
                    self.post_message(self.ReplyPiece(piece))
                    first = False
                    continue
                with self._queue_lock:
                    self._queued.append(piece)
        except SendCancelled as exc:
            error, cancelled = fault(exc), True
        except Exception as exc:  # noqa: BLE001 - said in a notice, the app goes on
            error = fault(exc)
        finally:
            self._reply_done.set()
        status, _ = attempt(lambda: self.service.status(cid))
        notice, _ = attempt(lambda: self.service.reply_notice(cid)) if cid else (None, None)
        self.post_message(self.ReplyDone(cid, text, saved, error, status, notice, cancelled))

    def on_chat_pane_saved(self, event: ChatPane.Saved) -> None:
        """The message is in the store: this is its chat now (a new one, on a first message)."""
        self.conversation_id = event.conversation_id
        users = [b for b in self.chat_view.boxes if b.role == "user"]
        if users and users[-1].message_id is None:
            users[-1].message_id = event.message_id
        self.post_message(self.ListChanged())

    async def on_chat_pane_reply_piece(self, event: ChatPane.ReplyPiece) -> None:
        await self.chat_view.write_reply(event.text)
        self._flush_timer.resume()

    async def _flush_reply(self) -> None:
        with self._queue_lock:
            text = "".join(self._queued)
            self._queued.clear()
        if text:
            await self.chat_view.write_reply(text)

    async def on_chat_pane_reply_done(self, event: ChatPane.ReplyDone) -> None:
        self.generating = False
        self._cancel = None
        self._flush_timer.pause()
        if (event.conversation_id != self.conversation_id or not self.is_attached
                or not self.chat_view.is_attached):  # switched away, or the app is closing
            with self._queue_lock:
                self._queued.clear()
            return
        await self._flush_reply()
        cid = event.conversation_id
        kept = self.service.unsaved_reply(cid) if event.saved else None
        if not event.saved:
            await self._give_back(event.text or "", event.error, event.cancelled)
        elif kept is not None:
            await self._keep_unsaved(kept, event.error)
        else:
            messages, _ = attempt(lambda: self.service.messages(cid)) if cid else ([], None)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and not event.error:
                await self.chat_view.finish_reply(last.content, last.interrupted)
                self.chat_view.set_ids(messages)
                if self.chat_view.query(".unsaved"):  # a kept reply went in before this one
                    await self._show(messages)
            else:
                await self.chat_view.finish_reply("", False)
                await self._show(messages or [])
            if event.error:
                self.notify(event.error, title="Reply failed", severity="error", timeout=10)
            elif event.notice:
                self.notify(event.notice, severity="warning", timeout=10)
            self._low_disk_notice()
        self.show_status(event.status)
        self.post_message(self.ListChanged())

    async def _give_back(self, text: str, error: str | None, cancelled: bool = False) -> None:
        """The message was not saved: take it off the transcript and put it back in the box."""
        await self.chat_view.finish_reply("", False)
        await self.chat_view.drop_last("assistant")
        await self.chat_view.drop_last("user")
        if not self.chat_view.boxes:
            with suppress(MountError):  # the app closed meanwhile (Ctrl+Q mid-intake)
                await self.chat_view.show_messages([])
        typed = self.prompt.text
        self.prompt.text = text if not typed.strip() else f"{text}\n{typed}"
        self.prompt.move_cursor(self.prompt.document.end)
        if cancelled:
            self.notify(error or "Stopped before the message was sent; it is back in the box.",
                        title="Stopped", severity="warning", timeout=10)
            return
        self.notify(f"{error or 'Your message was not saved.'} It is back in the message box: "
                    "press Enter to send it again.", title="Not saved", severity="error",
                    timeout=15)

    # -- a reply the database refused ------------------------------------------------------------

    async def _keep_unsaved(self, kept: Any, error: str | None) -> None:
        """The reply was written but not stored: it stays on screen, marked, until saved."""
        await self.chat_view.finish_reply(kept.text, kept.interrupted)
        replies = [b for b in self.chat_view.boxes if b.role == "assistant"]
        if replies:
            self._mark_unsaved(replies[-1], kept)
        self.notify(error or f"The reply is {UNSAVED_MARK}.", title="Reply not saved yet",
                    severity="warning", timeout=15)
        self._retry_timer.resume()

    @staticmethod
    def _mark_unsaved(box: MessageBox, kept: Any) -> None:
        box.interrupted = kept.interrupted
        box.query_one(".role", Label).update(
            f"Assistant ({'interrupted, ' if kept.interrupted else ''}{UNSAVED_MARK})")
        box.add_class("unsaved")

    async def _retry_replies(self) -> None:
        """The timer's retry of the replies the database refused; it stops once none is left."""
        if not self.service.has_unsaved_replies:
            self._retry_timer.pause()
            return
        if self.generating or self._retrying:
            return
        self._retrying = True
        try:
            saved, _ = await asyncio.to_thread(
                attempt, lambda: self.service.save_unsaved_replies(wait=False))
        finally:
            self._retrying = False
        if not self.service.has_unsaved_replies:
            self._retry_timer.pause()
        if saved and self.conversation_id in saved and not self.generating:
            await self.reload()
            self.notify("The reply that was not saved is saved now.", title="Saved")

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.notify("Stopped.")
        elif self._rebuild_cancel is not None:
            self.cancel_rebuild()
