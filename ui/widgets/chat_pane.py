"""The chat pane: one open conversation's transcript, message box, reply worker and memory.

The model runs in a daemon thread that streams pieces back as messages, so the screen never
waits on it and quitting never waits for it longer than QUIT_WAIT_S; Esc sets a cancel event
the engine checks between tokens and between the decode batches of a long message (and stops
a memory rebuild the same way). Every service call made for the pane is caught where it is
made: a failure becomes a notice that says what happened, a message that could not be saved
goes back into the message box, so nothing typed is lost, and a reply the database refused
stays on screen, marked "not saved yet", until a retry saves it.

Notices here are plain text (markup off): they carry titles, paths and error strings.

Here: the layout, opening a chat, its draft, sending and quitting. The rest are mixins by
job: pane_memory.py (the memory made ready, other windows), pane_replies.py (the reply worker
and a reply not saved), pane_messages.py (copy, delete and edit one message), and
pane_support.py (attempt and fault, the boundary to the service).
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import TextArea

from ccm_chat.app.records import MessageRecord
from ccm_chat.app.service import READ_ONLY_DATABASE, ChatService, Status
from ccm_chat.ui.widgets.chat_view import ChatView
from ccm_chat.ui.widgets.pane_memory import PaneMemory
from ccm_chat.ui.widgets.pane_messages import PaneMessages
from ccm_chat.ui.widgets.pane_replies import PaneReplies
from ccm_chat.ui.widgets.pane_support import (
    CHECK_EVERY_S,
    QUIT_WAIT_S,
    TAKE_OVER_HINT,
    attempt,
    fault,
)
from ccm_chat.ui.widgets.prompt_input import PromptInput
from ccm_chat.ui.widgets.rebuild_bar import RebuildBar

__all__ = ["ChatPane", "attempt", "fault"]


class ChatPane(PaneMemory, PaneReplies, PaneMessages, Vertical):
    """The open conversation. It tells the app what to show in the status bar and sidebar."""

    # A reply reaches the screen in batches this often (its first piece at once): the worker
    # queues pieces and a timer here writes them out. A message and a Markdown update a token
    # held the GIL the decode thread needs: the UI decoded at 62 % of the engine's speed on a
    # 2-core CPU, against 96 % so (bench/ui_speed.py)
    reply_flush_s = 0.2
    retry_reply_s = 5.0  # how often a reply the database refused is tried again

    class StatusChanged(Message):
        """Show this in the status bar: a Status, or a line of text; and a flag, or none."""

        def __init__(self, status: Status | str | None, flag: str | None) -> None:
            super().__init__()
            self.status = status
            self.flag = flag

    class ListChanged(Message):
        """The conversation list changed (a new chat, a title, an order): refresh it."""

    # the pane's own messages, from its workers to itself: they do not bubble up

    @dataclass
    class ReplyPiece(Message, bubble=False):
        """The reply's first piece: write it now, and the rest as it comes (the timer)."""

        text: str

    @dataclass
    class Saved(Message, bubble=False):
        conversation_id: int
        message_id: int

    @dataclass
    class ReplyDone(Message, bubble=False):
        conversation_id: int | None
        text: str | None  # the message sent; None for a regeneration
        saved: bool  # whether that message is in the store
        error: str | None
        status: Status | None
        notice: str | None
        cancelled: bool = False  # stopped while the model took the message in

    @dataclass
    class MemoryProgress(Message, bubble=False):
        conversation_id: int
        done: int
        total: int

    @dataclass
    class MemoryReady(Message, bubble=False):
        conversation_id: int
        report: Any  # app.resume.ResumeReport, or None when it failed
        error: str | None
        cancelled: bool
        status: Status | None

    def __init__(self, service: ChatService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.conversation_id: int | None = None
        self.generating = False
        self.no_model: str | None = None  # why the model could not be loaded, once known
        self.held_by: str | None = None  # set while another window holds this chat
        self._cancel: threading.Event | None = None
        self._reply_done = threading.Event()
        self._reply_done.set()
        self._rebuild_cancel: threading.Event | None = None
        self._noticed: dict[int, Any] = {}  # the memory report last shown for each chat
        self._retrying = False  # a retry of unsaved replies is running
        self.read_only_db = False  # the database cannot be written: the chats are for reading
        self._opened = False  # a chat (or the new one) is shown: its box text is its draft
        self._draft_stored = ""  # the open chat's draft as the database holds it
        self._draft_kept = False  # quitting saved the draft already
        self._typed = ""  # the box's text, followed as it changes

    def compose(self) -> ComposeResult:
        yield ChatView(id="transcript")
        yield RebuildBar(id="rebuild")
        yield PromptInput(id="prompt")

    def on_mount(self) -> None:
        self.set_interval(CHECK_EVERY_S, self._check_transcript)
        self._queued: list[str] = []  # reply pieces from the worker, not on screen yet
        self._queue_lock = threading.Lock()
        self._flush_timer = self.set_interval(self.reply_flush_s, self._flush_reply, pause=True)
        self._retry_timer = self.set_interval(self.retry_reply_s, self._retry_replies,
                                              pause=True)
        writable, _ = attempt(lambda: self.service.writable)
        if writable is False:  # said once, at open, not at the first send that fails
            self.read_only_db = True
            self.notify(READ_ONLY_DATABASE, title="Read-only database", severity="warning",
                        timeout=20)

    def notify(self, message: str, *, markup: bool = False, **kwargs: Any) -> None:
        """A notice in plain text unless asked otherwise: what the pane says holds titles,
        paths and error strings, and `[/b]` in one must neither crash nor act."""
        super().notify(message, markup=markup, **kwargs)

    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def rebuild_bar(self) -> RebuildBar:
        return self.query_one(RebuildBar)

    @property
    def rebuilding(self) -> bool:
        return self._rebuild_cancel is not None

    def focus_prompt(self) -> None:
        self.prompt.focus()

    # -- status ----------------------------------------------------------------------------------

    def _flag(self) -> str | None:
        if self.read_only_db:
            return "read-only database"
        return "read-only (open in another window)" if self.held_by else None

    def show_status(self, status: Status | str | None = None) -> None:
        """Tell the app what the status bar shows; without a status, the service's current one."""
        if status is None:
            status, _ = attempt(lambda: self.service.status(self.conversation_id))
        if isinstance(status, Status) and status.read_only and not self.held_by:
            self.held_by = "another window"  # it took the chat over since this one opened it
        self.post_message(self.StatusChanged(status, self._flag()))

    # -- opening a conversation ------------------------------------------------------------------

    async def open(self, conversation_id: int | None, carry_text: bool = False) -> bool:
        """Show a conversation from its end and make its memory ready; False if it failed.

        The message box's unsent text stays with the chat it was typed in (a draft, kept in
        the database) and the opened chat's own draft comes back into the box; `carry_text`
        keeps the box as it is instead (the new chat became this one)."""
        messages: list[MessageRecord] = []
        if conversation_id is not None:
            messages, error = attempt(lambda: self.service.messages(conversation_id))
            if error:
                self.notify(error, title="Could not open the chat", severity="error")
                return False
        switching = not self._opened or conversation_id != self.conversation_id
        if switching and not carry_text:
            self.keep_draft(quiet=False)
        self._leave()
        self.conversation_id = conversation_id
        self.held_by = None
        self._rebuild_cancel = None  # the left chat's rebuild stops; its news is ignored
        self.rebuild_bar.hide()
        await self._show(messages)
        if switching and not carry_text:
            self._restore_draft()
        self._opened = True
        self.show_status()
        if conversation_id is not None and messages:
            self.prepare_memory(conversation_id)
        return True

    # -- drafts ----------------------------------------------------------------------------------

    def keep_draft(self, quiet: bool = True) -> None:
        """Save the box's unsent text as the open chat's draft, when it changed; a database
        that refuses it (locked, full) costs a notice at most, never the chat or quitting."""
        if not self._opened:
            return
        with suppress(NoMatches):  # gone while the app closes: its last text was followed
            self._typed = self.prompt.text
        cid, text = self.conversation_id, self._typed
        if text == self._draft_stored:
            return
        _, error = attempt(lambda: self.service.save_draft(cid, text))
        if error is None:
            self._draft_stored = text
        elif not quiet:
            self.notify(error, title="Unsent text not kept", severity="warning", timeout=10)

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if isinstance(event.text_area, PromptInput):
            self._typed = event.text_area.text

    def _restore_draft(self) -> None:
        """The open chat's draft into the box, as typed (plain text, never markup)."""
        cid = self.conversation_id
        text, _ = attempt(lambda: self.service.draft(cid))
        self._draft_stored = text = text or ""
        self.prompt.text = self._typed = text
        self.prompt.move_cursor(self.prompt.document.end)

    def _leave(self) -> None:
        """Let go of the open chat: stop its rebuild and release it for other windows."""
        if self._rebuild_cancel is not None:
            self._rebuild_cancel.set()
        previous = self.conversation_id
        if previous is not None and not self.held_by:
            _, error = attempt(lambda: self.service.release(previous))
            if error:
                self.notify(error, title="Could not release the chat", severity="warning")

    async def reload(self) -> None:
        """Show the stored transcript again (it changed: an edit, a delete, another window)."""
        cid = self.conversation_id
        if cid is None:
            return
        messages, error = attempt(lambda: self.service.messages(cid))
        if error:
            self.notify(error, title="Could not reload the chat", severity="error")
            return
        await self._show(messages)
        self.show_status()

    async def _show(self, messages: list[MessageRecord]) -> None:
        """The stored transcript, and after it the reply the database refused, if any."""
        await self.chat_view.show_messages(messages)
        kept = self.service.unsaved_reply(self.conversation_id)
        if kept is not None:
            self._mark_unsaved(await self.chat_view.add_message("assistant", kept.text), kept)

    @on(RebuildBar.Cancel)
    def cancel_rebuild(self) -> None:
        if self._rebuild_cancel is not None:
            self._rebuild_cancel.set()
            self.rebuild_bar.cancelling()

    # -- sending ---------------------------------------------------------------------------------

    def _refused(self) -> str | None:
        """Why nothing may be written to this chat now, if something forbids it."""
        if self.generating:
            return "Wait for the reply to finish, or press Esc to stop it."
        if self.read_only_db:
            return READ_ONLY_DATABASE
        if self.held_by:
            return (f"This chat is open in another window ({self.held_by}): it is read-only "
                    f"here. Take it over ({TAKE_OVER_HINT}) to write in it here.")
        return None

    def busy(self) -> bool:
        """Say why not, and True, if the chat cannot be changed now."""
        reason = self._refused()
        if reason:
            self.notify(reason)
        return reason is not None

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        if self.read_only_db and not self.generating:
            self.notify(f"{READ_ONLY_DATABASE} Your message was not sent; it stays in the box.",
                        title="Not sent", severity="error", timeout=15)
            return
        if self.busy():
            return
        if self.no_model:
            self.notify("No model is loaded, so nothing was sent. Pick a model file in "
                        "settings (Ctrl+S); your message stays in the box.",
                        title="No model", severity="error", timeout=15)
            return
        cid = self.conversation_id
        if cid is not None:
            changed, _ = attempt(lambda: self.service.transcript_changed(cid))
            if changed:
                await self.reload()
                self.notify("This chat was changed in another window, so it was reloaded "
                            "and your message was not sent: it is still in the box.",
                            title="Not sent", severity="warning", timeout=10)
                return
        text = event.text.strip()
        self.prompt.clear()
        self._draft_stored = ""  # the store drops the draft with the message it became
        await self.chat_view.add_message("user", text)
        await self._start_reply(cid, text)

    def regenerate(self) -> None:
        if self.busy() or not self._need_conversation():
            return
        if not self.chat_view.boxes:
            self.notify("There is no reply to regenerate yet.")
            return
        self.call_later(self._regenerate)

    async def _regenerate(self) -> None:
        """Write the last reply again; a last message without a reply (after an edit, or a
        reply that failed) gets one."""
        await self.chat_view.drop_last("assistant")
        await self._start_reply(self.conversation_id, None)

    async def shutdown(self) -> None:
        """Before quitting: stop a running reply or intake and let it be saved, then release
        the chat. The wait is short and bounded: quitting never waits on the engine."""
        if self._cancel is not None:
            self._cancel.set()
        if self._rebuild_cancel is not None:
            self._rebuild_cancel.set()
        if not self._reply_done.is_set():
            await asyncio.to_thread(self._reply_done.wait, QUIT_WAIT_S)
        self.keep_draft()
        self._draft_kept = True
        self._leave()

    def on_unmount(self) -> None:
        """The app ends another way than Ctrl+Q (its own exit): the draft is kept still."""
        if not self._draft_kept:
            self.keep_draft()
