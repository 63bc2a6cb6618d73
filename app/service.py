"""ChatService: the one place where the engine and the store meet.

The transcript in SQLite is the source of truth; an engine conversation is resumed from the
saved memory (or rebuilt from the transcript) on first use and kept in step afterwards. A user
message is taken into the model's memory first, then committed, then the reply runs: a message
that cannot fit is refused before anything of it is saved, and one that is saved always has
its memory. The reply is committed when it ends, marked interrupted when it was stopped, and
then the memory is saved. One lock serializes engine use: the engine has one context, shared
by every conversation.

Every failure the UI can meet comes out as app.errors.ChatError, worded for the user.

One window writes a conversation at a time: a lease in the store names the process that
holds it (kept alive by a heartbeat thread); another window opens it read-only until it takes
over. A transcript changed underneath (by another window) is re-read before the next reply,
never interleaved with the memory this window had.

Each chat's state in this window is one OpenChat (app/open_chat.py), kept by ChatState
(app/chat_state.py) with the engine and the leases (app/leases.py). Here: opening, sending
(the intake itself is app/intake.py) and saving memories; replies are app/replies.py, edits
app/transcript_edits.py, the status bar's view app/status.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import replace
from typing import Any

from ccm_chat.app import leases
from ccm_chat.app.chat_state import EngineFactory, user_errors
from ccm_chat.app.engine_api import EngineConversation, EngineLike, Progress
from ccm_chat.app.engine_extras import release_memory
from ccm_chat.app.errors import ChatError, NotSavedError, RebuildCancelled
from ccm_chat.app.export import export_conversation
from ccm_chat.app.intake import (
    STOPPED_BEFORE_SENT,
    SendCancelled,
    cancellable,
    stop_if_cancelled,
    take_in,
)
from ccm_chat.app.leases import Leases
from ccm_chat.app.open_chat import OpenChat, UnsavedReply, signature
from ccm_chat.app.replies import ReplyKeeping, ReplyNotSaved
from ccm_chat.app.resume import ResumeReport, resume, save_memory
from ccm_chat.app.settings import Settings
from ccm_chat.app.status import Status, chat_status
from ccm_chat.app.transcript_edits import TranscriptEditing
from ccm_chat.engine import ContextFullError, Engine, EngineError, SamplingParams
from ccm_chat.engine.models import DEFAULT_MODEL_NAME
from ccm_chat.storage import (
    ConversationRecord,
    DatabaseLockedError,
    MessageRecord,
    SearchHit,
    StorageError,
    Store,
)

__all__ = [  # what the UI, the CLI and the tests import from here
    "LOW_DISK_NOTICE", "READ_ONLY_DATABASE", "STOPPED_BEFORE_SENT", "ChatService",
    "ReplyNotSaved", "SendCancelled", "Status", "UnsavedReply", "load_engine", "make_title",
    "sampling_params",
]

TITLE_LENGTH = 48
# A memory state bigger than this is saved after a reply at most every LARGE_STATE_SAVE_S,
# and always when the window closes: saving a 140 MB state took 1.4 s
# on the dev CPU, after every reply, and an 8B model's uncompressed memory at 32k tokens is
# 4.3 GB. A state left behind by a crash is restored and the replies after it replayed.
LARGE_STATE_BYTES = 64 << 20
LARGE_STATE_SAVE_S = 60.0

READ_ONLY_DATABASE = ("This database is read-only: you can read and search, but nothing new "
                      "can be saved.")
LOW_DISK_NOTICE = ("Memory not saved: the disk is nearly full, so this chat's memory will be "
                   "rebuilt from its transcript when it is reopened, which takes longer. Your "
                   "messages are saved. Free some disk space to keep the memory again.")
CLOSE_WAIT_S = 3.0  # how long closing waits for a reply still in the engine before it goes


def load_engine(settings: Settings, model_override: str | None) -> EngineLike:
    """The engine the settings describe; the app and `ccm-chat ask` both load it here."""
    return Engine.load(
        model=model_override or settings.model_path or None,
        backend=settings.backend,
        compression=settings.compression,
        n_ctx=settings.context_size,
        n_gpu_layers=settings.n_gpu_layers if settings.n_gpu_layers >= 0 else None,
        n_threads=settings.threads or None,  # None: the engine's default, which leaves room
    )


def sampling_params(settings: Settings, **overrides: Any) -> SamplingParams:
    """How replies are sampled, from the settings (and a command line's overrides)."""
    values = {"max_tokens": settings.max_tokens, "temperature": settings.temperature,
              "top_p": settings.top_p, "repeat_penalty": settings.repeat_penalty,
              "dry_multiplier": settings.dry_multiplier}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(**values)


def make_title(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1].rstrip() + "…"


class ChatService(TranscriptEditing, ReplyKeeping):
    """The app's one way to the engine and the store (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        settings: Settings | None = None,
        engine_factory: EngineFactory = load_engine,
        model_override: str | None = None,
        owner: str | None = None,
    ) -> None:
        """`owner` names this window in the leases table: by default the process, since
        one process is one window (tests pass two owners to play two windows)."""
        self.store = store
        self.settings = settings or Settings.load(store)
        self._engine_factory = engine_factory
        self._model_override = model_override
        self._engine: EngineLike | None = None
        self._engine_key: tuple[Any, ...] | None = None
        self.load_error: str | None = None  # why the last model load failed, if it did
        self.memory_error: str | None = None  # why the last memory save failed, if it did
        self._low_disk: str | None = None  # a memory not saved for room: "pending", "told"
        self._chats: dict[int, OpenChat] = {}  # every chat this window has touched
        self._lock = threading.RLock()
        self._use = threading.RLock()  # held while a conversation's memory is in the engine
        self.owner = owner or leases.PROCESS_OWNER
        self._leases = Leases(store, self.owner)

    def close(self) -> bool:
        """Save what a reply left unsaved (the reply, then the memory), release every
        conversation this window holds, stop the heartbeat, unload; True when all of it ran.

        Quitting is never held hostage by the engine: a reply or intake that has not
        stopped within CLOSE_WAIT_S is left to the end of the process (its thread is a
        daemon), the engine is not freed under it, and False says so (the caller may then
        end the process at once, without the interpreter's teardown)."""
        self._leases.stop()
        if not self._use.acquire(timeout=CLOSE_WAIT_S):
            self._leases.release_all()
            return False
        try:
            self.save_unsaved_replies()
            self.save_pending()
            self._leases.release_all()
            self.close_engine()
        finally:
            self._use.release()
        return True

    @property
    def writable(self) -> bool:
        """False when the database cannot be written (a read-only file or mount): the chats
        can be read and searched, and nothing new is sent."""
        return self.store.writable

    def update_settings(self, settings: Settings) -> None:
        with user_errors("The settings were not saved"):
            settings.save(self.store)
        self.settings = settings  # a new level reloads the engine: memories resume under it

    def with_settings(self, **changes: Any) -> Settings:
        return replace(self.settings, **changes)

    # -- conversations --------------------------------------------------------------------------

    def list_conversations(self) -> list[ConversationRecord]:
        with user_errors("Could not list the conversations"):
            return self.store.list_conversations()

    def search(self, query: str) -> list[SearchHit]:
        with user_errors("Search failed"):
            return self.store.search(query)

    def conversation(self, conversation_id: int) -> ConversationRecord:
        with user_errors("Could not open the conversation"):
            return self.store.get_conversation(conversation_id)

    def messages(self, conversation_id: int) -> list[MessageRecord]:
        """The transcript, as the UI shows it (what transcript_changed compares against)."""
        with user_errors("Could not read the conversation"):
            found = self.store.messages(conversation_id)
            self._chat(conversation_id).shown = signature(found)
            return found

    def transcript_changed(self, conversation_id: int) -> bool:
        """Whether another window wrote to the conversation since this one last read it."""
        chat = self._chats.get(conversation_id)
        if chat is None or chat.shown is None:
            return False
        with user_errors("Could not read the conversation"):
            return self.store.transcript_signature(conversation_id) != chat.shown

    def new_conversation(self, title: str = "New chat") -> ConversationRecord:
        with user_errors("Could not start a new chat"):
            record = self.store.create_conversation(
                title=title, model=self._model_name(), system_prompt=self.settings.system_prompt
            )
        chat = self._chat(record.id)
        chat.shown = chat.synced = signature([])
        return record

    def rename(self, conversation_id: int, title: str) -> ConversationRecord:
        with user_errors("The chat was not renamed"):
            return self.store.rename_conversation(conversation_id, title)

    def delete(self, conversation_id: int) -> None:
        self._writable(conversation_id, "The chat was not deleted")
        with user_errors("The chat was not deleted"):
            self.store.delete_conversation(conversation_id)
        self._forget(conversation_id)
        self._chats.pop(conversation_id, None)  # its unsaved reply went with it

    def set_system_prompt(self, conversation_id: int, prompt: str) -> ConversationRecord:
        self._writable(conversation_id, "The system prompt was not set")
        with user_errors("The system prompt was not set"):
            record = self.store.update_conversation(conversation_id, system_prompt=prompt or None)
        self._forget(conversation_id)
        return record

    def export(self, conversation_id: int, fmt: str) -> str:
        with user_errors("The conversation was not exported"):
            record = self.store.get_conversation(conversation_id)
            return export_conversation(record, self.store.messages(conversation_id), fmt,
                                       model_name=self._export_model_name(record))

    def _export_model_name(self, record: ConversationRecord) -> str:
        """The real name of the model the chat ran on (old chats stored "default" or a path)."""
        if record.model and record.model != "default":
            if self._engine is not None and record.model == str(self._engine.info.model_path):
                return self._engine.info.model_name
            return record.model
        return self._engine.info.model_name if self._engine is not None else DEFAULT_MODEL_NAME

    # -- drafts ---------------------------------------------------------------------------------

    def draft(self, conversation_id: int | None) -> str:
        """What was left unsent in the chat's message box (None: the new chat), as typed;
        "" when there is none or it cannot be read."""
        try:
            return self.store.draft(conversation_id)
        except StorageError:
            return ""

    def save_draft(self, conversation_id: int | None, text: str) -> None:
        """Keep the message box's unsent text for the chat (blank: forget it). It waits only
        briefly for a lock: ChatError when the database refuses it (locked, full); nothing
        on a read-only database, which was said at open."""
        if not self.writable:
            return
        with user_errors("Your unsent text was not kept"):
            self.store.save_draft(conversation_id, text)

    # -- chatting -------------------------------------------------------------------------------

    def open(
        self,
        conversation_id: int,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> ResumeReport:
        """Make the conversation's memory ready: restored from its saved state, or rebuilt.

        When another window holds the conversation, nothing is loaded and the report says
        read_only and who holds it. `progress(done, total)` follows a rebuild; setting `cancel`
        stops it with RebuildCancelled, and the next open or send rebuilds again.
        """
        with self._use, user_errors("Could not open the conversation"):
            record = self.store.get_conversation(conversation_id)
            holder = None
            with suppress(StorageError):  # locked: it opens anyway, the next write claims it
                holder = self._claim(conversation_id)
            if holder is not None:
                return ResumeReport("read_only", "", 0.0, 0, read_only=True, held_by=holder)
            stored = self.store.messages(conversation_id)
            self._follow(conversation_id, stored)
            try:
                self._engine_conversation(record, stored, progress, cancel)
            except ContextFullError as exc:
                why = (f"This chat's memory cannot be made: {exc} The transcript is safe: "
                       "delete or edit its longest message, or pick a compression level.")
                raise ChatError(why) from exc
            report = self._chats[conversation_id].report
            assert report is not None  # made with the live memory
            return report

    def _engine_conversation(
        self, record: ConversationRecord, messages: list[MessageRecord],
        progress: Progress | None = None, cancel: threading.Event | None = None,
    ) -> EngineConversation:
        """The live engine conversation for a stored one, resumed if it is not live yet."""
        chat = self._chat(record.id)
        if chat.live is None:
            engine = self.engine
            live, report = resume(
                engine, self.store, record, messages,
                engine.compression_for(self.settings.compression), cancellable(progress, cancel),
            )
            chat.live, chat.synced, chat.report = live, signature(messages), report
            chat.stats = live.stats()
            if report.kind == "rebuilt":
                self._save(record.id, messages[-1].id, live)
            return live
        return chat.live

    def _save(self, conversation_id: int, message_id: int, live: EngineConversation,
              reply_bytes: int = 0) -> None:
        """Save the memory; a failure is reported, never raised: the transcript is safe.
        After a reply (`reply_bytes`: the memory it left), a large memory saved less than
        LARGE_STATE_SAVE_S ago waits."""
        chat = self._chat(conversation_id)
        if (reply_bytes > LARGE_STATE_BYTES
                and time.monotonic() - chat.saved_at < LARGE_STATE_SAVE_S):
            chat.memory_pending = True
            return
        try:
            saved = save_memory(self.store, self.engine, conversation_id, message_id, live)
            self.memory_error = None
            if saved is None:  # the store kept the disk's last MiB for the transcript
                self._low_disk = self._low_disk or "pending"
            chat.saved_at = time.monotonic()
            chat.memory_pending = False
        except (StorageError, EngineError, OSError) as exc:
            self.memory_error = f"Could not save the conversation's memory: {exc}"

    def low_disk_notice(self) -> str | None:
        """Once a session: that a memory was not saved because the disk is nearly full (the
        store leaves its last MiB to the transcript), so reopening the chat will be slow."""
        if self._low_disk != "pending":
            return None
        self._low_disk = "told"
        return LOW_DISK_NOTICE

    def save_pending(self) -> None:
        """Save the memories whose save a reply put off (when the window closes), each as it
        stands for the stored transcript, when it is still in step with it. It takes the
        engine's use (_use) before the engine's lock, as a reply does: never call it under
        _lock."""
        with self._use:
            for conversation_id in sorted(i for i, c in self._chats.items()
                                          if c.memory_pending and c.unsaved_reply is None):
                chat = self._chats[conversation_id]
                try:
                    now = self.store.transcript_signature(conversation_id)
                except StorageError:
                    continue
                count, last_id, _ = now
                if chat.live is not None and count and chat.synced == now:
                    self._save(conversation_id, last_id, chat.live)
            for chat in self._chats.values():
                chat.memory_pending = False

    def _params(self) -> SamplingParams:
        return sampling_params(self.settings)

    def send(
        self,
        conversation_id: int | None,
        text: str,
        cancel: threading.Event | None = None,
        on_saved: Callable[[MessageRecord], None] | None = None,
    ) -> Iterator[str]:
        """Take the user's message in, commit it, then stream and commit the reply.

        `conversation_id` None starts a new chat with this message (created in the same
        transaction, so a refused message leaves no empty chat). Before anything is saved it
        may raise NotSavedError (a ChatError): no model, the message does not fit, the
        database is locked, or the chat is open in another window; the text is then the
        caller's to keep. Setting `cancel` while the message is taken in (a long paste under
        a compression level) stops it with SendCancelled, a NotSavedError: nothing is saved.
        `on_saved(message)` is called once the message is committed. A reply the store
        refuses is kept (ReplyNotSaved, then unsaved_reply) and saved again before the next
        message.
        """
        text = text.strip()
        if not text:
            raise NotSavedError("Cannot send an empty message.")
        if not self.writable:
            raise NotSavedError(f"Your message was not sent: {READ_ONLY_DATABASE}")
        with self._use:
            stop_if_cancelled(cancel)
            engine = self._require_engine()
            with user_errors("Your message was not sent", NotSavedError):
                if conversation_id is None:
                    record, before = None, []
                    live = engine.new_conversation(
                        system=self.settings.system_prompt or None,
                        compression=engine.compression_for(self.settings.compression))
                else:
                    record = self.store.get_conversation(conversation_id)
                    self._writable(conversation_id, "Your message was not sent")
                    self._flush_reply(conversation_id, "Your message was not sent")
                    before = self.store.messages(conversation_id)
                    self._follow(conversation_id, before)
                    live = self._resume_for_send(record, before, cancel)
            take_in(live, text, cancel, self._undo_intake(conversation_id, live),
                    self.settings.compression)
            saved = self._commit_user(record, before, live, text)
            conversation_id = saved.conversation_id
            if record is None:
                chat = self._chat(conversation_id)
                chat.live, chat.report = live, ResumeReport("new", "", 0.0, 0)
                with suppress(StorageError):  # the lease is taken again on the next write
                    self._claim(conversation_id)
            self._wrote(conversation_id)
            if on_saved is not None:
                on_saved(saved)
            yield from self._stream(conversation_id, live, cancel)

    def _resume_for_send(self, record: ConversationRecord, before: list[MessageRecord],
                         cancel: threading.Event | None) -> EngineConversation:
        """The chat's live memory; a rebuild it needs first stops when the send is cancelled."""
        try:
            return self._engine_conversation(record, before, cancel=cancel)
        except RebuildCancelled as exc:
            raise SendCancelled(STOPPED_BEFORE_SENT) from exc

    def _undo_intake(self, conversation_id: int | None,
                     live: EngineConversation) -> Callable[[int, bool], None]:
        """How a failed intake is undone: the memory is cut back to its `n` messages; a chat's
        cache that may be half-written is resumed afresh, a new chat that never was frees its
        cells (dead weight)."""
        def undo(n: int, usable: bool) -> None:
            live.truncate(n)
            if conversation_id is None:
                release_memory(self._engine, live)
            elif not usable:
                self._forget(conversation_id)

        return undo

    def _commit_user(self, record: ConversationRecord | None, before: list[MessageRecord],
                     live: EngineConversation, text: str) -> MessageRecord:
        """Save the message (and title the chat by it) in one transaction, or nothing."""
        try:
            if record is None:
                saved = self.store.start_conversation(
                    make_title(text), self._model_name(), self.settings.system_prompt, text)
            else:
                title = None
                if record.title == "New chat" and not any(m.role == "user" for m in before):
                    title = make_title(text)
                saved = self.store.add_message(record.id, "user", text, title=title)
        except StorageError as exc:
            live.truncate(len(live.messages) - 1)
            if isinstance(exc, DatabaseLockedError):
                raise NotSavedError(f"Your message was not saved, nothing of it was written: "
                                    f"{exc}") from exc
            raise NotSavedError(f"Your message was not saved: {exc}") from exc
        return saved

    def status(self, conversation_id: int | None) -> Status | None:
        if self._engine is None:
            return None
        chat = self._chats.get(conversation_id) if conversation_id is not None else None
        return chat_status(self._engine, self.settings.compression, chat)
