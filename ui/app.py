"""The ccm-chat Textual app: sidebar, transcript, message box, status bar, footer.

The model runs in a thread worker that streams pieces back as messages, so the screen never
waits on it; Esc (or Ctrl+C) sets a cancel event the engine checks between tokens.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, ProgressBar

from app.service import ChatService, Status
from app.settings import Settings
from engine import EngineError
from storage import StorageError
from ui.screens.confirm import ConfirmScreen
from ui.screens.export import ExportScreen
from ui.screens.help import HelpScreen
from ui.screens.settings import SettingsScreen
from ui.screens.text_prompt import TextPromptScreen
from ui.widgets.chat_view import ChatView
from ui.widgets.prompt_input import PromptInput
from ui.widgets.sidebar import Sidebar
from ui.widgets.status_bar import StatusBar

CSS_FILE = Path(__file__).resolve().parent.parent / "assets" / "ccm_chat.tcss"
CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
MAIN_SCREEN_ACTIONS = {
    "new_chat", "regenerate", "rename", "delete", "export", "copy_reply", "copy_code",
    "system_prompt", "search", "settings", "help",
}
EXPECTED_ERRORS = (EngineError, StorageError, ValueError, OSError)


@dataclass
class ReplyPiece(Message):
    text: str


@dataclass
class ReplyDone(Message):
    conversation_id: int
    error: str | None
    status: Status | None
    notice: str | None = None


@dataclass
class MemoryProgress(Message):
    done: int
    total: int


@dataclass
class MemoryReady(Message):
    conversation_id: int
    note: str | None
    rebuilt: bool
    status: Status | None
    error: str | None


@dataclass
class EngineReady(Message):
    status: Status | None
    error: str | None


def slugify(title: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()
    return slug[:40] or "conversation"


class ChatApp(App[None]):
    CSS_PATH = str(CSS_FILE)
    TITLE = "ccm-chat"
    COMMAND_PALETTE_BINDING = "ctrl+p"

    # priority: these keys also mean something to the message box, and the app's meaning wins
    BINDINGS = [
        Binding("ctrl+n", "new_chat", "New", id="new_chat"),
        Binding("escape", "stop", "Stop", id="stop"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="regenerate"),
        Binding("f2", "rename", "Rename", id="rename"),
        Binding("ctrl+d", "delete", "Delete", id="delete", priority=True),
        Binding("ctrl+e", "export", "Export", id="export", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy reply", id="copy_reply", priority=True),
        Binding("ctrl+k", "copy_code", "Copy code", id="copy_code", show=False, priority=True),
        Binding("ctrl+t", "system_prompt", "System prompt", id="system_prompt", show=False),
        Binding("ctrl+f", "search", "Search", id="search", show=False),
        Binding("ctrl+s", "settings", "Settings", id="settings"),
        Binding("f1", "help", "Help", id="help"),
        Binding("ctrl+c", "interrupt", "Quit", id="interrupt", priority=True, show=False),
        Binding("ctrl+q", "quit", "Quit", id="quit", priority=True),
    ]

    def __init__(
        self,
        service: ChatService,
        conversation_id: int | None = None,
        resume_last: bool = False,
        load_engine_on_start: bool = True,
    ) -> None:
        super().__init__()
        self.service = service
        self.current_id = conversation_id
        self.resume_last = resume_last
        self.load_engine_on_start = load_engine_on_start
        self.generating = False
        self.quitting = False
        self._cancel: threading.Event | None = None
        self._reply_done = threading.Event()
        self._reply_done.set()

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            with Vertical(id="chat"):
                yield ChatView(id="transcript")
                yield ProgressBar(id="memory-progress", show_eta=False)
                yield PromptInput(id="prompt")
        yield StatusBar("Loading model…", id="status")
        yield Footer()

    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    async def on_mount(self) -> None:
        self.apply_keymap(self.service.settings.keymap)
        if self.current_id is None and self.resume_last:
            latest = self.service.store.latest_conversation()
            self.current_id = latest.id if latest else None
        if self.current_id is not None:
            try:
                self.service.conversation(self.current_id)
            except StorageError as exc:
                self.notify(str(exc), severity="error")
                self.current_id = None
        await self.open_conversation(self.current_id)
        self.query_one(PromptInput).focus()
        if self.load_engine_on_start:
            self.load_engine()

    def apply_keymap(self, keymap: dict[str, str]) -> None:
        known = {b.id for b in self.BINDINGS if isinstance(b, Binding)}
        unknown = sorted(set(keymap) - known)
        if unknown:
            self.notify(
                f"Unknown key binding ids ignored: {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(k for k in known if k))}.",
                severity="warning",
            )
        self.set_keymap({k: v for k, v in keymap.items() if k in known})

    # -- engine ----------------------------------------------------------------------------------

    @work(thread=True, group="engine", exclusive=True)
    def load_engine(self) -> None:
        try:
            self.service.engine  # noqa: B018 - loading is the point
            self.post_message(EngineReady(self.service.status(self.current_id), None))
        except EXPECTED_ERRORS as exc:
            self.post_message(EngineReady(None, str(exc)))

    def on_engine_ready(self, event: EngineReady) -> None:
        if event.error:
            self.status_bar.show_status(f"No model loaded: {event.error}")
            self.notify(event.error, title="Model", severity="error", timeout=10)
        elif event.status:
            self.status_bar.show_status(event.status)

    # -- conversations ---------------------------------------------------------------------------

    async def open_conversation(self, conversation_id: int | None) -> None:
        self.current_id = conversation_id
        messages = self.service.messages(conversation_id) if conversation_id else []
        await self.chat_view.show_messages(messages)
        await self.refresh_sidebar()
        status = self.service.status(conversation_id)
        if status:
            self.status_bar.show_status(status)
        if conversation_id is not None and messages:
            self.prepare_memory(conversation_id)

    @work(thread=True, group="memory", exclusive=True)
    def prepare_memory(self, conversation_id: int) -> None:
        """Restore the conversation's saved memory, or rebuild it, before the next message."""

        def progress(done: int, total: int) -> None:
            self.post_message(MemoryProgress(done, total))

        try:
            report = self.service.open(conversation_id, progress)
        except EXPECTED_ERRORS as exc:
            self.post_message(MemoryReady(conversation_id, None, False, None, str(exc)))
            return
        self.post_message(MemoryReady(
            conversation_id, report.message(), report.kind == "rebuilt",
            self.service.status(conversation_id), None,
        ))

    def on_memory_progress(self, event: MemoryProgress) -> None:
        bar = self.query_one("#memory-progress", ProgressBar)
        bar.display = True
        bar.update(total=event.total, progress=event.done)

    def on_memory_ready(self, event: MemoryReady) -> None:
        self.query_one("#memory-progress", ProgressBar).display = False
        if event.conversation_id != self.current_id:
            return
        if event.error:
            self.notify(event.error, title="Memory", severity="error", timeout=10)
            return
        if event.note:
            self.notify(event.note, title="Memory",
                        severity="warning" if event.rebuilt else "information")
        if event.status and not self.generating:
            self.status_bar.show_status(event.status)

    async def refresh_sidebar(self) -> None:
        query = self.sidebar.query_text
        if query.strip():
            await self.sidebar.show_hits(self.service.search(query), self.current_id)
        else:
            await self.sidebar.show_conversations(
                self.service.list_conversations(), self.current_id
            )

    async def on_sidebar_selected(self, event: Sidebar.Selected) -> None:
        if event.conversation_id == self.current_id:
            return
        if self.generating:
            self.notify("A reply is still being written: press Esc to stop it first.")
            return
        await self.open_conversation(event.conversation_id)

    async def on_sidebar_search_changed(self, event: Sidebar.SearchChanged) -> None:
        await self.refresh_sidebar()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """App actions are for the main screen; a dialog keeps its own keys."""
        on_main_screen = self.screen is self.screen_stack[0]
        return on_main_screen or action not in MAIN_SCREEN_ACTIONS

    def _busy(self) -> bool:
        if self.generating:
            self.notify("Wait for the reply to finish, or press Esc to stop it.")
        return self.generating

    def _need_conversation(self) -> bool:
        if self.current_id is None:
            self.notify("This chat is empty: send a message first.")
            return False
        return True

    async def action_new_chat(self) -> None:
        if not self._busy():
            await self.open_conversation(None)
            self.query_one(PromptInput).focus()

    def action_rename(self) -> None:
        if self._busy() or not self._need_conversation():
            return
        conv_id = self.current_id
        current = self.service.conversation(conv_id).title

        async def done(title: str | None) -> None:
            if title:
                self.service.rename(conv_id, title)
                await self.refresh_sidebar()
                self.notify(f"Renamed to “{title}”.")

        self.push_screen(TextPromptScreen("Rename conversation", current), done)

    def action_delete(self) -> None:
        if self._busy() or not self._need_conversation():
            return
        conv_id = self.current_id
        title = self.service.conversation(conv_id).title

        async def done(confirmed: bool | None) -> None:
            if confirmed:
                self.service.delete(conv_id)
                await self.open_conversation(None)
                self.notify(f"Deleted “{title}”.")

        self.push_screen(ConfirmScreen(f"Delete “{title}” and all its messages?"), done)

    def action_export(self) -> None:
        if not self._need_conversation():
            return
        conv_id = self.current_id
        record = self.service.conversation(conv_id)
        stem = Path.cwd() / f"{slugify(record.title)}-{conv_id}"

        def done(choice: tuple[str, Path] | None) -> None:
            if choice is None:
                return
            fmt, path = choice
            try:
                path.write_text(self.service.export(conv_id, fmt), encoding="utf-8")
            except OSError as exc:
                self.notify(f"Could not write {path}: {exc.strerror}", severity="error")
                return
            self.notify(f"Exported to {path}")

        self.push_screen(ExportScreen(stem), done)

    def action_system_prompt(self) -> None:
        if self._busy():
            return
        if self.current_id is None:
            self.current_id = self.service.new_conversation().id
        conv_id = self.current_id
        current = self.service.conversation(conv_id).system_prompt or ""

        async def done(prompt: str | None) -> None:
            if prompt is not None:
                self.service.set_system_prompt(conv_id, prompt)
                await self.refresh_sidebar()
                self.notify("System prompt set for this conversation.")

        self.push_screen(
            TextPromptScreen("System prompt for this conversation", current, allow_empty=True),
            done,
        )

    def action_settings(self) -> None:
        async def done(settings: Settings | None) -> None:
            if settings is None:
                return
            reload = settings.engine_key() != self.service.settings.engine_key()
            self.service.update_settings(settings)
            self.apply_keymap(settings.keymap)
            self.notify("Settings saved.")
            if reload and not self.generating:
                self.status_bar.show_status("Loading model…")
                self.load_engine()
                if self.current_id is not None:
                    self.prepare_memory(self.current_id)
            else:
                status = self.service.status(self.current_id)
                if status:
                    self.status_bar.show_status(status)

        self.push_screen(SettingsScreen(self.service.settings), done)

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_help(self) -> None:
        keymap = self.service.settings.keymap
        keys = [
            (keymap.get(b.id or "", b.key), b.description)
            for b in self.BINDINGS
            if isinstance(b, Binding)
        ]
        keys.append(("ctrl+p", "Command palette"))
        self.push_screen(HelpScreen(keys))

    def action_copy_reply(self) -> None:
        text = self.chat_view.last_reply_text()
        if not text:
            self.notify("There is no reply to copy yet.")
            return
        self.copy_to_clipboard(text)
        self.notify("Reply copied to the clipboard.")

    def action_copy_code(self) -> None:
        for box_text in reversed(self._reply_texts()):
            blocks = CODE_BLOCK.findall(box_text)
            if blocks:
                self.copy_to_clipboard(blocks[-1])
                self.notify("Code block copied to the clipboard.")
                return
        self.notify("No code block in the replies.")

    def _reply_texts(self) -> list[str]:
        from ui.widgets.chat_view import MessageBox

        return [b.content for b in self.chat_view.query(MessageBox) if b.role == "assistant"]

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New chat", "Start a new conversation", self.action_new_chat)
        yield SystemCommand("Rename chat", "Rename this conversation", self.action_rename)
        yield SystemCommand("Delete chat", "Delete this conversation", self.action_delete)
        yield SystemCommand("Export chat", "Save as Markdown or JSON", self.action_export)
        yield SystemCommand("Regenerate", "Write the last reply again", self.action_regenerate)
        yield SystemCommand("Stop", "Stop the reply being written", self.action_stop)
        yield SystemCommand("Copy reply", "Copy the last reply", self.action_copy_reply)
        yield SystemCommand("Copy code block", "Copy the last code block", self.action_copy_code)
        yield SystemCommand(
            "System prompt", "Set this conversation's system prompt", self.action_system_prompt
        )
        yield SystemCommand("Settings", "Model, sampling, compression, keys", self.action_settings)
        yield SystemCommand("Search chats", "Full-text search across all chats",
                            self.action_search)
        yield SystemCommand("Help", "Keys and tips", self.action_help)

    # -- chatting --------------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        if self._busy():
            return
        self.generating = True
        prompt = self.query_one(PromptInput)
        text = event.text.strip()
        if self.current_id is None:
            self.current_id = self.service.new_conversation().id
        prompt.clear()
        await self.chat_view.add_message("user", text)
        await self._start_reply(self.current_id, text)

    async def action_regenerate(self) -> None:
        if self._busy() or not self._need_conversation():
            return
        messages = self.service.messages(self.current_id)
        if not messages or messages[-1].role != "assistant":
            self.notify("There is no reply to regenerate yet.")
            return
        self.generating = True
        await self.chat_view.drop_last_reply()
        await self._start_reply(self.current_id, None)

    async def _start_reply(self, conversation_id: int, text: str | None) -> None:
        self.generating = True
        self._cancel = threading.Event()
        self._reply_done.clear()
        await self.chat_view.start_reply()
        self.status_bar.show_status("Thinking…")
        self._reply_worker(conversation_id, text, self._cancel)

    @work(thread=True, group="reply", exclusive=True)
    def _reply_worker(
        self, conversation_id: int, text: str | None, cancel: threading.Event
    ) -> None:
        error = None
        try:
            if text is None:
                pieces = self.service.regenerate(conversation_id, cancel)
            else:
                pieces = self.service.send(conversation_id, text, cancel)
            for piece in pieces:
                self.post_message(ReplyPiece(piece))
        except EXPECTED_ERRORS as exc:
            error = str(exc)
        except Exception as exc:  # keep the app alive and say what happened
            error = f"Unexpected error: {exc!r}"
        finally:
            self._reply_done.set()
        try:
            status = self.service.status(conversation_id)
        except EXPECTED_ERRORS:
            status = None
        self.post_message(ReplyDone(conversation_id, error, status,
                                    self.service.reply_notice(conversation_id)))

    async def on_reply_piece(self, event: ReplyPiece) -> None:
        await self.chat_view.write_reply(event.text)

    async def on_reply_done(self, event: ReplyDone) -> None:
        self.generating = False
        self._cancel = None
        if self.quitting:
            return
        messages = self.service.messages(event.conversation_id)
        last = messages[-1] if messages else None
        if event.conversation_id != self.current_id:
            pass
        elif last is not None and last.role == "assistant" and not event.error:
            await self.chat_view.finish_reply(last.content, last.interrupted)
        else:
            await self.chat_view.finish_reply("", False)
            await self.chat_view.show_messages(messages)
        if event.error:
            self.notify(event.error, title="Reply failed", severity="error", timeout=10)
        elif event.notice:
            self.notify(event.notice, severity="warning", timeout=10)
        if event.status:
            self.status_bar.show_status(event.status)
        await self.refresh_sidebar()

    def action_stop(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.notify("Stopped.")

    async def action_interrupt(self) -> None:
        """Ctrl+C: stop the reply if one is running (keeping it), else quit."""
        if self.generating:
            self.action_stop()
        else:
            await self.action_quit()

    async def action_quit(self) -> None:
        """Quit, but first let a running reply stop and be saved."""
        self.quitting = True
        if self._cancel is not None:
            self._cancel.set()
        if not self._reply_done.is_set():
            await self.workers.wait_for_complete()
        self.exit()
