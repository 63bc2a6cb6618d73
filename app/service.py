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
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from typing import Any

from ccm_chat.app.engine_api import EngineConversation, EngineLike, Progress
from ccm_chat.app.errors import ChatError, NotSavedError, RebuildCancelled
from ccm_chat.app.export import export_conversation
from ccm_chat.app.resume import ResumeReport, resume, save_memory
from ccm_chat.app.settings import Settings
from ccm_chat.engine import (
    ContextFullError,
    Engine,
    EngineError,
    MemoryStats,
    SamplingParams,
)
from ccm_chat.engine.errors import CancelledError
from ccm_chat.engine.models import DEFAULT_MODEL_NAME
from ccm_chat.storage import (
    ConversationRecord,
    DatabaseLockedError,
    MessageRecord,
    SearchHit,
    StorageError,
    Store,
)

TITLE_LENGTH = 48
HEARTBEAT_SECONDS = 15.0  # how often a window says its leases are still in use
LEASE_STALE_SECONDS = 60.0  # a lease whose heartbeat is older is free to take

# A memory state bigger than this is saved after a reply at most every LARGE_STATE_SAVE_S,
# and always when the window closes: saving a 140 MB state took 1.4 s
# on the dev CPU, after every reply, and an 8B model's uncompressed memory at 32k tokens is
# 4.3 GB. A state left behind by a crash is restored and the replies after it replayed.
LARGE_STATE_BYTES = 64 << 20
LARGE_STATE_SAVE_S = 60.0
PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

EngineFactory = Callable[[Settings, str | None], EngineLike]
STOPPED_BEFORE_SENT = "Stopped before the message was sent; it is back in the box."
READ_ONLY_DATABASE = ("This database is read-only: you can read and search, but nothing new "
                      "can be saved.")
CLOSE_WAIT_S = 3.0  # how long closing waits for a reply still in the engine before it goes


class SendCancelled(NotSavedError):
    """The user stopped a send while the model took the message in: nothing was saved."""


class ReplyNotSaved(ChatError):
    """The reply was written but the store refused it (locked, disk full): it is kept here
    (ChatService.unsaved_reply) and saved again later, never dropped."""


@dataclass(frozen=True)
class UnsavedReply:
    """A generated reply the store has not taken yet, with all it needs to be saved."""

    text: str
    status: str  # complete or interrupted
    tokens: int
    model: str | None
    error: str  # why the last save failed

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"


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


@dataclass(frozen=True)
class Status:
    """What the status bar shows."""

    model: str
    device: str
    level: str
    method: str
    tokens_in_context: int
    context_window: int
    memory_bytes: int
    ratio: float
    tokens_per_second: float | None
    memory_note: str | None = None
    verbatim_exchanges: int = 0  # exchanges the memory holds word for word
    compressed_exchanges: int = 0  # exchanges it holds compressed (CCM slots) or summarized
    threads: int | None = None  # CPU threads the engine decodes with, when it says
    read_only: bool = False  # open in another window: this one only shows it
    recalled: str | None = None  # what the last reply brought back from earlier exchanges


def make_title(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= TITLE_LENGTH else words[: TITLE_LENGTH - 1].rstrip() + "…"


@contextmanager
def user_errors(doing: str, error: type[ChatError] = ChatError) -> Iterator[None]:
    """Turn a storage or engine failure into a ChatError that starts with what failed."""
    try:
        yield
    except ChatError:
        raise
    except (StorageError, EngineError, OSError) as exc:
        raise error(f"{doing}: {exc}") from exc
    except ValueError as exc:  # the engine and settings refuse bad input with ValueError
        raise error(str(exc)) from exc


class ChatService:
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
        self._live: dict[int, EngineConversation] = {}
        self._reports: dict[int, ResumeReport] = {}
        self._stats: dict[int, MemoryStats] = {}  # read by the UI thread, never the engine
        # transcript signatures (Store.transcript_signature): as the UI last read it, and as
        # the live memory holds it; another window's writes show as a difference
        self._shown: dict[int, tuple[int, int, int]] = {}
        self._synced: dict[int, tuple[int, int, int]] = {}
        self._read_only: set[int] = set()
        self.memory_error: str | None = None  # why the last memory save failed, if it did
        self._saved_at: dict[int, float] = {}  # when each chat's memory was last saved
        self._unsaved: set[int] = set()  # chats whose large memory a reply left unsaved
        self._unsaved_replies: dict[int, UnsavedReply] = {}  # replies the store refused
        self._lock = threading.RLock()
        self._use = threading.RLock()  # held while a conversation's memory is in the engine
        self.owner = owner or PROCESS_OWNER
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- engine ---------------------------------------------------------------------------------

    @property
    def engine(self) -> EngineLike:
        """The loaded engine; (re)loaded when the model settings changed.

        Raises ChatError saying why no model could be loaded (also kept in load_error).
        """
        with self._lock:
            key = (self._model_override, *self.settings.engine_key())
            if self._engine is None or key != self._engine_key:
                self.close_engine()
                try:
                    self._engine = self._engine_factory(self.settings, self._model_override)
                except (EngineError, OSError, ValueError) as exc:
                    self.load_error = str(exc)
                    raise ChatError(str(exc)) from exc
                self.load_error = None
                self._engine_key = key
            return self._engine

    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    @property
    def bytes_per_cell(self) -> int | None:
        """The loaded model's f16 bytes per KV cell (for app.levels.describe_level), if any."""
        model = getattr(self._engine, "model", None)
        return getattr(model, "f16_bytes_per_token", None)

    def _require_engine(self) -> EngineLike:
        try:
            return self.engine
        except ChatError as exc:
            raise NotSavedError(
                f"No model is loaded, so nothing was sent: {exc} Pick a model file in "
                "settings (Ctrl+S), or leave the model path empty for the embedded default."
            ) from exc

    def close_engine(self) -> None:
        with self._lock:
            self._live.clear()
            self._reports.clear()
            self._stats.clear()
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def close(self) -> bool:
        """Save what a reply left unsaved (the reply, then the memory), release every
        conversation this window holds, stop the heartbeat, unload; True when all of it ran.

        Quitting is never held hostage by the engine: a reply or intake that has not
        stopped within CLOSE_WAIT_S is left to the end of the process (its thread is a
        daemon), the engine is not freed under it, and False says so (the caller may then
        end the process at once, without the interpreter's teardown)."""
        self._stop.set()
        if not self._use.acquire(timeout=CLOSE_WAIT_S):
            self._release_all()
            return False
        try:
            self.save_unsaved_replies()
            self.save_pending()
            self._release_all()
            self.close_engine()
        finally:
            self._use.release()
        return True

    def _release_all(self) -> None:
        with suppress(StorageError):
            self.store.release_leases(self.owner)

    @property
    def writable(self) -> bool:
        """False when the database cannot be written (a read-only file or mount): the chats
        can be read and searched, and nothing new is sent."""
        return self.store.writable

    def update_settings(self, settings: Settings) -> None:
        with user_errors("The settings were not saved"):
            settings.save(self.store)
        self.settings = settings  # a new level reloads the engine: memories resume under it

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
            self._shown[conversation_id] = _signature(found)
            return found

    def transcript_changed(self, conversation_id: int) -> bool:
        """Whether another window wrote to the conversation since this one last read it."""
        shown = self._shown.get(conversation_id)
        if shown is None:
            return False
        with user_errors("Could not read the conversation"):
            return self.store.transcript_signature(conversation_id) != shown

    def new_conversation(self, title: str = "New chat") -> ConversationRecord:
        with user_errors("Could not start a new chat"):
            record = self.store.create_conversation(
                title=title, model=self._model_name(), system_prompt=self.settings.system_prompt
            )
        self._shown[record.id] = self._synced[record.id] = _signature([])
        return record

    def _model_name(self) -> str:
        if self._engine is not None:
            return self._engine.info.model_name
        return self._model_override or self.settings.model_path or DEFAULT_MODEL_NAME

    def rename(self, conversation_id: int, title: str) -> ConversationRecord:
        with user_errors("The chat was not renamed"):
            return self.store.rename_conversation(conversation_id, title)

    def delete(self, conversation_id: int) -> None:
        self._writable(conversation_id, "The chat was not deleted")
        with user_errors("The chat was not deleted"):
            self.store.delete_conversation(conversation_id)
        self._forget(conversation_id)
        self._unsaved_replies.pop(conversation_id, None)  # deleted with its chat
        self._shown.pop(conversation_id, None)

    def set_system_prompt(self, conversation_id: int, prompt: str) -> ConversationRecord:
        self._writable(conversation_id, "The system prompt was not set")
        with user_errors("The system prompt was not set"):
            record = self.store.update_conversation(conversation_id, system_prompt=prompt or None)
        self._forget(conversation_id)
        return record

    def _forget(self, conversation_id: int) -> None:
        """Drop the live memory: the next use resumes it from the saved state or the text."""
        live = self._live.pop(conversation_id, None)
        self._unsaved.discard(conversation_id)
        self._synced.pop(conversation_id, None)
        self._reports.pop(conversation_id, None)
        self._stats.pop(conversation_id, None)
        release = getattr(self._engine, "release", None)
        if live is not None and release is not None:
            release(live)  # its KV cells are dead weight now

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

    # -- one writer per conversation ------------------------------------------------------------

    def _claim(self, conversation_id: int, force: bool = False) -> str | None:
        """Take the conversation's lease; None when held, else who holds it."""
        holder = self.store.acquire_lease(conversation_id, self.owner, LEASE_STALE_SECONDS,
                                          force=force)
        if holder is not None:
            self._read_only.add(conversation_id)
            return holder.describe()
        self._read_only.discard(conversation_id)
        self._start_heartbeat()
        return None

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

    def take_over(self, conversation_id: int) -> None:
        """Make this window the conversation's writer, whoever held it; the memory is
        re-read from the stored transcript at the next open or send."""
        with user_errors("Could not take the conversation over"):  # no wait on the engine
            self._claim(conversation_id, force=True)
            self._forget(conversation_id)

    def release(self, conversation_id: int) -> None:
        """Let another window write the conversation (on switching away, or quitting)."""
        self._read_only.discard(conversation_id)
        with user_errors("Could not release the conversation"):
            self.store.release_lease(conversation_id, self.owner)

    def read_only(self, conversation_id: int) -> bool:
        return conversation_id in self._read_only

    def held_elsewhere(self, conversation_id: int) -> str | None:
        """Who holds the conversation if another window does (it may have taken it over since
        this one opened it), else None. Only reads; for the UI to poll."""
        with user_errors("Could not read the conversation"):
            held = self.store.live_lease(conversation_id, LEASE_STALE_SECONDS)
        if held is None or held.owner == self.owner:
            return None
        self._read_only.add(conversation_id)
        return held.describe()

    def _writable(self, conversation_id: int, doing: str) -> None:
        with user_errors(doing, NotSavedError):
            holder = self._claim(conversation_id)
        if holder is not None:
            raise NotSavedError(
                f"{doing}: this chat is open in another window ({holder}). Close it there, "
                "or take it over here."
            )

    def _follow(self, conversation_id: int, stored: list[MessageRecord]) -> None:
        """When another window wrote since the live memory was made, drop it: it is re-read
        from the transcript (its saved state, or a rebuild) instead of interleaving."""
        if (conversation_id in self._live
                and self._synced.get(conversation_id) != _signature(stored)):
            self._forget(conversation_id)

    def _wrote(self, conversation_id: int) -> None:
        """This window wrote: the memory and the view are in step with the store again."""
        try:
            self._shown[conversation_id] = self._synced[conversation_id] = (
                self.store.transcript_signature(conversation_id))
        except StorageError:  # unknown: the memory is re-read before its next use
            self._synced.pop(conversation_id, None)

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
            return self._reports[conversation_id]

    def _engine_conversation(
        self, record: ConversationRecord, messages: list[MessageRecord],
        progress: Progress | None = None, cancel: threading.Event | None = None,
    ) -> EngineConversation:
        """The live engine conversation for a stored one, resumed if it is not live yet."""
        live = self._live.get(record.id)
        if live is None:
            engine = self.engine
            live, report = resume(
                engine, self.store, record, messages,
                engine.compression_for(self.settings.compression), _cancellable(progress, cancel),
            )
            self._live[record.id] = live
            self._synced[record.id] = _signature(messages)
            self._reports[record.id] = report
            self._stats[record.id] = live.stats()
            if report.kind == "rebuilt":
                self._save(record.id, messages[-1].id, live)
        return live

    def _save(self, conversation_id: int, message_id: int, live: EngineConversation,
              reply_bytes: int = 0) -> None:
        """Save the memory; a failure is reported, never raised: the transcript is safe.
        After a reply (`reply_bytes`: the memory it left), a large memory saved less than
        LARGE_STATE_SAVE_S ago waits."""
        if (reply_bytes > LARGE_STATE_BYTES
                and time.monotonic() - self._saved_at.get(conversation_id, -1e9)
                < LARGE_STATE_SAVE_S):
            self._unsaved.add(conversation_id)
            return
        try:
            save_memory(self.store, self.engine, conversation_id, message_id, live)
            self.memory_error = None
            self._saved_at[conversation_id] = time.monotonic()
            self._unsaved.discard(conversation_id)
        except (StorageError, EngineError, OSError) as exc:
            self.memory_error = f"Could not save the conversation's memory: {exc}"

    def save_pending(self) -> None:
        """Save the memories whose save a reply put off (when the window closes), each as it
        stands for the stored transcript, when it is still in step with it. It takes the
        engine's use (_use) before the engine's lock, as a reply does: never call it under
        _lock."""
        with self._use:
            for conversation_id in sorted(self._unsaved - set(self._unsaved_replies)):
                live = self._live.get(conversation_id)
                try:
                    signature = self.store.transcript_signature(conversation_id)
                except StorageError:
                    continue
                count, last_id, _ = signature
                if live is not None and count and self._synced.get(conversation_id) == signature:
                    self._save(conversation_id, last_id, live)
            self._unsaved.clear()

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
            _stop_if_cancelled(cancel)
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
            self._take_in(conversation_id, live, text, cancel)
            saved = self._commit_user(record, before, live, text)
            conversation_id = saved.conversation_id
            if record is None:
                self._live[conversation_id] = live
                self._reports[conversation_id] = ResumeReport("new", "", 0.0, 0)
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

    def _take_in(self, conversation_id: int | None, live: EngineConversation, text: str,
                 cancel: threading.Event | None = None) -> None:
        """Decode the user's message into memory, or refuse it (nothing is saved yet).

        `cancel` is checked between decode batches: a long message stops within one batch,
        and the engine rolls its memory back to where it was."""
        n = len(live.messages)
        try:
            if cancel is None:  # nothing to stop it with: the plain call every engine takes
                live.add_turn("user", text)
            else:
                live.add_turn("user", text, cancel=cancel)
        except CancelledError as exc:
            live.truncate(n)  # the engine rolled its cells back: the memory stays usable
            if conversation_id is None:
                self._drop_after_failure(None, live, n)
            raise SendCancelled(STOPPED_BEFORE_SENT) from exc
        except ContextFullError as exc:
            self._drop_after_failure(conversation_id, live, n)
            raise NotSavedError(self._too_long(exc)) from exc
        except (EngineError, ValueError) as exc:
            self._drop_after_failure(conversation_id, live, n)
            why = f"Your message was not sent: the model failed on it ({exc})."
            raise NotSavedError(why) from exc
        except BaseException:  # Ctrl+C in a terminal: the memory must not keep half of it
            self._drop_after_failure(conversation_id, live, n)
            raise
        if cancel is not None and cancel.is_set():  # stopped as the intake ended: not sent
            self._drop_after_failure(conversation_id, live, n)
            raise SendCancelled(STOPPED_BEFORE_SENT)

    def _drop_after_failure(self, conversation_id: int | None, live: EngineConversation,
                            n: int) -> None:
        live.truncate(n)
        if conversation_id is not None:  # its cache may be half-written: resume it afresh
            self._forget(conversation_id)
        else:
            release = getattr(self._engine, "release", None)
            if release is not None:
                release(live)  # a new chat that never was: its cells are dead weight

    def _too_long(self, exc: Exception, outcome: str = "it was not saved") -> str:
        level = self.settings.compression
        if level == "off":
            return (f"This message is longer than the context window can hold with compression "
                    f"off, so {outcome}. Pick a compression level in settings (Ctrl+S) to take "
                    "long messages in, start a new chat, or raise the context size.")
        return (f"This message is longer than the {level} memory can take in ({exc}), so "
                f"{outcome}. Start a new chat, raise the context size, or send it in parts.")

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

    def regenerate(
        self, conversation_id: int, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """Replace the last reply with a new one, or reply to a last message that has none
        (after an edit, or a reply that failed)."""
        with self._use:
            self._require_engine()
            with user_errors("No new reply"):
                record = self.store.get_conversation(conversation_id)
                self._writable(conversation_id, "No new reply")
                self._discard_reply(conversation_id)
                stored = self.store.messages(conversation_id)
                if not stored:
                    raise ChatError("There is no message to reply to yet.")
                self._follow(conversation_id, stored)
                live = self._engine_conversation(record, stored)
                if stored[-1].role == "assistant":
                    self.store.delete_message(stored[-1].id)
                    live.truncate(len(live.messages) - 1)
                    self._wrote(conversation_id)
            yield from self._stream(conversation_id, live, cancel)

    def _stream(
        self, conversation_id: int, live: EngineConversation, cancel: threading.Event | None
    ) -> Iterator[str]:
        before = live.last_reply
        live.recall = self.settings.recall
        writing = live.generate(self._params(), cancel)
        try:
            with user_errors("The reply failed"):
                yield from writing
        finally:
            writing.finish()  # also when the caller stopped reading: the turn ends here
            reply = live.last_reply
            if reply is not None and reply is not before:
                self._commit_reply(conversation_id, live, reply)

    def _commit_reply(self, conversation_id: int, live: EngineConversation, reply: Any) -> None:
        """Save the reply, or keep it (and its place in the memory) when the store refuses
        it: a locked database or a full disk must never cost a generated reply."""
        self._unsaved_replies[conversation_id] = UnsavedReply(
            reply.text, "interrupted" if reply.interrupted else "complete", reply.tokens,
            self._engine.info.model_name if self._engine is not None else None, "")
        self._store_reply(conversation_id)

    def _store_reply(self, conversation_id: int) -> MessageRecord:
        """Write the chat's unsaved reply, then its memory; ReplyNotSaved when it fails."""
        kept = self._unsaved_replies[conversation_id]
        try:
            saved = self.store.add_message(
                conversation_id, "assistant", kept.text, status=kept.status,
                token_count=kept.tokens, model=kept.model)
        except StorageError as exc:
            self._unsaved_replies[conversation_id] = replace(kept, error=str(exc))
            raise ReplyNotSaved(
                f"The reply is on screen but not saved yet: {exc} It is kept, and saved as "
                "soon as the database can be written (tried again every few seconds, and "
                "before your next message).") from exc
        del self._unsaved_replies[conversation_id]
        live = self._live.get(conversation_id)
        if live is not None and not _holds_reply(live, kept):
            self._forget(conversation_id)  # re-read since: it follows the transcript again
            live = None
        self._wrote(conversation_id)
        if live is not None:  # the memory stands for the reply too: save it with it
            stats = self._stats[conversation_id] = live.stats()
            self._save(conversation_id, saved.id, live, reply_bytes=stats.memory_bytes)
        return saved

    def unsaved_reply(self, conversation_id: int | None) -> UnsavedReply | None:
        """The chat's reply that the store refused and that is kept to be saved, if any."""
        return self._unsaved_replies.get(conversation_id) if conversation_id else None

    @property
    def has_unsaved_replies(self) -> bool:
        return bool(self._unsaved_replies)

    def save_unsaved_replies(self, wait: bool = True) -> list[int]:
        """Try again to save every reply the store refused; return the chats whose reply is
        saved now. Without `wait`, a reply running in the engine means: not now."""
        if not self._use.acquire(blocking=wait):
            return []
        try:
            saved = []
            for conversation_id in sorted(self._unsaved_replies):
                with suppress(ReplyNotSaved):
                    self._store_reply(conversation_id)
                    saved.append(conversation_id)
            return saved
        finally:
            self._use.release()

    def _flush_reply(self, conversation_id: int, doing: str) -> None:
        """A chat's unsaved reply goes into the store before anything comes after it."""
        if conversation_id not in self._unsaved_replies:
            return
        try:
            self._store_reply(conversation_id)
        except ReplyNotSaved as exc:
            raise NotSavedError(
                f"{doing}: the last reply is not saved yet, and it must be first "
                f"({self._unsaved_replies[conversation_id].error}). Try again once the "
                "database can be written.") from exc

    def _discard_reply(self, conversation_id: int) -> None:
        """The user asked for a new reply: the unsaved one leaves the memory too."""
        kept = self._unsaved_replies.pop(conversation_id, None)
        live = self._live.get(conversation_id)
        if kept is not None and live is not None and _holds_reply(live, kept):
            live.truncate(len(live.messages) - 1)

    # -- editing the transcript -----------------------------------------------------------------

    def delete_message(self, conversation_id: int, message_id: int) -> None:
        """Delete one message; the memory follows (cut back to it, the rest re-read)."""
        with self._use, user_errors("The message was not deleted"):
            stored, index = self._locate(conversation_id, message_id, "The message was not deleted")
            self.store.delete_message(message_id)
            self._wrote(conversation_id)
            rest = [(m.role, m.content) for m in stored[index + 1:]]
            with suppress(EngineError, ValueError):  # dropped then: re-read at its next use
                self._memory_follows(conversation_id, stored, index, rest)

    def edit_message(self, conversation_id: int, message_id: int, text: str) -> MessageRecord:
        """Replace a message's text. Editing a user message drops every message after it (as
        in ChatGPT): regenerate() then answers the edited message. Editing a reply changes
        only that reply. The memory follows; with a model loaded it takes the new text in
        first, so that an edit too long for it is refused before it is saved."""
        text = text.strip()
        if not text:
            raise ChatError("A message cannot be empty; delete it instead.")
        doing = "The message was not changed"
        with self._use, user_errors(doing):
            stored, index = self._locate(conversation_id, message_id, doing)
            is_user = stored[index].role == "user"
            tail = [(stored[index].role, text)] + (
                [] if is_user else [(m.role, m.content) for m in stored[index + 1:]])
            if self._engine is not None and self._resumable(conversation_id, stored):
                try:
                    self._memory_follows(conversation_id, stored, index, tail)
                except ContextFullError as exc:
                    raise NotSavedError(self._too_long(exc, "the edit was not saved")) from exc
            try:
                edited = self.store.edit_message(message_id, text, drop_later=is_user)
            except StorageError:
                self._forget(conversation_id)  # the memory took in an edit that was not saved
                raise
            self._wrote(conversation_id)
            return edited

    def _resumable(self, conversation_id: int, stored: list[MessageRecord]) -> bool:
        """Whether the conversation's memory is (now) live; a transcript the memory cannot
        hold (a message too long, from before such messages were refused) is still editable."""
        try:
            self._engine_conversation(self.store.get_conversation(conversation_id), stored)
        except (EngineError, ValueError):
            return False
        return True

    def _locate(self, conversation_id: int, message_id: int,
                doing: str) -> tuple[list[MessageRecord], int]:
        self._writable(conversation_id, doing)
        self._flush_reply(conversation_id, doing)
        stored = self.store.messages(conversation_id)
        self._follow(conversation_id, stored)
        for index, message in enumerate(stored):
            if message.id == message_id:
                return stored, index
        raise ChatError(f"{doing}: there is no message {message_id} in this chat.")

    def _memory_follows(self, conversation_id: int, stored: list[MessageRecord], index: int,
                        tail: list[tuple[str, str]]) -> None:
        """Cut the live memory back to message `index` of `stored` and take `tail` in after it,
        as if chatted: the engine keeps the common prefix, and rebuilds by itself when the
        change reaches into what its policy evicted or compressed. On an engine error the
        live memory is dropped (re-read at its next use) and the error raised."""
        live = self._live.get(conversation_id)
        if live is None:
            return
        offset = len(live.messages) - len(stored)  # the system prompt, when there is one
        if offset not in (0, 1) or [m.content for m in live.messages[offset:]] != [
                m.content for m in stored]:
            self._forget(conversation_id)  # not in step: re-read it all
            return
        live.truncate(offset + index)
        try:
            for role, content in tail:
                live.add_turn(role, content)
        except (EngineError, ValueError):
            self._forget(conversation_id)
            raise

    def reply_notice(self, conversation_id: int) -> str | None:
        """What the user should know about how the last reply ended, if anything."""
        live = self._live.get(conversation_id)
        reply = live.last_reply if live is not None else None
        if reply is not None and reply.finish_reason == "context_full":
            return ("The context window is full, so the reply was cut short. Pick a compression "
                    "level in settings (Ctrl+S) to keep the conversation going, or raise the "
                    "context size.")
        if self.memory_error:
            return f"{self.memory_error} The reply is saved; the memory will be rebuilt."
        return None

    def status(self, conversation_id: int | None) -> Status | None:
        if self._engine is None:
            return None
        info = self._engine.info
        threads = _decode_threads(self._engine)
        read_only = conversation_id in self._read_only
        live = self._live.get(conversation_id) if conversation_id is not None else None
        stats = self._stats.get(conversation_id) if conversation_id is not None else None
        level = self._engine.compression_for(self.settings.compression)
        if live is None or stats is None:
            return Status(info.model_name, info.device, level.level, level.method, 0, info.n_ctx,
                          0, 1.0, None, threads=threads, read_only=read_only)
        speed = live.last_reply.tokens_per_second if live.last_reply else None
        report = self._reports.get(conversation_id)
        recalled = live.last_recall.describe() if live.last_recall is not None else None
        return Status(
            model=info.model_name,
            device=info.device,
            level=live.compression.level,
            method=stats.method,
            tokens_in_context=stats.memory_tokens,
            context_window=stats.context_window,
            memory_bytes=stats.memory_bytes,
            ratio=stats.ratio,
            tokens_per_second=speed,
            memory_note=report.short if report else None,
            verbatim_exchanges=getattr(stats, "verbatim_exchanges", 0),
            compressed_exchanges=getattr(stats, "compressed_exchanges", 0),
            threads=threads,
            read_only=read_only,
            recalled=recalled,
        )

    def with_settings(self, **changes: Any) -> Settings:
        return replace(self.settings, **changes)


def _decode_threads(engine: EngineLike) -> int | None:
    """The CPU threads the engine decodes with, when its back end says (llama.cpp does)."""
    picked = getattr(getattr(engine, "ctx", None), "threads", None)
    return getattr(picked, "decode", None)


def _holds_reply(live: EngineConversation, kept: UnsavedReply) -> bool:
    """Whether the live memory ends with this reply (not re-read from the store since)."""
    last = live.messages[-1] if live.messages else None
    return last is not None and last.role == "assistant" and last.content == kept.text


def _signature(messages: list[MessageRecord]) -> tuple[int, int, int]:
    """As Store.transcript_signature, from messages already read."""
    return (len(messages), messages[-1].id if messages else 0,
            sum(len(m.content) for m in messages))


def _stop_if_cancelled(cancel: threading.Event | None) -> None:
    """A send stopped before its message reached the model: nothing to undo."""
    if cancel is not None and cancel.is_set():
        raise SendCancelled(STOPPED_BEFORE_SENT)


def _cancellable(progress: Progress | None, cancel: threading.Event | None) -> Progress | None:
    """A progress callback that stops a rebuild (RebuildCancelled) once `cancel` is set."""
    if cancel is None:
        return progress

    def report(done: int, total: int) -> None:
        if cancel.is_set() and done < total:  # at the end the work is done: keep it
            raise RebuildCancelled(
                "Stopped rebuilding the memory. The chat is unchanged; its memory is rebuilt "
                "when you open it or send a message.")
        if progress is not None:
            progress(done, total)

    return report
