"""Persistent state of ccm-chat in SQLite. Knows bytes and rows, nothing of models or tensors."""

from storage.store import (
    ConversationRecord,
    MemoryStateRecord,
    MessageRecord,
    NotFoundError,
    SearchHit,
    StorageError,
    Store,
)

__all__ = [
    "ConversationRecord",
    "MemoryStateRecord",
    "MessageRecord",
    "NotFoundError",
    "SearchHit",
    "StorageError",
    "Store",
]
