"""What the app needs of an engine: the real `engine.Engine`, or a scripted one in tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ccm_chat.engine import CompressionConfig, EngineInfo, MemoryStats, ReplyStats, SamplingParams
from ccm_chat.engine.recall import Recalled

Progress = Callable[[int, int], None]


class ReplyLike(Protocol):
    """A reply being written: iterate it for its pieces; finish() ends the turn (idempotent:
    the reply joins the transcript and the memory policy does its work)."""

    def __iter__(self) -> Iterator[str]: ...
    def finish(self) -> ReplyStats: ...


class EngineConversation(Protocol):
    messages: list[Any]
    last_reply: ReplyStats | None
    compression: CompressionConfig
    recall: bool  # bring back earlier exchanges a message asks about
    last_recall: Recalled | None  # what the last reply brought back

    def send(self, text: str, params: SamplingParams | None = ...,
             cancel: threading.Event | None = ...) -> ReplyLike: ...
    def generate(self, params: SamplingParams | None = ...,
                 cancel: threading.Event | None = ...) -> ReplyLike: ...
    def add_turn(self, role: str, text: str, decode: bool = ...,
                 cancel: threading.Event | None = ...) -> None: ...
    def truncate(self, n_messages: int) -> None: ...
    def stats(self) -> MemoryStats: ...
    def rebuild(self, progress: Progress | None = ...) -> None: ...
    def save_state(self) -> bytes: ...


class EngineLike(Protocol):
    info: EngineInfo
    fingerprint: str

    def new_conversation(self, system: str | None = ...,
                         compression: CompressionConfig | None = ...) -> EngineConversation: ...
    def restore_conversation(self, blob: bytes) -> EngineConversation: ...
    def compression_for(self, level: str) -> CompressionConfig: ...
    def close(self) -> None: ...
