"""llama.cpp's model: its weights, vocabulary and chat template (and the library's setup).

What a context needs of the model (its RoPE, key basis, head size, position limit) is read
from the GGUF's metadata here, so the KV edits made in host memory match llama.cpp's own.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from ccm_chat.engine.ccm.files import ModelShape
from ccm_chat.engine.chat import ChatMessage, for_model
from ccm_chat.engine.errors import ModelError
from ccm_chat.engine.llama_state import Rope, hadamard, rope_factors

log = logging.getLogger(__name__)

# Positions a context's cells stay below (capped by the model's training length): closing a
# gap may move the cells before it up instead of those after it down (LlamaContext._base),
# and positions then grow until a step moves every cell back to 0.
POSITION_LIMIT = 8192
_backend_ready = False
_backend_lock = threading.Lock()


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp logs to stderr, which would scribble over the terminal UI."""
    if os.environ.get("CCM_CHAT_LLAMA_LOG"):
        print(text.decode("utf-8", "replace"), end="", flush=True)


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


def gpu_available() -> bool:
    _init_backend()
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaModel:
    """Model weights, vocabulary and chat template."""

    def __init__(self, path: Path, n_gpu_layers: int) -> None:
        _init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.path = path
        self.n_gpu_layers = n_gpu_layers
        self.offloaded = n_gpu_layers != 0 and gpu_available()
        self.ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelError(
                f"llama.cpp could not load {path}: the file is damaged, truncated, or of an "
                "architecture this llama.cpp does not know. Re-download or re-convert it, or "
                "leave --model out to use the embedded default model."
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)
        n_head = max(1, llama_cpp.llama_model_n_head(self.ptr))
        n_embd_kv = self.n_embd // n_head * llama_cpp.llama_model_n_head_kv(self.ptr)
        # K and V, every layer, f16: what one token costs in an uncompressed cache.
        self.f16_bytes_per_token = 2 * 2 * llama_cpp.llama_model_n_layer(self.ptr) * n_embd_kv
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        self.chat_template: bytes | None = template or None
        self.name = self.meta("general.name") or path.stem

    @property
    def position_limit(self) -> int:
        """Positions the cells stay below (POSITION_LIMIT, or the training length if less)."""
        return min(POSITION_LIMIT, self.n_ctx_train) if self.n_ctx_train > 0 else POSITION_LIMIT

    def key_basis(self, kv_type: str) -> np.ndarray | None:
        """The Walsh-Hadamard matrix llama.cpp stores keys of this type in, or None: one
        for quantized keys whose heads are a multiple of 64 long, of the largest power of
        two that divides them (llama-kv-cache.cpp, attn_rot_k), unless
        LLAMA_ATTN_ROT_DISABLE is set."""
        try:
            disabled = int(os.environ.get("LLAMA_ATTN_ROT_DISABLE") or 0)
        except ValueError:
            disabled = 0
        head = self.head_dim
        if kv_type == "f16" or disabled or head % 64:
            return None
        n = 64
        while head % (2 * n) == 0:
            n *= 2
        return hadamard(n)

    @functools.cached_property
    def head_dim(self) -> int:
        arch = self.meta("general.architecture") or ""
        n_head = max(1, llama_cpp.llama_model_n_head(self.ptr))
        return int(self.meta(f"{arch}.attention.key_length") or self.n_embd // n_head)

    @functools.cached_property
    def rope(self) -> Rope | None:
        """The RoPE that llama.cpp's position shift applies, to move cells in host memory
        (engine.llama_state); None for one this does not reproduce (YaRN, per-layer bases)."""
        arch = self.meta("general.architecture") or ""
        if (self.meta(f"{arch}.rope.scaling.type") not in (None, "none", "linear")
                or self.meta(f"{arch}.attention.sliding_window") is not None):
            log.info("%s's RoPE is not one KV moves in host memory reproduce: llama.cpp's "
                     "shift moves its cells.", self.path.name)
            return None
        head_dim = self.head_dim
        n_rot = int(self.meta(f"{arch}.rope.dimension_count") or head_dim)
        try:
            return Rope.plain(llama_cpp.llama_model_rope_type(self.ptr), n_rot, head_dim,
                              float(self.meta(f"{arch}.rope.freq_base") or 10000.0),
                              llama_cpp.llama_model_rope_freq_scale_train(self.ptr),
                              rope_factors(self.path, n_rot // 2))
        except (ValueError, OSError, KeyError, struct.error) as exc:  # a file this cannot read
            log.info("The RoPE of %s could not be read (%s): llama.cpp's shift moves its "
                     "cells.", self.path.name, exc)
            return None

    @functools.cached_property
    def compressor_shape(self) -> ModelShape:
        """What a compressor's tensors must fit (CompressorFiles.check)."""
        n_head = llama_cpp.llama_model_n_head(self.ptr)
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr)
        return ModelShape(self.n_embd, llama_cpp.llama_model_n_layer(self.ptr),
                          n_head * self.head_dim, n_head_kv * self.head_dim)

    def load_compressor(self, files) -> object:
        """The compressor's LoRA as a llama.cpp adapter (files: CompressorFiles, checked
        against this model first: see Engine.load)."""
        return self.load_adapter(files.adapter)

    def load_adapter(self, path: Path) -> object:
        """A GGUF LoRA adapter for this model (freed with the model)."""
        adapter = llama_cpp.llama_adapter_lora_init(self.ptr, str(path).encode())
        if not adapter:
            raise ModelError(f"llama.cpp could not load the LoRA adapter {path}.")
        return adapter

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    # -- text ------------------------------------------------------------------------------------

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        cap = len(text) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(
            self.vocab, text, len(text), buf, cap, add_special, parse_special
        )
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(
                self.vocab, text, len(text), buf, cap, add_special, parse_special
            )
        return list(buf[:n])

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def render_chat(self, messages: Sequence[ChatMessage], add_assistant: bool) -> bytes:
        """Format messages with the model's own chat template (llama.cpp's built-in renderer),
        which takes them as C strings: a NUL goes in as U+FFFD (chat.for_model)."""
        if self.chat_template is None:
            raise ModelError(
                f"{self.path.name} has no chat template in its metadata, so ccm-chat cannot "
                "format a conversation for it. Use an instruction-tuned (chat) GGUF."
            )
        keep = [(for_model(m.role).encode(), for_model(m.content).encode()) for m in messages]
        arr = (llama_cpp.llama_chat_message * max(1, len(keep)))()
        for i, (role, content) in enumerate(keep):
            arr[i].role = role
            arr[i].content = content
        cap = 256 + 2 * sum(len(r) + len(c) for r, c in keep)
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_chat_apply_template(
            self.chat_template, arr, len(keep), add_assistant, buf, cap
        )
        if n > cap:
            buf = ctypes.create_string_buffer(n)
            n = llama_cpp.llama_chat_apply_template(
                self.chat_template, arr, len(keep), add_assistant, buf, n
            )
        if n < 0:
            raise ModelError(
                f"llama.cpp does not support the chat template of {self.path.name}."
            )
        return buf.raw[:n]

