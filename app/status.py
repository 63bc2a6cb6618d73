"""What the status bar shows of the loaded model and an open chat's memory."""

from __future__ import annotations

from dataclasses import dataclass

from ccm_chat.app.engine_api import EngineLike
from ccm_chat.app.engine_extras import decode_threads
from ccm_chat.app.open_chat import OpenChat


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


def chat_status(engine: EngineLike, compression: str, chat: OpenChat | None) -> Status:
    """The status of `chat` (None: no chat open) on `engine`, at the settings' level."""
    info = engine.info
    threads = decode_threads(engine)
    read_only = chat is not None and chat.read_only
    live = chat.live if chat is not None else None
    stats = chat.stats if chat is not None else None
    level = engine.compression_for(compression)
    if chat is None or live is None or stats is None:
        return Status(info.model_name, info.device, level.level, level.method, 0, info.n_ctx,
                      0, 1.0, None, threads=threads, read_only=read_only)
    speed = live.last_reply.tokens_per_second if live.last_reply else None
    report = chat.report
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
        verbatim_exchanges=stats.verbatim_exchanges,
        compressed_exchanges=stats.compressed_exchanges,
        threads=threads,
        read_only=read_only,
        recalled=recalled,
    )
