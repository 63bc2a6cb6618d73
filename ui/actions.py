"""The one table of the app's actions: it drives the key bindings, the palette and F1 help.

Each action is named once, here. `ChatApp.action_<id>` runs it, or for an action of the open
chat the chat pane's method `<id>` (through `ChatApp.action_pane`); the id is also the key a
user remaps it by in settings (`regenerate=ctrl+g`). An action without a key is reached
through the command palette (Ctrl+P) only.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding

PALETTE_KEY = "ctrl+p"


@dataclass(frozen=True)
class Action:
    """One thing a user can do, with everything the three places that show it need."""

    id: str  # ChatApp.action_<id>, and the binding id for the keymap
    key: str | None  # None: palette only
    label: str  # short, for the footer
    title: str  # the command palette's name for it
    help: str  # one line: what it does
    footer: bool = True  # shown in the footer
    priority: bool = False  # wins over the message box, which has its own meaning for the key
    main_only: bool = True  # only while no dialog is open
    palette: bool = True  # listed in the command palette
    pane: bool = False  # the chat pane's method <id> runs it, not ChatApp.action_<id>

    @property
    def action(self) -> str:
        """The action string Textual runs for it."""
        return f"pane({self.id!r})" if self.pane else self.id


ACTIONS: tuple[Action, ...] = (
    Action("new_chat", "ctrl+n", "New", "New chat", "Start a new conversation"),
    Action("stop", "escape", "Stop", "Stop",
           "Stop the reply being written (it is kept), or a memory rebuild", main_only=False,
           pane=True),
    Action("regenerate", "ctrl+r", "Regenerate", "Regenerate", "Write the last reply again",
           pane=True),
    Action("rename", "f2", "Rename", "Rename chat", "Rename this conversation"),
    Action("delete", "ctrl+d", "Delete", "Delete chat",
           "Delete this conversation (asks first)", priority=True),
    Action("export", "ctrl+e", "Export", "Export chat",
           "Save this conversation as Markdown or JSON", priority=True),
    Action("copy_reply", "ctrl+y", "Copy reply", "Copy reply",
           "Copy the last reply to the clipboard", priority=True, pane=True),
    Action("copy_code", "ctrl+k", "Copy code", "Copy code block",
           "Copy the last code block of the replies", footer=False, priority=True, pane=True),
    Action("system_prompt", "ctrl+t", "System prompt", "System prompt",
           "Set this conversation's system prompt", footer=False),
    Action("search", "ctrl+f", "Search", "Search chats", "Full-text search across all chats",
           footer=False),
    Action("settings", "ctrl+s", "Settings", "Settings",
           "Model, threads, sampling, compression level, keys"),
    Action("help", "f1", "Help", "Help", "Keys and tips"),
    Action("delete_message", None, "Delete message", "Delete message",
           "Delete the selected message (else the last one) from this chat", pane=True),
    Action("edit_message", None, "Edit message", "Edit message",
           "Edit the selected message (else your last one); the reply is written again", pane=True),
    Action("take_over", None, "Take over", "Take over chat",
           "Write in a chat that another window holds (that window becomes read-only)", pane=True),
    Action("interrupt", "ctrl+c", "Quit", "Stop or quit",
           "Stop the reply while one is written, else quit", footer=False, priority=True,
           main_only=False, palette=False),
    Action("quit", "ctrl+q", "Quit", "Quit", "Quit (a reply being written is saved first)",
           priority=True, main_only=False, palette=False),
)

MAIN_SCREEN_ONLY = frozenset(a.id for a in ACTIONS if a.main_only)


def bindings() -> list[Binding]:
    """The App's BINDINGS, one per action that has a key."""
    return [
        Binding(a.key, a.action, a.label, id=a.id, show=a.footer, priority=a.priority)
        for a in ACTIONS
        if a.key is not None
    ]


def help_rows(keymap: dict[str, str]) -> list[tuple[str, str, str]]:
    """(keys, title, what it does) for the help screen, with the user's remapped keys."""
    rows = [(keymap.get(a.id, a.key or "palette"), a.title, a.help) for a in ACTIONS]
    rows.append((PALETTE_KEY, "Command palette", "Find any command by name"))
    return rows
