"""Leases: which window (process) writes a conversation, kept alive by its heartbeat; a
lease whose process is gone or whose heartbeat is stale is free to take."""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

import sqlite_utils

from ccm_chat.storage.records import LeaseRecord, pid_alive


class LeasesMixin:
    """The store's leases table, on its transaction and read paths."""

    def acquire_lease(self, conversation_id: int, owner: str, stale_after: float,
                      force: bool = False) -> LeaseRecord | None:
        """Make `owner` (this process's window) the writer of a conversation.

        Returns None when it now holds the lease, or the live lease of another owner, left as
        it is. A lease is stale, and taken over, when its process is gone (same host) or its
        heartbeat is older than `stale_after` seconds. `force` takes it whatever it is.
        """
        now = self._clock()

        def write(db: sqlite_utils.Database) -> LeaseRecord | None:
            rows = list(db.query("SELECT * FROM leases WHERE conversation_id = ?",
                                 (conversation_id,)))
            held = LeaseRecord(**rows[0]) if rows else None
            if (held is not None and held.owner != owner and not force
                    and _lease_live(held, now, stale_after)):
                return held
            stamp = now.isoformat(timespec="milliseconds")
            db.execute(
                """
                INSERT INTO leases (conversation_id, owner, pid, host, acquired, heartbeat)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT(conversation_id) DO UPDATE SET
                    acquired = CASE WHEN owner = excluded.owner THEN acquired
                                    ELSE excluded.acquired END,
                    owner = excluded.owner, pid = excluded.pid, host = excluded.host,
                    heartbeat = excluded.heartbeat
                """,
                (conversation_id, owner, os.getpid(), socket.gethostname(), stamp, stamp),
            )
            return None

        # every message is written under this lease: a full disk makes room here too
        return self._write_making_room(write)

    def lease(self, conversation_id: int) -> LeaseRecord | None:
        rows = self._read("SELECT * FROM leases WHERE conversation_id = ?", (conversation_id,))
        return LeaseRecord(**rows[0]) if rows else None

    def live_lease(self, conversation_id: int, stale_after: float) -> LeaseRecord | None:
        """The conversation's lease if one is held and not stale (a read: nothing changes)."""
        held = self.lease(conversation_id)
        if held is None or not _lease_live(held, self._clock(), stale_after):
            return None
        return held

    def heartbeat(self, owner: str) -> None:
        """Say that `owner`'s leases are still in use."""
        with self._tx() as db:
            db.execute("UPDATE leases SET heartbeat = ? WHERE owner = ?", (self._now(), owner))

    def release_lease(self, conversation_id: int, owner: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM leases WHERE conversation_id = ? AND owner = ?",
                       (conversation_id, owner))

    def release_leases(self, owner: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM leases WHERE owner = ?", (owner,))


def _lease_live(lease: LeaseRecord, now: datetime, stale_after: float) -> bool:
    if now - datetime.fromisoformat(lease.heartbeat) > timedelta(seconds=stale_after):
        return False
    return lease.host != socket.gethostname() or pid_alive(lease.pid)
