"""The bar a long memory rebuild shows: how far it is, the time left, and a Cancel button.

The time left comes from the rate of the progress(done, total) calls seen so far."""

from __future__ import annotations

import time
from collections.abc import Callable

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, Label, ProgressBar


class Eta:
    """Time left of a rebuild, from the rate of its progress(done, total) calls so far."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start: tuple[float, int] | None = None

    def left(self, done: int, total: int) -> float | None:
        now = self._clock()
        if self._start is None or done < self._start[1]:
            self._start = (now, done)
            return None
        t0, d0 = self._start
        if done <= d0 or now <= t0:
            return None
        return (total - done) * (now - t0) / (done - d0)


def format_left(seconds: float | None) -> str:
    if seconds is None:
        return "estimating time left…"
    if seconds < 60:
        return f"about {max(1, round(seconds))} s left"
    return f"about {seconds / 60:.0f} min left"


class RebuildBar(Horizontal):
    """Hidden until a rebuild reports progress; Cancel (or Esc, the app's) posts Cancel."""

    class Cancel(Message):
        """The user asked to stop the rebuild."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._eta = Eta()

    def compose(self) -> ComposeResult:
        yield Label("Rebuilding memory", id="rebuild-label")
        yield ProgressBar(id="memory-progress", show_eta=False)
        yield Label("", id="rebuild-eta")
        yield Button("Cancel (Esc)", id="cancel-rebuild", compact=True)

    def show_progress(self, done: int, total: int) -> None:
        self.display = True
        self.query_one(ProgressBar).update(total=total, progress=done)
        self.query_one("#rebuild-eta", Label).update(format_left(self._eta.left(done, total)))

    def hide(self) -> None:
        self.display = False
        self._eta = Eta()

    def cancelling(self) -> None:
        self.query_one("#rebuild-eta", Label).update("cancelling…")

    @on(Button.Pressed, "#cancel-rebuild")
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.post_message(self.Cancel())
