"""The engine: a loaded model plus the conversations that share its one KV context.

Only one conversation's KV lives in the context at a time; switching parks the other one as
bytes (the same bytes `save_state` writes), so many conversations cost one context of memory.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.config import CompressionConfig
from engine.conversation import Conversation
from engine.errors import EngineError
from engine.llama_backend import LlamaContext, LlamaModel, gpu_available
from engine.models import DEFAULT_MODEL_NAME, model_fingerprint, resolve_model_path

BACKENDS = ("auto", "llamacpp", "hf")
DEVICES = ("auto", "cpu", "gpu")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    model_path: Path
    backend: str
    device: str
    n_ctx: int
    n_gpu_layers: int


class Engine:
    def __init__(self, model: LlamaModel, ctx: LlamaContext, info: EngineInfo,
                 compression: CompressionConfig) -> None:
        self.model = model
        self.ctx = ctx
        self.info = info
        self.compression = compression
        self.n_ctx = ctx.n_ctx
        self.kv_type = ctx.kv_type
        self.evicts = ctx.evicts  # whether its conversations may run evicting policies
        self._fingerprint: str | None = None
        self._active: Conversation | None = None
        self._lock = threading.RLock()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        backend: str = "auto",
        compression: str | CompressionConfig = "off",
        device: str = "auto",
        n_ctx: int = 4096,
        n_gpu_layers: int | None = None,
        n_threads: int | None = None,
    ) -> Engine:
        """Load a GGUF model (None: the embedded default) and make one context for it.

        device "auto" offloads every layer when llama.cpp was built with GPU support. The
        compression level's K cache type, and whether cells may be evicted, are fixed here for
        every conversation of this engine.
        """
        if backend not in BACKENDS:
            raise EngineError(f"Unknown back end {backend!r}; pick one of {BACKENDS}.")
        if backend == "hf":
            raise EngineError(
                "The transformers (hf) back end is not available in this version; "
                "use --backend llamacpp (the default)."
            )
        if device not in DEVICES:
            raise EngineError(f"Unknown device {device!r}; pick one of {DEVICES}.")
        if isinstance(compression, str):
            compression = CompressionConfig.for_level(compression)
        path = resolve_model_path(model)
        has_gpu = gpu_available()
        if device == "gpu" and not has_gpu:
            raise EngineError(
                "--device gpu was asked for, but this llama.cpp build has no GPU support. "
                "Reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on, or use --device cpu."
            )
        if n_gpu_layers is None:
            n_gpu_layers = -1 if (has_gpu and device != "cpu") else 0
        llama_model = LlamaModel(path, n_gpu_layers=n_gpu_layers)
        n_ctx = min(n_ctx, llama_model.n_ctx_train) if llama_model.n_ctx_train > 0 else n_ctx
        try:
            ctx = LlamaContext(llama_model, n_ctx=n_ctx, n_threads=n_threads,
                               kv_type=compression.kv_type,
                               evicts=compression.policy().budget is not None)
        except Exception:
            llama_model.close()
            raise
        on_gpu = n_gpu_layers != 0 and has_gpu
        name = DEFAULT_MODEL_NAME if model is None and not os.environ.get("CCM_CHAT_MODEL") \
            else llama_model.name
        info = EngineInfo(
            model_name=name,
            model_path=path,
            backend="llamacpp",
            device="GPU (CUDA)" if on_gpu else "CPU",
            n_ctx=ctx.n_ctx,
            n_gpu_layers=n_gpu_layers,
        )
        return cls(llama_model, ctx, info, compression)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model.path)
        return self._fingerprint

    def new_conversation(
        self, system: str | None = DEFAULT_SYSTEM_PROMPT,
        compression: CompressionConfig | None = None,
    ) -> Conversation:
        return Conversation(self, system, compression or self.compression)

    def restore_conversation(self, blob: bytes) -> Conversation:
        """Rebuild a conversation from `save_state` bytes, with no re-prefill."""
        return Conversation.from_state(self, blob)

    def activate(self, conv: Conversation) -> LlamaContext:
        """Give `conv` the context, parking whichever conversation held it."""
        with self._lock:
            if self._active is not conv:
                if self._active is not None:
                    self._active.park()
                conv.unpark()
                self._active = conv
            return self.ctx

    def release(self, conv: Conversation) -> None:
        with self._lock:
            if self._active is conv:
                self.ctx.clear()
                self._active = None

    def close(self) -> None:
        self.ctx.close()
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
