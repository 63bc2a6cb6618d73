"""One line at the bottom, most important first: level and method, the memory, the speed, then
the model and device. A narrow terminal cuts the line at its end with an ellipsis, so what is
cut is what matters least."""

from __future__ import annotations

from textual.widgets import Static

from ccm_chat.app.service import Status

SEPARATOR = " │ "


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def memory_parts(status: Status, compact: bool = False) -> list[str]:
    """Exchanges held verbatim / as compressed slots (when any), tokens, bytes, ratio."""
    parts = []
    held = [(status.verbatim_exchanges, "v", " verbatim"),
            (status.compressed_exchanges, "c", " compressed")]
    shown = [f"{n}{short if compact else long}" for n, short, long in held if n]
    if shown:
        parts.append(("+" if compact else " + ").join(shown))
    tokens = (f"{status.tokens_in_context:,} tok" if compact
              else f"{status.tokens_in_context:,}/{status.context_window:,} tok")
    parts += [tokens, human_bytes(status.memory_bytes), f"{status.ratio:.1f}x"]
    return parts


def format_status(status: Status, flag: str | None = None, compact: bool = False) -> str:
    """The line, most important first; `compact` (a narrow bar) shortens the memory part."""
    parts = [flag] if flag else []
    parts.append(f"{status.level}: {status.method}")
    memory = memory_parts(status, compact)
    parts += [" · ".join(memory)] if compact else memory
    if status.recalled:
        parts.append(status.recalled)
    if status.tokens_per_second is not None:
        parts.append(f"{status.tokens_per_second:.1f} tok/s")
    if status.memory_note:
        parts.append(status.memory_note)
    parts += [status.model, status.device]
    return SEPARATOR.join(parts)


COMPACT_BELOW = 100  # columns: a narrower bar shortens the memory part


class StatusBar(Static):
    """Shows a Status, or a line of its own ("Thinking…"), after the flag if one is set."""

    DEFAULT_CSS = """
    StatusBar {
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, content: str = "", **kwargs: object) -> None:
        super().__init__(content, markup=False, **kwargs)  # type: ignore[arg-type]
        self.status: Status | None = None
        self.line: str | None = content or None
        self.flag: str | None = None  # e.g. "read-only: open in another window"

    def show_status(self, status: Status | str | None) -> None:
        if isinstance(status, str):
            self.line = status
        elif status is not None:
            self.status, self.line = status, None
        self._show()

    def set_flag(self, flag: str | None) -> None:
        self.flag = flag
        self._show()

    def _show(self) -> None:
        if self.line is not None or self.status is None:
            text = SEPARATOR.join(p for p in (self.flag, self.line) if p)
        else:
            text = format_status(self.status, self.flag, self.size.width < COMPACT_BELOW)
        self.update(text)

    def on_resize(self) -> None:
        self._show()
