"""Switches for the llama.cpp back end's optimisations, one each, so any one can be turned
off (to measure it, or where a llama.cpp build misbehaves with it) and the others stay on.

Flash attention has its own switch already (`Engine.load(flash_attn=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaOptions:
    """Every optimisation on by default, as the engine has always run them."""

    # a CCM step runs in a second context that keeps the compressor's adapter on
    # (LlamaContext.slots_over_text), not by toggling the adapter in the chat's context
    beside_context: bool = True
    # cells moved in host memory (keys re-rotated there) once a move of that kind was
    # checked against llama.cpp's shift (engine.llama_moves); False: llama.cpp's shift always
    host_moves: bool = True
    # text a compression moved behind new slots waits for the next message's batch
    # (engine.backend.Context.batches_cheaply); None: where batches are cheap (a GPU)
    defer_moved_text: bool | None = None
    # page-locked host buffers for the state copies; None: where the model is on a GPU
    pinned_buffers: bool | None = None
