"""Persistent state of ccm-chat in SQLite. Knows bytes and rows, nothing of models or tensors."""

from ccm_chat.storage.store import (
    ConversationRecord,
    DatabaseLockedError,
    DiskFullError,
    LeaseRecord,
    MemoryStateRecord,
    MessageRecord,
    NotFoundError,
    SearchHit,
    StorageError,
    Store,
    database_size,
)

__all__ = [
    "ConversationRecord",
    "DatabaseLockedError",
    "DiskFullError",
    "LeaseRecord",
    "MemoryStateRecord",
    "MessageRecord",
    "NotFoundError",
    "SearchHit",
    "StorageError",
    "Store",
    "database_size",
]
