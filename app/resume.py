"""Saving a conversation's memory to the store, and resuming from it.

The transcript is the source of truth and a saved memory is a cache of it: resume uses the
cache when it was made by this model, back end and compression level for (a prefix of) this
transcript, and otherwise rebuilds the memory from the messages and says why.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ccm_chat.app.engine_api import EngineConversation, EngineLike, Progress
from ccm_chat.engine import CompressionConfig, ContextFullError, EngineError, StateError
from ccm_chat.engine.memory import POLICIES
from ccm_chat.engine.state_blob import origin_mismatch
from ccm_chat.storage import ConversationRecord, MemoryStateRecord, MessageRecord, Store


@dataclass(frozen=True)
class ResumeReport:
    """How a conversation's memory was made ready: new, restored, or rebuilt (and why)."""

    kind: str  # new, restored, rebuilt, or read_only (nothing loaded: see held_by)
    reason: str
    seconds: float
    tokens: int
    read_only: bool = False  # another window writes this conversation
    held_by: str | None = None  # that window, in a few words

    def message(self) -> str:
        if self.read_only:
            return (f"This chat is open in another window ({self.held_by}), so it is "
                    "read-only here. Take it over to write in it here.")
        if self.kind == "restored":
            return f"Restored from saved memory ({self.tokens:,} tokens held)."
        if self.kind == "rebuilt":
            return f"Rebuilt memory from the transcript: {self.reason}."
        return "New conversation."

    @property
    def short(self) -> str | None:
        """For the status bar, which the full message would not fit."""
        return {"restored": "memory restored", "rebuilt": "memory rebuilt",
                "read_only": "read-only"}.get(self.kind)


def policy_key(config: CompressionConfig) -> dict[str, Any]:
    return {"level": config.level, **config.key()}


def save_memory(store: Store, engine: EngineLike, conversation_id: int,
                message_id: int | None, live: EngineConversation) -> int:
    """Save `live`'s memory as the state covering the transcript up to `message_id`."""
    blob = live.save_state()
    stats = live.stats()
    return store.save_memory_state(
        conversation_id, message_id, blob,
        backend=engine.info.backend,
        model_fingerprint=engine.fingerprint,
        policy=policy_key(live.compression),
        position=stats.memory_tokens,
        tokens_held=stats.memory_tokens,
        tokens_seen=stats.full_context_tokens,
    )


def _unusable(state: MemoryStateRecord | None, engine: EngineLike,
              compression: CompressionConfig, messages: Sequence[MessageRecord]) -> str | None:
    """Why the saved state cannot serve this transcript, or None when it may."""
    if state is None:
        return "no saved memory yet"
    if not state.intact:
        return "the saved memory is damaged (checksum mismatch)"
    foreign = origin_mismatch(state.model_fingerprint, state.backend, engine.fingerprint,
                              engine.info.backend)
    if foreign:
        return f"the saved memory was {foreign}"
    wanted = policy_key(compression)
    if state.policy != wanted:
        level, method = state.policy.get("level"), state.policy.get("method")
        policy = POLICIES.get(str(wanted["method"]))
        superseded = policy.supersedes.get(str(method)) if policy is not None else None
        if level == wanted["level"] and superseded:  # what the policy says it replaced
            return superseded
        if (level, method) == (wanted["level"], wanted["method"]):
            return (f"the saved memory was made with other {wanted['method']} settings "
                    "(memory size, or another compressor's weights)")
        if level == wanted["level"]:  # the same level, run another way (another compressor)
            return (f"the saved memory was made by {method}, and level {level!r} now runs "
                    f"{wanted['method']}")
        return (f"the saved memory was made at compression level {level!r} ({method}), "
                f"not {compression.level!r}")
    if state.message_id is None or state.message_id not in {m.id for m in messages}:
        return "the transcript changed after the memory was saved"
    return None


def _catch_up(engine: EngineLike, live: EngineConversation, wanted: list[tuple[str, str]]
              ) -> tuple[EngineConversation | None, str | None]:
    """A restored memory brought up to the transcript (the messages saved after it replayed
    onto it), or None and why it cannot serve: it stands for another transcript, or it
    fails to decode (a memory that cannot take a message must never keep a chat from
    sending: it is dropped, and the memory rebuilt from the transcript)."""
    held = [(m.role, m.content) for m in live.messages]
    if wanted[: len(held)] != held:
        _release(engine, live)
        return None, "the saved memory does not match the transcript"
    behind = wanted[len(held):]
    try:
        for role, content in behind:
            live.add_turn(role, content)
    except ContextFullError:  # the transcript does not fit: a rebuild would say the same
        raise
    except EngineError as exc:
        _release(engine, live)
        return None, f"the saved memory failed when the newer messages were added ({exc})"
    if behind:
        return live, (f"the saved memory was {len(behind)} message(s) behind the transcript; "
                      "replayed them")
    return live, None


def _release(engine: EngineLike, live: EngineConversation) -> None:
    """Free the context cells of a memory that is dropped."""
    release = getattr(engine, "release", None)
    if release is not None:
        release(live)


def resume(
    engine: EngineLike,
    store: Store,
    record: ConversationRecord,
    messages: Sequence[MessageRecord],
    compression: CompressionConfig,
    progress: Progress | None = None,
) -> tuple[EngineConversation, ResumeReport]:
    """An engine conversation holding the memory of `messages`, and how it was made."""
    start = time.perf_counter()
    wanted = ([("system", record.system_prompt)] if record.system_prompt else []) + [
        (m.role, m.content) for m in messages
    ]
    if not messages:
        live = engine.new_conversation(system=record.system_prompt, compression=compression)
        return live, ResumeReport("new", "", time.perf_counter() - start, 0)

    state = store.latest_memory_state(record.id)
    reason = _unusable(state, engine, compression, messages)
    live = None
    if reason is None:
        try:
            live = engine.restore_conversation(state.blob)  # type: ignore[union-attr]
        except (StateError, EngineError) as exc:
            reason = f"the saved memory could not be loaded ({exc})"
    if live is not None:
        live, reason = _catch_up(engine, live, wanted)
    if live is None:
        live = engine.new_conversation(system=record.system_prompt, compression=compression)
        for m in messages:
            live.add_turn(m.role, m.content, decode=False)
        live.rebuild(progress)
    kind = "restored" if reason is None else "rebuilt"
    report = ResumeReport(kind, reason or "", time.perf_counter() - start,
                          live.stats().memory_tokens)
    return live, report
