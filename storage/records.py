"""What the store hands out: its errors and its records (conversations, messages, search
hits, memory states, leases), each a frozen dataclass made from a row."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Clock = Callable[[], datetime]


class StorageError(RuntimeError):
    """A database problem explained in words a user can act on."""


class NotFoundError(StorageError):
    pass


class DatabaseLockedError(StorageError):
    """Another program held the write lock for longer than the store waits; nothing was written."""


class DiskFullError(StorageError):
    """The disk (or SQLite's size limit) had no room for a write; nothing of it was written."""


@dataclass(frozen=True)
class ConversationRecord:
    id: int
    title: str
    created: str
    updated: str
    model: str | None
    system_prompt: str | None
    settings: dict[str, Any]


@dataclass(frozen=True)
class MessageRecord:
    id: int
    conversation_id: int
    role: str
    content: str
    created: str
    status: str
    token_count: int | None

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


@dataclass(frozen=True)
class SearchHit:
    conversation_id: int
    conversation_title: str
    message_id: int
    role: str
    snippet: str


@dataclass(frozen=True)
class MemoryStateRecord:
    """A saved conversation memory: opaque bytes plus what they must match to be reused."""

    id: int
    conversation_id: int
    message_id: int | None
    created: str
    backend: str
    model_fingerprint: str
    policy: dict[str, Any]
    position: int
    tokens_held: int
    tokens_seen: int
    size: int
    checksum: str
    blob: bytes

    @property
    def intact(self) -> bool:
        return len(self.blob) == self.size and checksum(self.blob) == self.checksum


@dataclass(frozen=True)
class LeaseRecord:
    """Who writes a conversation now: one process (a window) at a time."""

    conversation_id: int
    owner: str
    pid: int
    host: str
    acquired: str
    heartbeat: str

    def describe(self) -> str:
        """A short, readable name for the window that holds it."""
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"ccm-chat process {self.pid}{where}, since {self.acquired[11:16]} UTC"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (unknown on Windows: assume so)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether the process has exited and waits only for its parent to reap it (Linux's
    /proc tells; elsewhere: assume not)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[:1] == ["Z"]  # the name may hold ") "


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> datetime:
    return datetime.now(UTC)


def conversation_record(row: dict[str, Any]) -> ConversationRecord:
    return ConversationRecord(
        id=row["id"],
        title=row["title"],
        created=row["created"],
        updated=row["updated"],
        model=row["model"],
        system_prompt=row["system_prompt"],
        settings=json.loads(row["settings"] or "{}"),
    )


def message_record(row: dict[str, Any]) -> MessageRecord:
    return MessageRecord(**{k: row[k] for k in MessageRecord.__dataclass_fields__})
