"""The transcript: one box per message, Markdown rendered, the reply streamed into place.

Streaming goes through Markdown's stream API (it batches fragments when the screen is slower
than the model), and the view is anchored to the bottom while a reply grows. When the reply
ends it gets one full update, so the final render is exact.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Markdown
from textual.widgets._markdown import MarkdownStream

from storage import MessageRecord

ROLE_TITLES = {"user": "You", "assistant": "Assistant", "system": "System"}


class MessageBox(Vertical):
    def __init__(self, role: str, content: str, interrupted: bool = False) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.interrupted = interrupted

    def compose(self) -> ComposeResult:
        yield Label(self._title(), classes="role")
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

    async def show_messages(self, messages: list[MessageRecord]) -> None:
        await self.remove_children()
        boxes = [MessageBox(m.role, m.content, m.interrupted) for m in messages]
        if boxes:
            await self.mount_all(boxes)
        else:
            await self.mount(Label("Say hello to start the conversation.", id="empty-hint"))
        self.scroll_end(animate=False)

    async def add_message(self, role: str, content: str) -> MessageBox:
        for hint in self.query("#empty-hint"):
            await hint.remove()
        box = MessageBox(role, content)
        await self.mount(box)
        self.scroll_end(animate=False)
        return box

    async def start_reply(self) -> None:
        self._reply = await self.add_message("assistant", "")
        self._stream = Markdown.get_stream(self._reply.markdown)
        self.anchor()

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
        self.scroll_end(animate=False)

    async def drop_last_reply(self) -> None:
        boxes = list(self.query(MessageBox))
        if boxes and boxes[-1].role == "assistant":
            await boxes[-1].remove()

    def last_reply_text(self) -> str | None:
        replies = [b for b in self.query(MessageBox) if b.role == "assistant"]
        return replies[-1].content if replies else None
