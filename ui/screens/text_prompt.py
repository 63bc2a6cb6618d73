"""Ask for one piece of text: a title, a system prompt, a file path."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from ccm_chat.app.terminal_text import plain_text


class TextPromptScreen(ModalScreen[str | None]):
    """Dismisses with the text entered, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = "", allow_empty: bool = False) -> None:
        super().__init__()
        self.prompt_title = title
        self.value = value
        self.allow_empty = allow_empty

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.prompt_title, classes="question", markup=False)
            yield Input(value=self.value, id="text")
            with Horizontal(classes="buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._finish(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self._finish(self.query_one("#text", Input).value)
        else:
            self.dismiss(None)

    def _finish(self, text: str) -> None:
        text = plain_text(text)  # a title or prompt holds no control characters
        if not text.strip() and not self.allow_empty:
            self.notify("Please enter some text.", severity="warning")
            return
        self.dismiss(text.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)
