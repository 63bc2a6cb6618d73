"""The conversation list, newest first, with full-text search across every chat.

Down (or Enter) in the search box moves to the results; picking one posts Selected."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

from ccm_chat.app.records import ConversationRecord, SearchHit


class ConversationItem(ListItem):
    def __init__(self, conversation_id: int, title: str, detail: str | None = None) -> None:
        self.conversation_id = conversation_id
        labels = [Label(title, classes="title", markup=False)]
        if detail:
            labels.append(Label(detail, classes="detail", markup=False))
        super().__init__(*labels)


class Sidebar(Vertical):
    # the list has its own Down, so this one only acts from the search box
    BINDINGS = [Binding("down", "focus_results", "Results", show=False)]

    class Selected(Message):
        def __init__(self, conversation_id: int) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    class SearchChanged(Message):
        def __init__(self, query: str) -> None:
            super().__init__()
            self.query = query

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search all chats", id="search")
        yield ListView(id="conversations")

    @property
    def list_view(self) -> ListView:
        return self.query_one("#conversations", ListView)

    @property
    def query_text(self) -> str:
        return self.query_one("#search", Input).value

    async def show_conversations(
        self, records: list[ConversationRecord], current: int | None
    ) -> None:
        items = [ConversationItem(r.id, r.title) for r in records]
        await self._replace(items, current)

    async def show_hits(self, hits: list[SearchHit], current: int | None) -> None:
        items = [
            ConversationItem(h.conversation_id, h.conversation_title, f"{h.role}: {h.snippet}")
            for h in hits
        ] or [ListItem(Label("No matches", classes="detail"), disabled=True)]
        await self._replace(items, current)

    async def _replace(self, items: list[ListItem], current: int | None) -> None:
        view = self.list_view
        await view.clear()
        await view.extend(items)
        ids = [getattr(item, "conversation_id", None) for item in items]
        view.index = ids.index(current) if current in ids else 0

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.SearchChanged(event.value))

    def action_focus_results(self) -> None:
        self.list_view.focus()

    @on(Input.Submitted, "#search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.list_view.focus()

    @on(ListView.Selected, "#conversations")
    def _selected(self, event: ListView.Selected) -> None:
        event.stop()
        conv_id = getattr(event.item, "conversation_id", None)
        if conv_id is not None:
            self.post_message(self.Selected(conv_id))
