"""The transcript: one box per message, Markdown rendered, the reply streamed into place.

A chat opens at its end. Only the last PAGE messages are mounted at first, so a long chat
paints at once; earlier ones are mounted a page at a time as the view is scrolled to its top.
The view is anchored to the bottom while messages render and a reply grows, until the user
scrolls. Streaming goes through Markdown's stream API (it batches fragments when the screen
is slower than the model); when the reply ends it gets one full update, so the final render
is exact.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Markdown
from textual.widgets.markdown import MarkdownStream

from ccm_chat.app.records import MessageRecord

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "system": "System"}
PAGE = 40  # messages mounted at a time: more than a tall terminal shows


class MessageBox(Vertical, can_focus=True):
    """One message; focus it (click, or Tab) to pick it for "Delete/Edit message"."""

    def __init__(self, role: str, content: str, interrupted: bool = False,
                 message_id: int | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.interrupted = interrupted
        self.message_id = message_id

    @classmethod
    def of(cls, record: MessageRecord) -> MessageBox:
        return cls(record.role, record.content, record.interrupted, record.id)

    def compose(self) -> ComposeResult:
        yield Label(self._title(), classes="role", markup=False)  # a stored role is data
        yield Markdown(self.content)

    def _title(self) -> str:
        title = ROLE_TITLES.get(self.role, self.role)
        return f"{title} (interrupted)" if self.interrupted else title

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    async def finish(self, content: str, interrupted: bool) -> None:
        self.content = content
        self.interrupted = interrupted
        self.query_one(".role", Label).update(self._title())
        await self.markdown.update(content)


class ChatView(VerticalScroll):
    """The message list of the open conversation."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._stream: MarkdownStream | None = None
        self._reply: MessageBox | None = None
        self._earlier: list[MessageRecord] = []  # not mounted yet, oldest first
        self._loading_earlier = False

    @property
    def boxes(self) -> list[MessageBox]:
        return list(self.query_children(MessageBox))

    @property
    def unmounted(self) -> int:
        """How many earlier messages are not mounted yet."""
        return len(self._earlier)

    async def show_messages(self, messages: list[MessageRecord]) -> None:
        """Show a conversation from its end: the last PAGE messages now, the rest on demand."""
        self._stream, self._reply = None, None
        await self.remove_children()
        # a message takes 3 rows at least: this many overflow even a tall terminal, so there
        # is always a scroll bar to reach the earlier ones with
        first = max(PAGE, self.app.size.height // 2)
        self._earlier = list(messages[:-first]) if len(messages) > first else []
        shown = messages[-first:]
        if shown:
            if self._earlier:
                await self.mount(self._earlier_hint())
            await self.mount_all([MessageBox.of(m) for m in shown])
        else:
            await self.mount(Label("Say hello to start the conversation.", id="empty-hint"))
        self.anchor()

    def _earlier_hint(self) -> Label:
        return Label(f"↑ {len(self._earlier):,} earlier messages: scroll up to see them",
                     id="earlier-hint")

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        if new < 1 and old >= 1 and self._earlier and not self._loading_earlier:
            self._loading_earlier = True
            self.call_later(self.show_earlier)

    async def show_earlier(self) -> int:
        """Mount the page before the first mounted message, keeping the view where it was."""
        try:
            if not self._earlier:
                return 0
            page, self._earlier = self._earlier[-PAGE:], self._earlier[:-PAGE]
            first = self.boxes[0] if self.boxes else None
            for hint in self.query("#earlier-hint"):
                await hint.remove()
            await self.mount_all([MessageBox.of(m) for m in page], before=first)
            if self._earlier:
                await self.mount(self._earlier_hint(), before=0)
            if first is not None:
                self.call_after_refresh(self.scroll_to_widget, first, top=True, animate=False)
            return len(page)
        finally:
            self._loading_earlier = False

    async def add_message(self, role: str, content: str) -> MessageBox:
        for hint in self.query("#empty-hint"):
            await hint.remove()
        box = MessageBox(role, content)
        await self.mount(box)
        self.anchor()
        return box

    async def start_reply(self) -> None:
        self._reply = await self.add_message("assistant", "")
        self._stream = Markdown.get_stream(self._reply.markdown)

    async def write_reply(self, piece: str) -> None:
        if self._stream is not None:
            await self._stream.write(piece)

    async def finish_reply(self, content: str, interrupted: bool) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if self._reply is not None:
            await self._reply.finish(content, interrupted)
            self._reply = None

    async def drop_last(self, role: str) -> None:
        boxes = self.boxes
        if boxes and boxes[-1].role == role:
            await boxes[-1].remove()

    def set_ids(self, messages: list[MessageRecord]) -> None:
        """Give the boxes mounted since the last load their stored ids, matched from the end."""
        for box, record in zip(reversed(self.boxes), reversed(messages), strict=False):
            if box.message_id is None and box.role == record.role:
                box.message_id = record.id

    def selected(self) -> MessageBox | None:
        """The message box that has focus, if one does."""
        focused = self.screen.focused if self.is_attached else None
        return focused if isinstance(focused, MessageBox) and focused.parent is self else None

    def last_reply_text(self) -> str | None:
        replies = [b for b in self.boxes if b.role == "assistant"]
        return replies[-1].content if replies else None

    def reply_texts(self) -> list[str]:
        return [b.content for b in self.boxes if b.role == "assistant"]
