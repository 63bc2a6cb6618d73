"""The chat pane's memory and other windows: the open chat's memory made ready (restored or
rebuilt, in a worker, with its notices) and the idle poll that notices another window
taking the chat over or writing to it."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from textual import work

from ccm_chat.app.errors import RebuildCancelled
from ccm_chat.ui.widgets.pane_support import TAKE_OVER_HINT, attempt, fault

if TYPE_CHECKING:
    from ccm_chat.ui.widgets.chat_pane import ChatPane


class PaneMemory:
    """ChatPane's memory and other-window handling (a mixin: it runs on the pane)."""

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
