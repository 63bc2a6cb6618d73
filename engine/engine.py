"""The engine: a loaded model plus the conversations that share its one KV context.

Only one conversation's KV lives in the context at a time; switching parks the other one as
bytes (the same bytes `save_state` writes), so many conversations cost one context of memory.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ccm_chat.engine.backend import BACKENDS as BACKEND_MODULES
from ccm_chat.engine.backend import (
    BackendOptions,
    Context,
    Model,
    Opened,
    open_backend,
    pick_backend,
)
from ccm_chat.engine.ccm.files import CompressorFiles, LoadedCompressor, find_compressors
from ccm_chat.engine.config import CompressionConfig
from ccm_chat.engine.conversation import Conversation
from ccm_chat.engine.errors import EngineError, ModelError
from ccm_chat.engine.llama_options import LlamaOptions
from ccm_chat.engine.memory import MemoryPolicy
from ccm_chat.engine.models import (
    DEFAULT_MODEL_NAME,
    MODEL_ENV_VAR,
    model_fingerprint,
    resolve_model_path,
)

log = logging.getLogger(__name__)
BACKENDS = ("auto", *BACKEND_MODULES)
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
    def __init__(self, model: Model, ctx: Context, info: EngineInfo,
                 compression: CompressionConfig) -> None:
        self.model = model
        self.ctx = ctx
        self.info = info
        self.compression = compression
        self.n_ctx = ctx.n_ctx
        self.kv_type = ctx.kv_type
        self.evicts = ctx.evicts  # whether its conversations may run evicting policies
        self.flash_attn: bool | None = ctx.flash_attn  # None on the hf back end
        self.ccm: LoadedCompressor | None = None
        # compressors found for this model but passed over (the file and why), so a level
        # that falls back to the training-free policy says so
        self.skipped_compressors: list[str] = []
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
        cache_dir: str | os.PathLike[str] | None = None,
        compressor: str | os.PathLike[str] | bool = True,
        flash_attn: bool | None = None,
        llama_options: LlamaOptions | None = None,
    ) -> Engine:
        """Load a model (None: the embedded default) and make one context for it.

        backend "auto" is llama.cpp for a .gguf file and transformers ("hf") for a model
        folder; "hf" also loads a .gguf, converting it once into `cache_dir`. device "auto"
        uses the GPU when the back end has one. The compression level's K cache type, and
        whether cells may be evicted, are fixed here for every conversation of this engine.
        `compressor`: a trained CCM compressor folder, True to use the one shipped or trained
        for this model file if there is one (levels then run CCM), False for none.
        `flash_attn` (llama.cpp): None lets the engine choose (on, except for an evicting
        context on the CPU; see LlamaContext). `llama_options` (llama.cpp): which of its
        optimisations run, each on its own switch (engine.llama_options; None: all).
        """
        if backend not in BACKENDS:
            raise EngineError(f"Unknown back end {backend!r}; pick one of {BACKENDS}.")
        if device not in DEVICES:
            raise EngineError(f"Unknown device {device!r}; pick one of {DEVICES}.")
        path = resolve_model_path(model, allow_dir=backend != "llamacpp")
        backend = pick_backend(backend, path)
        skipped: list[str] = []
        candidates = _compressor_candidates(compressor, path, skipped)
        level = compression if isinstance(compression, str) else None

        def config_for(files: CompressorFiles | None) -> CompressionConfig:
            if level is None:
                return compression  # type: ignore[return-value]  (a CompressionConfig)
            return CompressionConfig.for_level(level, backend == "llamacpp", files)

        def opened_with(config: CompressionConfig) -> Opened:
            return open_backend(backend, BackendOptions(
                path=path, device=device, n_ctx=n_ctx, kv_type=config.kv_type,
                evicts=config.policy().budget is not None, n_gpu_layers=n_gpu_layers,
                n_threads=n_threads, cache_dir=Path(cache_dir) if cache_dir else None,
                flash_attn=flash_attn, llama=llama_options))

        config = config_for(candidates[0] if candidates else None)
        opened = opened_with(config)
        files, vectors = _first_that_fits(candidates, opened, compressor is not True, skipped)
        if candidates and files is not candidates[0]:
            before, config = config, config_for(files)
            if (before.kv_type, before.policy().budget is None) != (
                    config.kv_type, config.policy().budget is None):
                _close(opened)  # its cache was made for the compressor passed over
                opened = opened_with(config)
        default = model is None and not os.environ.get(MODEL_ENV_VAR)
        info = EngineInfo(
            model_name=DEFAULT_MODEL_NAME if default else opened.model.name,
            model_path=path,
            backend=backend,
            device=opened.device_label,
            n_ctx=opened.ctx.n_ctx,
            n_gpu_layers=opened.n_gpu_layers,
        )
        engine = cls(opened.model, opened.ctx, info, config)
        engine.skipped_compressors = skipped
        engine.compression = engine._noted(config)
        if files is not None:
            try:
                engine.ccm = LoadedCompressor(files, opened.model.load_compressor(files),
                                              vectors)
            except Exception:
                engine.close()
                raise
        return engine

    def compression_for(self, level: str) -> CompressionConfig:
        """What `level` means on this engine's back end, with its compressor if it has one."""
        return self._noted(CompressionConfig.for_level(
            level, self.info.backend == "llamacpp", self.ccm.files if self.ccm else None))

    def policy_for(self, config: CompressionConfig) -> MemoryPolicy:
        """The memory policy `config` runs here; ValueError where this engine cannot run it:
        another K cache type, eviction on a context loaded to keep every token, or what
        the policy says it needs (`MemoryPolicy.needs_compressor`, `.merges`) missing."""
        if config.kv_type != self.kv_type:
            raise ValueError(
                f"This engine's KV cache is {self.kv_type}, not {config.kv_type}: "
                "load an engine for that level."
            )
        policy = config.policy()
        if policy.budget is not None and not self.evicts:
            raise ValueError(
                f"This engine was loaded for a level that keeps every token; load one with "
                f"compression={config.level!r} to run {config.method!r}."
            )
        if policy.needs_compressor:
            self._check_compressor(config, policy)
        return policy

    def _check_compressor(self, config: CompressionConfig, policy: MemoryPolicy) -> None:
        ccm = self.ccm
        if ccm is None:
            raise ValueError(f"{config.method} needs a trained compressor for this model, and "
                             "none is loaded: train one with `ccm-chat train-compressor`.")
        if policy.merges and not self.ctx.merges:
            raise ValueError("CCM-merge is not available on the llama.cpp back end: it averages "
                             "cached keys and values, which llama.cpp's cache cannot do. Use "
                             "ccm-concat, or the hf back end (--backend hf).")
        if (config.params.get("compressor") != ccm.files.fingerprint
                or config.params.get("n_comp") != ccm.files.n_comp):
            raise ValueError("This memory was set up for another compressor than the one "
                             "loaded.")

    def _noted(self, config: CompressionConfig) -> CompressionConfig:
        """`config`, its reason telling of the compressors passed over, if any were."""
        if not self.skipped_compressors or config.policy().budget is None:  # keeps all
            return config
        why = " ".join(self.skipped_compressors)
        return replace(config, reason=f"{config.reason} (a compressor was passed over: {why})")

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

    def activate(self, conv: Conversation) -> Context:
        """Give `conv` the context, parking whichever conversation held it."""
        with self._lock:
            if self._active is not conv:
                if self._active is not None:
                    self._active.park()
                    self._active = None  # parked: an unpark that fails leaves no one active
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


def _close(opened: Opened) -> None:
    opened.ctx.close()
    opened.model.close()


def _compressor_candidates(compressor: str | os.PathLike[str] | bool, model_path: Path,
                           skipped: list[str]) -> list[CompressorFiles]:
    """The compressors to try, first choice first: the one named (refused, ModelError, if
    unsound or made for another model file), or those found for this model file (unsound
    ones passed over, noted in `skipped`), or none."""
    if compressor is False:
        return []
    if compressor is True:
        return find_compressors(model_fingerprint(model_path), skipped=skipped)
    files = CompressorFiles.open(compressor)
    files.tensors()
    if files.card["base_fingerprint"] != model_fingerprint(model_path):
        raise EngineError(f"The compressor in {files.folder} was trained for another model "
                          f"file ({files.card.get('base_model', '?')}).")
    return [files]


def _first_that_fits(candidates: list[CompressorFiles], opened: Opened, named: bool,
                     skipped: list[str]) -> tuple[CompressorFiles | None, np.ndarray | None]:
    """The first compressor whose tensors fit the opened model, with its <COMP> vectors,
    checked before any reaches the back end; one named that does not is refused (the
    back end closed), one found is passed over and noted in `skipped`."""
    for files in candidates:
        try:
            return files, files.vectors(opened.model.compressor_shape)
        except ModelError as exc:
            if named:
                _close(opened)
                raise
            log.info("A compressor was passed over: %s", exc)
            skipped.append(str(exc))
    return None, None
