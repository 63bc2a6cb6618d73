"""What every key does, built from the action table (ui/actions.py) so it never goes stale.

The text scrolls inside the dialog and Close stays below it, so a short terminal still
reaches it (and Esc or F1 close it from anywhere)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Markdown

INTRO = """\
# ccm-chat

Chat with a local model. Your conversations are saved as you go and are there when you
come back. Type in the box at the bottom: **Enter** sends, **Shift+Enter** or **Ctrl+J**
adds a new line. Click a message (or Tab to it) to pick it for *Delete message* or
*Edit message*. Press **Ctrl+P** for the command palette: it runs every action below by name.

| Key | Action | What it does |
|---|---|---|
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "close", "Close"), Binding("f1", "close", "Close")]

    def __init__(self, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        table = "\n".join(f"| `{key}` | {title} | {what} |" for key, title, what in self.rows)
        with Vertical(classes="dialog wide tall"):
            with VerticalScroll(id="help-text"):
                yield Markdown(INTRO + table)
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        self.query_one("#help-text", VerticalScroll).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
