"""The chat pane: one open conversation's transcript, message box, reply worker and memory.

The model runs in a daemon thread that streams pieces back as messages, so the screen never
waits on it and quitting never waits for it longer than QUIT_WAIT_S; Esc sets a cancel event
the engine checks between tokens and between the decode batches of a long message (and stops
a memory rebuild the same way). Every service call made for the pane is caught where it is
made: a failure becomes a notice that says what happened, a message that could not be saved
goes back into the message box, so nothing typed is lost, and a reply the database refused
stays on screen, marked "not saved yet", until a retry saves it.

Notices here are plain text (markup off): they carry titles, paths and error strings.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.widget import MountError
from textual.widgets import Label, TextArea

from ccm_chat.app.errors import ChatError, RebuildCancelled
from ccm_chat.app.records import MessageRecord
from ccm_chat.app.service import READ_ONLY_DATABASE, ChatService, SendCancelled, Status
from ccm_chat.ui.screens.confirm import ConfirmScreen
from ccm_chat.ui.screens.edit_message import EditMessageScreen
from ccm_chat.ui.widgets.chat_view import ChatView, MessageBox
from ccm_chat.ui.widgets.prompt_input import PromptInput
from ccm_chat.ui.widgets.rebuild_bar import RebuildBar

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
CHECK_EVERY_S = 2.0  # how often an idle pane asks whether another window changed its chat
QUIT_WAIT_S = 3.0  # how long quitting waits for a running reply to stop and be saved
UNSAVED_MARK = "not saved yet"
TAKE_OVER_HINT = 'Ctrl+P, "Take over chat"'


def fault(exc: BaseException) -> str:
    """What to tell the user about a failure: a ChatError says it itself."""
    if isinstance(exc, ChatError):
        return str(exc)
    return f"Unexpected error ({type(exc).__name__}): {exc}"


def attempt(call: Callable[[], Any]) -> tuple[Any, str | None]:
    """(result, None), or (None, what went wrong): the boundary between the UI and the service."""
    try:
        return call(), None
    except Exception as exc:  # noqa: BLE001 - no failure of a service call may end the app
        return None, fault(exc)


class ChatPane(Vertical):
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

    @work(thread=True, group="memory", exclusive=True)
    def prepare_memory(self, conversation_id: int) -> None:
        """Restore the conversation's saved memory, or rebuild it, before the next message."""
        cancel = threading.Event()
        self._rebuild_cancel = cancel

        def progress(done: int, total: int) -> None:
            self.post_message(self.MemoryProgress(conversation_id, done, total))

        report, error, cancelled = None, None, False
        try:
            report = self.service.open(conversation_id, progress=progress, cancel=cancel)
        except RebuildCancelled:
            cancelled = True
        except Exception as exc:  # noqa: BLE001 - said in a notice, the chat stays open
            error = fault(exc)
        status, _ = attempt(lambda: self.service.status(conversation_id))
        self.post_message(self.MemoryReady(conversation_id, report, error, cancelled, status))

    def on_chat_pane_memory_progress(self, event: ChatPane.MemoryProgress) -> None:
        if event.conversation_id != self.conversation_id:
            return
        self.rebuild_bar.show_progress(event.done, event.total)

    def on_chat_pane_memory_ready(self, event: ChatPane.MemoryReady) -> None:
        if event.conversation_id != self.conversation_id:
            return
        self._rebuild_cancel = None
        self.rebuild_bar.hide()
        if event.cancelled:
            self.notify("Memory rebuild cancelled. The chat is usable; its memory will be "
                        "rebuilt when you next send a message.", title="Memory")
        elif event.error and event.error != self.service.load_error:  # no model: said once
            self.notify(event.error, title="Memory", severity="error", timeout=10)
        elif event.report is not None:
            self._memory_notice(event.conversation_id, event.report)
        self._low_disk_notice()
        if not self.generating:
            self.show_status(event.status)

    def _low_disk_notice(self) -> None:
        """Once a session, that a memory was not saved for lack of disk space."""
        notice, _ = attempt(self.service.low_disk_notice)
        if notice:
            self.notify(notice, title="Disk nearly full", severity="warning", timeout=20)

    def _memory_notice(self, conversation_id: int, report: Any) -> None:
        """Say how the memory was made ready, once per report: a chat switched back to that
        was already live says nothing again."""
        if report.read_only:
            self.held_by = report.held_by or "another window"
            self.notify(f"This chat is open in another window ({self.held_by}), so it is "
                        f"read-only here. To write in it here, take it over ({TAKE_OVER_HINT}).",
                        title="Read-only", severity="warning", timeout=15)
            return
        if self._noticed.get(conversation_id) is report:
            return
        self._noticed[conversation_id] = report
        if report.kind in ("restored", "rebuilt"):
            self.notify(report.message(), title="Memory",
                        severity="warning" if report.kind == "rebuilt" else "information")

    @on(RebuildBar.Cancel)
    def cancel_rebuild(self) -> None:
        if self._rebuild_cancel is not None:
            self._rebuild_cancel.set()
            self.rebuild_bar.cancelling()

    # -- other windows ---------------------------------------------------------------------------

    async def _check_transcript(self) -> None:
        """The idle poll: has another window taken this chat over, or written to it?"""
        cid = self.conversation_id
        if cid is None or self.generating or self.rebuilding:
            return
        holder, error = attempt(lambda: self.service.held_elsewhere(cid))
        if self.held_by and not holder and not error:
            self._holder_gone(cid)
        elif holder and not self.held_by:
            self.held_by = holder
            self.notify(f"Another window took this chat over ({holder}), so it is read-only "
                        f"here now. To write in it here, take it back ({TAKE_OVER_HINT}).",
                        title="Read-only", severity="warning", timeout=15)
            self.show_status()
        changed, error = attempt(lambda: self.service.transcript_changed(cid))
        if changed and not error:
            await self.reload()
            self.notify("This chat was changed in another window: showing it as it is now.",
                        title="Reloaded")

    def _holder_gone(self, cid: int) -> None:
        """The window that held this chat closed, or its process is gone: it is this one's."""
        _, error = attempt(lambda: self.service.take_over(cid))
        if error:  # another window may have claimed it first: asked again at the next poll
            return
        self.held_by = None
        self.notify("The window that held this chat has closed, so you can write in it here.",
                    title="Writable")
        self.call_later(self._reopen_taken, cid)

    def take_over(self) -> None:
        cid = self.conversation_id
        if cid is None or not self.held_by:
            self.notify("This chat is not held by another window: there is nothing to take "
                        "over.")
            return
        _, error = attempt(lambda: self.service.take_over(cid))
        if error:
            self.notify(error, title="Could not take over", severity="error")
            return
        self.held_by = None
        self.notify("You took this chat over: you can write in it here; the other window is "
                    "read-only now.", title="Taken over")
        self.call_later(self._reopen_taken, cid)

    async def _reopen_taken(self, cid: int) -> None:
        await self.reload()
        self.prepare_memory(cid)

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
