"""One line at the bottom: model, device, level, tokens held, memory, ratio and speed."""

from __future__ import annotations

from textual.widgets import Static

from app.service import Status


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def format_status(status: Status) -> str:
    parts = [
        status.model,
        status.device,
        f"{status.level}: {status.method}",
        f"{status.tokens_in_context:,}/{status.context_window:,} tok",
        human_bytes(status.memory_bytes),
        f"{status.ratio:.1f}x",
    ]
    if status.tokens_per_second is not None:
        parts.append(f"{status.tokens_per_second:.1f} tok/s")
    if status.memory_note:
        parts.append(status.memory_note)
    return " │ ".join(parts)


class StatusBar(Static):
    def show_status(self, status: Status | str) -> None:
        self.update(status if isinstance(status, str) else format_status(status))
