"""What a compression level means for a model: its trained compressor if one is there
(shipped or trained by the user), else the training-free policy, with the reason."""

from __future__ import annotations

from ccm_chat.engine import CompressionConfig, EngineError, ModelError, resolve_model_path
from ccm_chat.engine.backend import pick_backend
from ccm_chat.engine.ccm.files import CompressorFiles, find_compressor
from ccm_chat.engine.models import model_fingerprint


def compressor_for(model_path: str, backend: str) -> tuple[CompressorFiles | None, bool]:
    """(the model's compressor if any, whether it runs on llama.cpp)."""
    try:
        path = resolve_model_path(model_path or None, allow_dir=backend != "llamacpp")
    except (ModelError, OSError):
        return None, backend != "hf"
    try:
        on_llama = pick_backend(backend, path) == "llamacpp"
    except EngineError:
        return None, backend != "hf"
    try:
        return find_compressor(model_fingerprint(path)), on_llama
    except (ModelError, OSError):
        return None, on_llama


def describe_level(level: str, backend: str, model_path: str = "",
                   bytes_per_cell: int | None = None) -> str:
    """The method the level runs and why (K cache quantization is llama.cpp's); with the
    model's f16 bytes per cell (ChatService.bytes_per_cell, once a model is loaded), about
    how much memory it holds at most."""
    files, on_llama = compressor_for(model_path, backend)
    return CompressionConfig.for_level(level, on_llama, files).describe(bytes_per_cell)
