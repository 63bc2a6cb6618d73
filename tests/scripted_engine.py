"""A scripted stand-in for the engine, for fast UI and service tests.

It follows the same contract as engine.Engine (new_conversation, send/generate, add_turn,
truncate, stats, last_reply) but its replies are fixed text, streamed word by word. A token is
a word (plus 4 a message), and with compression off a turn that does not fit the context
window is refused as the real engine refuses it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from ccm_chat.engine import (
    CompressionConfig,
    ContextFullError,
    EngineInfo,
    MemoryStats,
    ReplyStats,
    SamplingParams,
    StateError,
)
from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.recall import Recalled

INFO = EngineInfo("Scripted model", None, "scripted", "CPU", 4096, 0)  # type: ignore[arg-type]


def scripted_reply(user_text: str) -> str:
    return f"You said: {user_text}"


@dataclass
class ScriptedConversation:
    engine: ScriptedEngine
    compression: CompressionConfig
    messages: list[ChatMessage] = field(default_factory=list)
    last_reply: ReplyStats | None = None
    replies_started: dict[str, int] = field(default_factory=dict)  # by the message answered
    recall: bool = True
    last_recall: Recalled | None = None

    def add_turn(self, role: str, text: str, decode: bool = True,
                 cancel: threading.Event | None = None) -> None:
        self.messages.append(ChatMessage(role, text))  # kept on failure, as the engine does
        if decode:
            self._check_fits()

    def _check_fits(self) -> None:
        needed = sum(len(m.content.split()) + 4 for m in self.messages)
        if self.compression.level == "off" and needed > self.engine.info.n_ctx - 1:
            raise ContextFullError(
                f"This conversation needs {needed} tokens, more than the context window of "
                f"{self.engine.info.n_ctx}.")

    def truncate(self, n_messages: int) -> None:
        del self.messages[n_messages:]

    def send(self, text: str, params: SamplingParams | None = None,
             cancel: threading.Event | None = None) -> ScriptedReply:
        self.add_turn("user", text)
        return self.generate(params, cancel)

    def generate(self, params: SamplingParams | None = None,
                 cancel: threading.Event | None = None) -> ScriptedReply:
        last_user = next(m.content for m in reversed(self.messages) if m.role == "user")
        self.last_recall = self._recalled(last_user) if self.recall else None
        attempt = self.replies_started[last_user] = self.replies_started.get(last_user, 0) + 1
        return ScriptedReply(self, self.engine.reply_for(last_user, attempt), cancel)

    def _recalled(self, text: str) -> Recalled | None:
        """Earlier user messages sharing a long word with `text`, as the real recall would
        find them (the real one ranks by BM25 and skips what the memory still holds)."""
        words = {w for w in text.lower().split() if len(w) > 4}
        users = [m.content for m in self.messages if m.role == "user"][:-1]
        found = tuple(i for i, u in enumerate(users) if words & set(u.lower().split()))
        return Recalled(found, 10 * len(found), 0.0) if found else None

    def rebuild(self, progress=None) -> None:
        """Replays the messages one by one (as a CCM rebuild does), reporting each."""
        self.engine.rebuilds += 1
        self._check_fits()
        for i in range(len(self.messages)):
            if progress is not None:
                progress(i + 1, len(self.messages))
        self.engine.rebuilds_done += 1

    def save_state(self) -> bytes:
        """The transcript as JSON: enough for the service's save/resume logic."""
        return json.dumps({"messages": [[m.role, m.content] for m in self.messages],
                           "level": self.compression.level}).encode()

    def stats(self) -> MemoryStats:
        tokens = sum(len(m.content.split()) + 4 for m in self.messages)
        exchanges = sum(m.role == "assistant" for m in self.messages)
        stats = MemoryStats(self.compression.method, tokens, tokens * 1024, tokens,
                            tokens * 1024, self.engine.info.n_ctx)
        if "verbatim_exchanges" in MemoryStats.__dataclass_fields__:  # engines from issue 14 on
            stats = replace(stats, verbatim_exchanges=exchanges)
        return stats


class ScriptedReply:
    """As engine.Reply: iterate it for the pieces; finish() ends the turn (idempotent), and
    running to the end finishes it."""

    def __init__(self, conv: ScriptedConversation, text: str,
                 cancel: threading.Event | None) -> None:
        self.conv, self.words, self.cancel = conv, text.split(" "), cancel
        self.pieces: list[str] = []
        self.finish_reason = "cancelled"
        self.stats: ReplyStats | None = None

    def __iter__(self) -> Iterator[str]:
        for i, word in enumerate(self.words):
            if self.cancel is not None and self.cancel.is_set():
                break
            piece = word if i == 0 else " " + word
            self.pieces.append(piece)
            yield piece
            if self.conv.engine.delay:
                time.sleep(self.conv.engine.delay)
        else:
            self.finish_reason = self.conv.engine.finish_reason
        self.finish()

    def finish(self) -> ReplyStats:
        if self.stats is None:
            text = "".join(self.pieces)
            self.conv.messages.append(ChatMessage("assistant", text))
            self.stats = ReplyStats(text, len(self.pieces), 10, 0.01, 0.5, self.finish_reason)
            self.conv.last_reply = self.stats
        return self.stats


class ScriptedEngine:
    def __init__(self, delay: float = 0.0, replies: dict[str, str] | None = None,
                 n_ctx: int = 4096, fingerprint: str = "scripted-model") -> None:
        self.info = replace(INFO, n_ctx=n_ctx)
        self.delay = delay
        self.replies = replies or {}
        self.conversations: list[ScriptedConversation] = []
        self.closed = False
        self.fingerprint = fingerprint  # another one makes saved memories unusable here
        self.finish_reason = "stop"  # how a reply that runs to its end finishes
        self.rebuilds = 0  # started
        self.rebuilds_done = 0  # ran to the end
        self.restores = 0

    def reply_for(self, user_text: str, attempt: int) -> str:
        base = self.replies.get(user_text, scripted_reply(user_text))
        return base if attempt == 1 else f"{base} (take {attempt})"

    def new_conversation(self, system: str | None = None,
                         compression: CompressionConfig | None = None) -> ScriptedConversation:
        conv = ScriptedConversation(self, compression or CompressionConfig())
        if system:
            conv.add_turn("system", system)
        self.conversations.append(conv)
        return conv

    def compression_for(self, level: str) -> CompressionConfig:
        return CompressionConfig.for_level(level)

    def restore_conversation(self, blob: bytes) -> ScriptedConversation:
        try:
            data = json.loads(blob)
            conv = ScriptedConversation(self, CompressionConfig.for_level(data["level"]))
            conv.messages = [ChatMessage(r, c) for r, c in data["messages"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"unreadable scripted state ({exc})") from exc
        self.restores += 1
        self.conversations.append(conv)
        return conv

    def close(self) -> None:
        self.closed = True
