"""One writer per chat: the lease in the store names the window (process) that writes a
chat, a heartbeat thread says its leases are still in use, and a lease whose window is gone
(its process ended, or its heartbeat went stale) is free to take. Another window polls
held_elsewhere to see who holds a chat it shows read-only."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from contextlib import suppress

from ccm_chat.storage import StorageError, Store

HEARTBEAT_SECONDS = 15.0  # how often a window says its leases are still in use
LEASE_STALE_SECONDS = 60.0  # a lease whose heartbeat is older is free to take
PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """The leases `owner` (one window) holds in `store`, and the heartbeat that keeps them.

    Store errors are raised as they are (the caller words them), except on releasing them
    all, which is best effort."""

    def __init__(self, store: Store, owner: str) -> None:
        self.store = store
        self.owner = owner
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def claim(self, conversation_id: int, force: bool = False) -> str | None:
        """Take the chat's lease (`force`: whoever holds it); None when this window holds it
        now, else who does, in words."""
        holder = self.store.acquire_lease(conversation_id, self.owner, LEASE_STALE_SECONDS,
                                          force=force)
        if holder is not None:
            return holder.describe()
        self._start_heartbeat()
        return None

    def held_elsewhere(self, conversation_id: int) -> str | None:
        """Who holds the chat if another window does and is still there, else None. Only
        reads: for polling."""
        held = self.store.live_lease(conversation_id, LEASE_STALE_SECONDS)
        if held is None or held.owner == self.owner:
            return None
        return held.describe()

    def release(self, conversation_id: int) -> None:
        self.store.release_lease(conversation_id, self.owner)

    def stop(self) -> None:
        """End the heartbeat (the window closes); the leases stay until released."""
        self._stop.set()

    def release_all(self) -> None:
        with suppress(StorageError):
            self.store.release_leases(self.owner)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return
        store, owner, stop = self.store, self.owner, self._stop

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    store.heartbeat(owner)
                except StorageError:
                    continue  # locked for now: the next beat tries again
                except Exception:  # the store was closed under us: nothing left to keep
                    return

        self._heartbeat = threading.Thread(target=beat, name="ccm-chat-lease", daemon=True)
        self._heartbeat.start()
