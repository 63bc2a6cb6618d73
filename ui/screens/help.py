"""What every key does, built from the app's live bindings so it never goes stale."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Markdown

INTRO = """\
# ccm-chat

Chat with a local model. Your conversations are saved as you go and are there when you
come back. Type in the box at the bottom: **Enter** sends, **Shift+Enter** or **Ctrl+J**
adds a new line. Press **Ctrl+P** for the command palette.

| Key | Action |
|---|---|
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "close", "Close"), Binding("f1", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        rows = "\n".join(f"| `{key}` | {desc} |" for key, desc in self.keys)
        with Vertical(classes="dialog wide"):
            yield Markdown(INTRO + rows)
            yield Button("Close", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)
