"""What a compression level means for a model: its trained compressor if one is there
(shipped or trained by the user), else the training-free policy, with the reason."""

from __future__ import annotations

from engine import CompressionConfig, ModelError, resolve_model_path
from engine.ccm.files import CompressorFiles, find_compressor
from engine.models import model_fingerprint


def compressor_for(model_path: str, backend: str) -> CompressorFiles | None:
    try:
        path = resolve_model_path(model_path or None, allow_dir=backend != "llamacpp")
        return find_compressor(model_fingerprint(path))
    except (ModelError, OSError):
        return None


def describe_level(level: str, backend: str, model_path: str = "") -> str:
    """The method the level runs and why (K cache quantization is llama.cpp's)."""
    files = compressor_for(model_path, backend)
    return CompressionConfig.for_level(level, backend != "hf", files).describe()
