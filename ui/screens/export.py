"""Pick a format and a file for exporting the open conversation.

Enter in the path field exports in the format its suffix names (.json: JSON, else Markdown)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

FORMAT_OF_SUFFIX = {".md": "md", ".json": "json"}


class ExportScreen(ModalScreen[tuple[str, Path] | None]):
    """Dismisses with (format, path), or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, default_stem: Path) -> None:
        super().__init__()
        self.default_stem = default_stem

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Export this conversation to a file (Enter: Markdown, or JSON for a "
                        ".json name)", classes="question")
            yield Input(value=str(self.default_stem), id="path")
            with Horizontal(classes="buttons"):
                yield Button("Markdown", variant="primary", id="md")
                yield Button("JSON", variant="primary", id="json")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#path", Input).focus()

    def _path(self) -> Path:
        return Path(self.query_one("#path", Input).value.strip() or str(self.default_stem))

    def _finish(self, fmt: str) -> None:
        path = self._path().expanduser()
        if path.suffix.lower() not in FORMAT_OF_SUFFIX:
            path = path.with_name(path.name + f".{fmt}")
        self.dismiss((fmt, path))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._finish(FORMAT_OF_SUFFIX.get(self._path().suffix.lower(), "md"))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self._finish(event.button.id or "md")

    def action_cancel(self) -> None:
        self.dismiss(None)
