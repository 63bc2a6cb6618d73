"""The ccm-chat Textual app: layout and routing.

The sidebar lists the chats, the chat pane (ui/widgets/chat_pane.py) shows the open one and
runs its replies, the status bar says what the memory holds. The app loads the engine, routes
a picked chat to the pane and runs the actions of ui/actions.py; dialogs are awaited inside
workers (push_screen_wait), so each action reads top to bottom. A failing service call is
caught where it is made and becomes a notice: no traceback reaches the terminal.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.containers import Horizontal
from textual.driver import Driver
from textual.message import Message
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import Footer, Input

from ccm_chat.app.export import default_export_path, write_export
from ccm_chat.app.records import ConversationRecord
from ccm_chat.app.service import ChatService
from ccm_chat.app.settings import Settings
from ccm_chat.ui.actions import ACTIONS, MAIN_SCREEN_ONLY, PALETTE_KEY, bindings, help_rows
from ccm_chat.ui.screens.confirm import ConfirmScreen
from ccm_chat.ui.screens.export import ExportScreen
from ccm_chat.ui.screens.help import HelpScreen
from ccm_chat.ui.screens.settings import SettingsScreen
from ccm_chat.ui.screens.text_prompt import TextPromptScreen
from ccm_chat.ui.widgets.chat_pane import ChatPane, attempt
from ccm_chat.ui.widgets.sidebar import Sidebar
from ccm_chat.ui.widgets.status_bar import StatusBar

CSS_FILE = Path(__file__).resolve().parent.parent / "assets" / "ccm_chat.tcss"


class EngineReady(Message):
    def __init__(self, error: str | None) -> None:
        super().__init__()
        self.error = error


class ChatApp(App[None]):
    CSS_PATH = str(CSS_FILE)
    TITLE = "ccm-chat"
    COMMAND_PALETTE_BINDING = PALETTE_KEY
    BINDINGS = bindings()
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (80, "-normal")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (28, "-tall")]

    def __init__(
        self,
        service: ChatService,
        conversation_id: int | None = None,
        resume_last: bool = False,
        load_engine_on_start: bool = True,
    ) -> None:
        super().__init__()
        self.service = service
        self.start_id = conversation_id
        self.resume_last = resume_last
        self.load_engine_on_start = load_engine_on_start
        self.quitting = False

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = False) -> None:
        """Every notice of the app, its widgets' and screens' included, is plain text: they
        carry titles, paths and error messages, in which `[/b]` would crash the toast and
        `[@click=...]` would make a live action. No notice of ccm-chat uses markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def get_driver_class(self) -> type[Driver]:
        """Textual's choice, but on Linux and macOS the driver whose input thread survives
        bytes that are not UTF-8 (ui/input_driver.py)."""
        chosen = super().get_driver_class()
        if chosen.__module__ != "textual.drivers.linux_driver":
            return chosen  # Windows, or a driver named in $TEXTUAL_DRIVER
        from ccm_chat.ui.input_driver import LenientLinuxDriver  # imports termios: POSIX only

        return LenientLinuxDriver if chosen.__name__ == "LinuxDriver" else chosen

    # -- layout ----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            yield ChatPane(self.service, id="chat")
        yield StatusBar("Loading model…", id="status")
        yield Footer()

    @property
    def pane(self) -> ChatPane:
        return self.query_one(ChatPane)

    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def current_id(self) -> int | None:
        return self.pane.conversation_id

    @property
    def generating(self) -> bool:
        return self.pane.generating

    async def on_mount(self) -> None:
        self.apply_keymap(self.service.settings.keymap)
        start = self.start_id
        if start is None and self.resume_last:
            chats, _ = attempt(lambda: self.service.list_conversations())
            start = chats[0].id if chats else None
        if start is not None:
            _, error = attempt(lambda: self.service.conversation(start))
            if error:
                self.notify(error, severity="error")
                start = None
        await self.pane.open(start)
        await self.refresh_sidebar()
        self.pane.focus_prompt()
        if self.load_engine_on_start:
            self.load_engine()

    def apply_keymap(self, keymap: dict[str, str]) -> None:
        known = {a.id for a in ACTIONS if a.key is not None}
        unknown = sorted(set(keymap) - known)
        if unknown:
            self.notify(
                f"Unknown key binding ids ignored: {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(known))}.",
                severity="warning",
            )
        self.set_keymap({k: v for k, v in keymap.items() if k in known})

    # -- engine ----------------------------------------------------------------------------------

    @work(thread=True, group="engine", exclusive=True)
    def load_engine(self) -> None:
        _, error = attempt(lambda: self.service.engine)
        self.post_message(EngineReady(error))

    def on_engine_ready(self, event: EngineReady) -> None:
        if self._winding_down():
            return
        self.pane.no_model = event.error
        if event.error:
            self.status_bar.show_status(f"No model loaded: {event.error}")
            self.notify(f"{event.error} Pick a model file in settings (Ctrl+S).",
                        title="No model", severity="error", timeout=10)
        else:
            self.pane.show_status()

    # -- routing ---------------------------------------------------------------------------------

    def _winding_down(self) -> bool:
        """True while the app shuts down: a worker's late news has nowhere to go then."""
        return self.quitting or not self.query(StatusBar)

    def on_chat_pane_status_changed(self, event: ChatPane.StatusChanged) -> None:
        if self._winding_down():
            return
        bar = self.status_bar
        bar.flag = event.flag
        if event.status is not None:
            bar.show_status(event.status)
        elif self.pane.no_model:
            bar.show_status(f"No model loaded: {self.pane.no_model}")
        else:
            bar.show_status(None)

    async def on_chat_pane_list_changed(self, event: ChatPane.ListChanged) -> None:
        if not self._winding_down():
            await self.refresh_sidebar()

    async def refresh_sidebar(self) -> None:
        query = self.sidebar.query_text
        if query.strip():
            hits, error = attempt(lambda: self.service.search(query))
            await self.sidebar.show_hits(hits or [], self.current_id)
        else:
            chats, error = attempt(lambda: self.service.list_conversations())
            await self.sidebar.show_conversations(chats or [], self.current_id)
        if error:
            self.notify(error, title="Conversation list", severity="error")

    async def on_sidebar_selected(self, event: Sidebar.Selected) -> None:
        if event.conversation_id != self.current_id:
            if self.pane.generating:
                self.notify("A reply is still being written: press Esc to stop it first.")
                return
            await self.open_conversation(event.conversation_id)
        self.pane.focus_prompt()

    async def on_sidebar_search_changed(self, event: Sidebar.SearchChanged) -> None:
        await self.refresh_sidebar()

    async def open_conversation(self, conversation_id: int | None) -> None:
        await self.pane.open(conversation_id)
        await self.refresh_sidebar()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """App actions are for the main screen; a dialog keeps its own keys."""
        on_main_screen = self.screen is self.screen_stack[0]
        name = str(parameters[0]) if action == "pane" and parameters else action
        return on_main_screen or name not in MAIN_SCREEN_ONLY

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action in ACTIONS:
            if action.palette:
                yield SystemCommand(action.title, action.help, partial(
                    self.run_action, action.action))

    def _current_record(self, busy_matters: bool = True) -> ConversationRecord | None:
        """The open chat's record; None (and why, in a notice) when there is none to act on."""
        if busy_matters and self.pane.busy():
            return None
        cid = self.current_id
        if cid is None:
            self.notify("This chat is empty: send a message first.")
            return None
        record, error = attempt(lambda: self.service.conversation(cid))
        if error:
            self.notify(error, severity="error")
        return record

    # -- actions (one per row of ui/actions.py) --------------------------------------------------

    async def action_new_chat(self) -> None:
        if not self.pane.busy():
            await self.open_conversation(None)
            self.pane.focus_prompt()

    def action_pane(self, name: str) -> None:
        """An action of the open chat (stop, regenerate, copy, edit...): the pane runs it."""
        getattr(self.pane, name)()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(help_rows(self.service.settings.keymap)))

    @work(group="dialog")
    async def action_rename(self) -> None:
        if (record := self._current_record()) is None:
            return
        cid = record.id
        title = await self.push_screen_wait(TextPromptScreen("Rename conversation", record.title))
        if not title:
            return
        _, error = attempt(lambda: self.service.rename(cid, title))
        if error:
            self.notify(error, title="Not renamed", severity="error")
            return
        await self.refresh_sidebar()
        self.notify(f"Renamed to “{title}”.")

    @work(group="dialog")
    async def action_delete(self) -> None:
        if (record := self._current_record()) is None:
            return
        cid = record.id
        if not await self.push_screen_wait(
                ConfirmScreen(f"Delete “{record.title}” and all its messages?")):
            return
        _, error = attempt(lambda: self.service.delete(cid))
        if error:
            self.notify(error, title="Not deleted", severity="error")
            return
        await self.open_conversation(None)
        self.notify(f"Deleted “{record.title}”.")

    @work(group="dialog")
    async def action_export(self) -> None:
        if (record := self._current_record(busy_matters=False)) is None:
            return
        cid = record.id
        choice = await self.push_screen_wait(
            ExportScreen(default_export_path(record).with_suffix("")))
        if choice is None:
            return
        fmt, path = choice
        text, error = attempt(lambda: self.service.export(cid, fmt))
        if error is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_export(path, text)
            except OSError as exc:
                error = f"Could not write {path}: {exc.strerror or exc}"
        if error:
            self.notify(error, title="Not exported", severity="error")
            return
        self.notify(f"Exported to {path}")

    @work(group="dialog")
    async def action_system_prompt(self) -> None:
        if self.pane.busy():
            return
        cid = self.current_id
        current = ""
        if cid is not None:
            record, error = attempt(lambda: self.service.conversation(cid))
            current = (record.system_prompt or "") if record else ""
        prompt = await self.push_screen_wait(
            TextPromptScreen("System prompt for this conversation", current, allow_empty=True))
        if prompt is None:
            return
        if cid is None:
            record, error = attempt(lambda: self.service.new_conversation())
            if error:
                self.notify(error, title="System prompt not set", severity="error")
                return
            cid = record.id
            await self.pane.open(cid, carry_text=True)
        _, error = attempt(lambda: self.service.set_system_prompt(cid, prompt))
        if error:
            self.notify(error, title="System prompt not set", severity="error")
            return
        await self.refresh_sidebar()
        self.notify("System prompt set for this conversation.")

    @work(group="dialog")
    async def action_settings(self) -> None:
        settings: Settings | None = await self.push_screen_wait(
            SettingsScreen(self.service.settings))
        if settings is None:
            return
        reload = settings.engine_key() != self.service.settings.engine_key()
        _, error = attempt(lambda: self.service.update_settings(settings))
        if error:
            self.notify(error, title="Settings not saved", severity="error")
            return
        self.apply_keymap(settings.keymap)
        self.notify("Settings saved.")
        if reload and not self.pane.generating:
            self.pane.no_model = None
            self.status_bar.show_status("Loading model…")
            self.load_engine()
            if self.current_id is not None:
                self.pane.prepare_memory(self.current_id)
        else:
            self.pane.show_status()

    async def action_interrupt(self) -> None:
        """Ctrl+C: stop the reply if one is running (keeping it), else quit."""
        if self.pane.generating:
            self.action_pane("stop")
        else:
            await self.action_quit()

    async def action_quit(self) -> None:
        """Quit, but first let a running reply stop and be saved, and release the chat."""
        self.quitting = True
        await self.pane.shutdown()
        self.exit()

