"""What the app uses of an engine beyond EngineLike, when the engine has it: the real
`engine.Engine` does, a scripted one in tests may not. Each is a runtime-checkable protocol,
asked for by isinstance, so what the app reads of an engine is named here."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ccm_chat.app.engine_api import EngineConversation, EngineLike
from ccm_chat.engine.threads import Threads


@runtime_checkable
class ReleasesMemory(Protocol):
    """An engine that frees a conversation's KV cells when asked."""

    def release(self, conv: EngineConversation) -> None: ...


@runtime_checkable
class SizedModel(Protocol):
    f16_bytes_per_token: int  # K and V of every layer in f16: one uncompressed KV cell


@runtime_checkable
class HasModel(Protocol):
    model: object  # a SizedModel when its back end says


@runtime_checkable
class ThreadedContext(Protocol):
    threads: Threads  # the CPU threads it decodes and batches with (llama.cpp)


@runtime_checkable
class HasContext(Protocol):
    ctx: object  # a ThreadedContext when its back end says


def release_memory(engine: EngineLike | None, conv: EngineConversation) -> None:
    """Free the conversation's KV cells, if the engine can: they are dead weight now."""
    if isinstance(engine, ReleasesMemory):
        engine.release(conv)


def bytes_per_cell(engine: EngineLike | None) -> int | None:
    """The loaded model's f16 bytes per KV cell, when its engine says."""
    if isinstance(engine, HasModel) and isinstance(engine.model, SizedModel):
        return engine.model.f16_bytes_per_token
    return None


def decode_threads(engine: EngineLike | None) -> int | None:
    """The CPU threads the engine decodes with, when its back end says (llama.cpp does)."""
    if isinstance(engine, HasContext) and isinstance(engine.ctx, ThreadedContext):
        return engine.ctx.threads.decode
    return None
