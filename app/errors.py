"""Errors the app layer hands the UI: each message is written for the user to read."""

from __future__ import annotations


class ChatError(Exception):
    """An expected failure of a chat action; str(error) says what happened and what to do."""


class RebuildCancelled(ChatError):
    """The user stopped a memory rebuild; the chat stays usable and rebuilds on next use."""


class NotSavedError(ChatError):
    """The user's message was not saved (nothing of it was written): keep it to send again."""
