"""A scripted stand-in for the engine, for fast UI and service tests.

It follows the same contract as engine.Engine (new_conversation, send/generate, add_turn,
truncate, stats, last_reply) but its replies are fixed text, streamed word by word.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine import (
    CompressionConfig,
    EngineInfo,
    MemoryStats,
    ReplyStats,
    SamplingParams,
    StateError,
)
from engine.chat import ChatMessage

INFO = EngineInfo("Scripted model", None, "scripted", "CPU", 4096, 0)  # type: ignore[arg-type]


def scripted_reply(user_text: str) -> str:
    return f"You said: {user_text}"


@dataclass
class ScriptedConversation:
    engine: ScriptedEngine
    compression: CompressionConfig
    messages: list[ChatMessage] = field(default_factory=list)
    last_reply: ReplyStats | None = None
    replies_started: int = 0

    def add_turn(self, role: str, text: str, decode: bool = True) -> None:
        self.messages.append(ChatMessage(role, text))

    def truncate(self, n_messages: int) -> None:
        del self.messages[n_messages:]

    def send(self, text: str, params: SamplingParams | None = None,
             cancel: threading.Event | None = None) -> Iterator[str]:
        self.add_turn("user", text)
        return self.generate(params, cancel)

    def generate(self, params: SamplingParams | None = None,
                 cancel: threading.Event | None = None) -> Iterator[str]:
        self.replies_started += 1
        last_user = next(m.content for m in reversed(self.messages) if m.role == "user")
        text = self.engine.reply_for(last_user, self.replies_started)
        words = text.split(" ")
        shown: list[str] = []
        finish = "cancelled"
        try:
            for i, word in enumerate(words):
                if cancel is not None and cancel.is_set():
                    break
                piece = word if i == 0 else " " + word
                shown.append(piece)
                yield piece
                if self.engine.delay:
                    time.sleep(self.engine.delay)
            else:
                finish = self.engine.finish_reason
        finally:
            reply = "".join(shown)
            self.messages.append(ChatMessage("assistant", reply))
            self.last_reply = ReplyStats(reply, len(shown), 10, 0.01, 0.5, finish)

    def rebuild(self, progress=None) -> None:
        self.engine.rebuilds += 1
        for i in range(len(self.messages)):
            if progress is not None:
                progress(i + 1, len(self.messages))

    def save_state(self) -> bytes:
        """The transcript as JSON: enough for the service's save/resume logic."""
        return json.dumps({"messages": [[m.role, m.content] for m in self.messages],
                           "level": self.compression.level}).encode()

    def stats(self) -> MemoryStats:
        tokens = sum(len(m.content.split()) + 4 for m in self.messages)
        return MemoryStats(self.compression.method, tokens, tokens * 1024, tokens,
                           tokens * 1024, 4096)


class ScriptedEngine:
    def __init__(self, delay: float = 0.0, replies: dict[str, str] | None = None) -> None:
        self.info = INFO
        self.delay = delay
        self.replies = replies or {}
        self.conversations: list[ScriptedConversation] = []
        self.closed = False
        self.fingerprint = "scripted-model"
        self.finish_reason = "stop"  # how a reply that runs to its end finishes
        self.rebuilds = 0
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
