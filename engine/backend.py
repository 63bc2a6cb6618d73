"""The back-end contract: what the engine asks of a model and of its KV context.

Two back ends implement it, llama.cpp (`engine.llama_backend`) and transformers
(`engine.hf_backend`); `open_backend` picks one by name through `BACKENDS`, as
`engine.memory` picks a policy. What a context can do is said by its capability flags, never
by its back end's name, so a policy or a conversation asks `ctx.merges`, not `backend == "hf"`.
Cells are indexed by position 0..held-1 in one sequence, as `engine.kv_memory.KVMemory` says.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.llama_options import LlamaOptions

# back end name -> the module that implements it (imported on first use: transformers and
# torch are optional, and llama.cpp must load before numpy on a CUDA host)
BACKENDS: dict[str, str] = {"llamacpp": "ccm_chat.engine.llama_backend",
                            "hf": "ccm_chat.engine.hf_open"}


class Model(Protocol):
    path: Path
    name: str
    n_vocab: int
    n_ctx_train: int
    f16_bytes_per_token: int  # K and V of every layer in f16: one uncompressed cell
    add_bos: bool
    bos: int

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]: ...
    def piece(self, token: int, special: bool) -> bytes: ...
    def is_end_of_generation(self, token: int) -> bool: ...
    def render_chat(self, messages: Sequence[ChatMessage], add_assistant: bool) -> bytes: ...
    def load_compressor(self, files) -> object:
        """The compressor's adapter in this back end's form (files: CompressorFiles)."""
    def close(self) -> None: ...


class Sampler(Protocol):
    def sample(self, ctx: Context) -> int: ...
    def close(self) -> None: ...


class Context(Protocol):
    n_ctx: int
    n_batch: int
    kv_type: str  # the K cache's element type
    # capabilities
    evicts: bool  # may run policies that evict cells
    merges: bool  # can average cells into others (CCM-merge)
    needs_compaction: bool  # after an eviction `compact` must run before a decode or save
    # a longer batch costs about what a short one does (a GPU): the text a compression moves
    # behind new slots then waits for the next message's batch; elsewhere it would lengthen
    # that message's time to first token (dev CPU, balanced CCM: prefill 167 -> 444 ms, for
    # 317 ms less after-turn work the user does not wait for), so it is decoded at once
    batches_cheaply: bool
    flash_attn: bool | None  # llama.cpp's V layout, which a saved state must match; None: n/a

    def decode(self, tokens: Sequence[int], start_pos: int, want: Sequence[int] = ()) -> dict:
        """Decode at positions start_pos..; logits rows for the indices in `want`."""
    def logits(self, i: int = -1) -> np.ndarray: ...
    def redecode(self, token: int, pos: int) -> None:
        """Decode the last cell again, so its logits are current."""
    def decode_embeddings(self, vectors: np.ndarray, start_pos: int,
                          adapter: object | None = None) -> None:
        """Decode rows of input embeddings (the <COMP> vectors) at start_pos.., with the
        compressor's LoRA `adapter` (Model.load_compressor's) on for these rows only."""
    def slots_over_text(self, vectors: np.ndarray, start: int, end: int,
                        adapter: object, drop: int = 0) -> None:
        """A CCM step on a cache that ends at `end`: the <COMP> rows decoded after it with
        `adapter` on, then the text [start, end) dropped so the slots take its place, and
        the first `drop` cells (the oldest slots) with it."""
    def merge_slots(self, n: int, weight: float) -> None: ...
    def close_gaps(self, start: int, end: int, drop: int) -> None:
        """Remove cells [start, end) and [0, drop) and close up the rest (`close_gaps`)."""
    def remove(self, p0: int, p1: int = -1) -> None: ...
    def shift(self, p0: int, p1: int, delta: int) -> None: ...
    def compact(self, last_token: int) -> None: ...
    def clear(self) -> None: ...
    def pos_min(self) -> int: ...
    def pos_max(self) -> int: ...
    def state_size(self) -> int: ...
    def get_state(self) -> bytes: ...
    def set_state(self, data: bytes | memoryview) -> None: ...
    def sampler(self, params: SamplingParams) -> Sampler: ...
    def close(self) -> None: ...


def slots_in_place(ctx: Context, vectors: np.ndarray, start: int, end: int,
                   adapter: object, drop: int = 0) -> None:
    """Context.slots_over_text out of a context's own calls (what a back end does unless it
    has a cheaper way)."""
    ctx.decode_embeddings(vectors, end, adapter)
    ctx.close_gaps(start, end, drop)
    if ctx.needs_compaction:
        ctx.compact(-1)


def close_gaps(ctx: Context, start: int, end: int, drop: int) -> None:
    """Remove cells [start, end) and [0, drop) of a cache and move the rest down onto them
    (Context.close_gaps, where a back end has no cheaper way)."""
    ctx.remove(start, end)
    if drop:
        ctx.remove(0, drop)
        ctx.shift(drop, start, -drop)
    ctx.shift(end, -1, start - end - drop)


@dataclass(frozen=True)
class BackendOptions:
    """What Engine.load passes a back end to open a model and one context for it."""

    path: Path
    device: str  # auto, cpu or gpu
    n_ctx: int
    kv_type: str
    evicts: bool
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    cache_dir: Path | None = None
    flash_attn: bool | None = None
    llama: LlamaOptions | None = None  # llama.cpp's optimisations (None: all on)


@dataclass(frozen=True)
class Opened:
    model: Model
    ctx: Context
    device_label: str  # for the status bar: "CPU", "GPU (CUDA)", ...
    n_gpu_layers: int


def pick_backend(backend: str, path: Path) -> str:
    """"auto" is llama.cpp for a .gguf file and transformers for a model folder."""
    if backend == "auto":
        return "hf" if path.is_dir() else "llamacpp"
    if backend not in BACKENDS:
        raise EngineError(f"Unknown back end {backend!r}; pick one of auto, {', '.join(BACKENDS)}.")
    return backend


def open_backend(backend: str, options: BackendOptions) -> Opened:
    try:
        module = importlib.import_module(BACKENDS[backend])
    except ImportError as exc:
        extra = " (pip install 'ccm-chat[hf]')" if backend == "hf" else ""
        raise EngineError(f"The {backend} back end needs {exc.name}, which is not "
                          f"installed{extra}.") from exc
    return module.open_backend(options)
