"""Pick a format and a file for exporting the open conversation."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class ExportScreen(ModalScreen[tuple[str, Path] | None]):
    """Dismisses with (format, path), or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default_stem: Path) -> None:
        super().__init__()
        self.default_stem = default_stem

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Export this conversation to a file", classes="question")
            yield Input(value=str(self.default_stem), id="path")
            with Horizontal(classes="buttons"):
                yield Button("Markdown", variant="primary", id="md")
                yield Button("JSON", variant="primary", id="json")
                yield Button("Cancel", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        fmt = event.button.id or "md"
        path = Path(self.query_one("#path", Input).value.strip() or str(self.default_stem))
        path = path.expanduser()
        if path.suffix.lower() not in (".md", ".json"):
            path = path.with_name(path.name + f".{fmt}")
        self.dismiss((fmt, path))

    def action_cancel(self) -> None:
        self.dismiss(None)
