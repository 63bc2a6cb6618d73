"""The message box: Enter sends, Shift+Enter / Ctrl+J add a line, and it grows with its text.

What it sends holds no control characters or escape sequences (plain_text): a paste can
carry them, and stored raw they would reach a terminal later through `ccm-chat list` or
`export`."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea

from ccm_chat.app.terminal_text import plain_text

NEWLINE_KEYS = {"shift+enter", "ctrl+j", "alt+enter"}


class PromptInput(TextArea):
    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs: object) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, **kwargs)  # type: ignore[arg-type]
        self.placeholder = "Message (Enter to send, Shift+Enter or Ctrl+J for a new line)"

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = plain_text(self.text)
            if text.strip():
                self.post_message(self.Submitted(text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def _on_paste(self, event: events.Paste) -> None:
        """A paste goes in without its control characters, as it would be sent. (Textual
        runs TextArea's own _on_paste after this one, on the text left here.)"""
        event.text = plain_text(event.text)
