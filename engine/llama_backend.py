"""A thin layer over llama-cpp-python's low-level bindings.

The high-level `Llama` class assumes contiguous positions and owns the KV cache; memory
policies need to edit the cache between turns, so the decode loop is driven here directly.
Everything works on sequence 0 of one context: the engine parks and restores conversations.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from ccm_chat.engine.backend import BackendOptions, Opened, slots_in_place
from ccm_chat.engine.ccm.files import ModelShape, check_embeddings
from ccm_chat.engine.chat import ChatMessage, for_model
from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import EngineError, ModelError
from ccm_chat.engine.host_buffer import HostBuffer
from ccm_chat.engine.llama_state import (
    FirstKeys,
    Rope,
    SeqState,
    hadamard,
    rope_factors,
    same_cells,
)
from ccm_chat.engine.threads import resolve_threads

SEQ = 0
# The largest CCM step run in the second context (LlamaContext.slots_over_text): its cache
# stays allocated at its biggest use, and an 8B model's 4,096 cells take 512 MB.
BESIDE_MAX_CELLS = 4096
# Keys re-rotated in host memory at most (elements, all layers), beyond which a CCM step has
# llama.cpp shift them instead (numpy's time grows with them, the shift's hardly). H200, 60
# turns, steps that also dropped old groups: 0.37 M rotating elements (default model,
# aggressive) took 14.3 % of a turn on the host against 27.4 % shifted; 2.1 M (8B shape)
# took 12.8 % against 9.8 % (bench/results/turn_profile_gpu*_host_moves.json, "late").
HOST_ROTATE_MAX = 1 << 20
# Positions a context's cells stay below (capped by the model's training length): closing a
# gap may move the cells before it up instead of those after it down (LlamaContext._base),
# and positions then grow until a step moves every cell back to 0.
POSITION_LIMIT = 8192
KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}
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


def open_backend(options: BackendOptions) -> Opened:
    """The model and one context for it (engine.backend's entry point)."""
    has_gpu = gpu_available()
    if options.device == "gpu" and not has_gpu:
        raise EngineError(
            "--device gpu was asked for, but this llama.cpp build has no GPU support. "
            "Reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on, or use --device cpu."
        )
    n_gpu_layers = options.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if (has_gpu and options.device != "cpu") else 0
    model = LlamaModel(options.path, n_gpu_layers=n_gpu_layers)
    n_ctx = min(options.n_ctx, model.n_ctx_train) if model.n_ctx_train > 0 else options.n_ctx
    try:
        ctx = LlamaContext(model, n_ctx=n_ctx, n_threads=options.n_threads,
                           kv_type=options.kv_type, evicts=options.evicts,
                           flash_attn=options.flash_attn)
    except Exception:
        model.close()
        raise
    label = "GPU (CUDA)" if n_gpu_layers != 0 and has_gpu else "CPU"
    return Opened(model, ctx, label, n_gpu_layers)


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
            return None
        head_dim = self.head_dim
        n_rot = int(self.meta(f"{arch}.rope.dimension_count") or head_dim)
        try:
            return Rope.plain(llama_cpp.llama_model_rope_type(self.ptr), n_rot, head_dim,
                              float(self.meta(f"{arch}.rope.freq_base") or 10000.0),
                              llama_cpp.llama_model_rope_freq_scale_train(self.ptr),
                              rope_factors(self.path, n_rot // 2))
        except (ValueError, OSError, KeyError, struct.error):  # a file this cannot read
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


@dataclass(frozen=True)
class HostMoved:
    """A CCM step or an eviction made on a state in host memory (LlamaContext._host_moved)."""

    state: np.ndarray  # what llama.cpp loads
    kind: str  # what moved ("up", "down", "drop down", ...): each kind is checked once
    checked: bool  # a step of this kind gave what llama.cpp's shift gives
    up: int  # how far the base moved (LlamaContext._base_step)
    restore: Callable[[], np.ndarray] | None = None  # checked: the source's cells as they were


class LlamaContext:
    """One llama.cpp context: a KV cache with a single sequence, and the decode calls on it."""

    def __init__(
        self,
        model: LlamaModel,
        n_ctx: int,
        n_batch: int = 512,
        n_threads: int | None = None,
        kv_type: str = "f16",
        evicts: bool = False,
        flash_attn: bool | None = None,
    ) -> None:
        self.model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        threads = resolve_threads(n_threads)
        params.n_threads = threads.decode
        params.n_threads_batch = threads.batch
        self.threads = threads
        # Only K is quantized: a quantized V cache needs flash attention, which an evicting
        # context on the CPU runs without. There, with it, logits were off by up to 1.2 once
        # cells had been evicted from the middle of a sequence, a reply generated while a small
        # window slid under it turned to gibberish (0.3.36), and decode at 1,560 tokens ran
        # 47.7 tok/s against 64.8 without it (2-core dev CPU). A context that keeps every token
        # leaves it on: without it, batched prefill and token-by-token decode gave logits up to
        # 0.18 apart. On a GPU it stays on: without it the V cache is stored transposed, and a
        # state save or load copies it one row at a time, a device copy each, so the after-turn
        # work (whose state round trip compacts the cache after an eviction) took 147-167 ms a
        # turn on an H200 against 8-24 ms with it (bench/turn_overhead.py --flash-attn both),
        # for 0.5-0.7 % higher perplexity from the evicted memory (bench/eviction_flash.py).
        if flash_attn is None:
            flash_attn = not evicts or model.offloaded
        params.type_k = KV_TYPES[kv_type]
        params.type_v = llama_cpp.GGML_TYPE_F16
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise EngineError(
                f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?). "
                "Lower the context size in settings."
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)
        self.kv_type = kv_type
        self.evicts = evicts
        self.flash_attn = flash_attn  # it decides the V cache's layout, so a saved state's too
        # capabilities (engine.backend.Context)
        self.merges = False  # its cache cannot average cells (CCM-merge)
        self.needs_compaction = True  # after an eviction, before the next decode or save
        self.batches_cheaply = model.offloaded  # see engine.backend.Context
        self.n_batch = llama_cpp.llama_n_batch(self.ptr)  # at most n_ctx
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # what states are copied through, and the states made in host memory
        self._scratch = HostBuffer(pin=model.offloaded)
        self._made = HostBuffer(pin=model.offloaded)
        self._holes = False  # cells were removed from before others since the last compaction
        self._shifted = False  # positions were moved (applied lazily) since then
        self._n_threads = n_threads
        self._adapter: object | None = None  # the LoRA adapter this context decodes with
        self._beside: LlamaContext | None = None  # see slots_over_text
        self._keeps_adapter = False  # True for the context beside: it leaves it on
        self.adapter_beside = True  # False: toggle the adapter here (bench/turn_profile.py)
        # a CCM step's cells moved in host memory (slots_over_text): None until a step of
        # each kind (moving only the new slots; dropping old ones too) has been checked
        # against llama.cpp's own shift
        self.moves_on_host: bool | None = None
        self._moves_checked: set[str] = set()  # kinds checked (see _host_moved)
        # llama.cpp's position of cell 0. RoPE attention reads only the distance between a
        # query and a key, so a gap closes the same with the cells before it moved up as
        # with those after it moved down; moving the fewer means fewer keys to re-rotate
        # (a window eviction: the 4 sink cells, not the 500 after the gap; a CCM step that
        # drops old groups: the new slots only). Conversations see positions from 0.
        self._base = 0
        self._stale = False  # the cache was loaded since the last decode: no logits yet
        self._pending: int | None = None  # the last token, decoded again when logits are read
        self._pristine = FirstKeys()  # cells that move up: their keys as first read

    def close(self) -> None:
        self._close_beside()
        self._scratch.free()
        self._made.free()
        if self.ptr:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    def decode(self, tokens: Sequence[int], start_pos: int, want: Sequence[int] = ()) -> dict:
        """Decode tokens at positions start_pos.. ; return logits rows for indices in `want`.

        The last token's logits are always computed, so sampling can follow.
        """
        wanted = set(want) | {len(tokens) - 1}
        rows: dict[int, np.ndarray] = {}
        batch = self._batch
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = self._base + start_pos + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = SEQ
                batch.logits[i] = (offset + i) in wanted
            rc = llama_cpp.llama_decode(self.ptr, batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed (code {rc}) at position {start_pos}.")
            self._stale = False
            self._pending = None
            for i in range(len(chunk)):
                if (offset + i) in wanted and (offset + i) != len(tokens) - 1:
                    rows[offset + i] = self.logits(i)
        return rows

    def decode_embeddings(self, vectors: np.ndarray, start_pos: int,
                          adapter: object | None = None) -> None:
        """Decode rows of input embeddings (the <COMP> vectors) at start_pos.., with the LoRA
        `adapter` on for them only (here in this context: see slots_over_text). llama.cpp
        reads n_embd floats a row whatever the array holds, so any other width is refused."""
        check_embeddings(vectors, self.model.n_embd)
        n = len(vectors)
        batch = llama_cpp.llama_batch_init(n, self.model.n_embd, 1)
        try:
            self._use_adapter(adapter)
            flat = np.ascontiguousarray(vectors, dtype=np.float32).ravel()
            ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            batch.n_tokens = n
            for i in range(n):
                batch.pos[i] = self._base + start_pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = SEQ
                batch.logits[i] = i == n - 1
            rc = llama_cpp.llama_decode(self.ptr, batch)
        finally:
            llama_cpp.llama_batch_free(batch)
            if not self._keeps_adapter:
                self._use_adapter(None)
        if rc != 0:
            raise EngineError(f"llama_decode of {n} embeddings failed (code {rc}).")
        self._stale = False
        self._pending = None

    def slots_over_text(self, vectors: np.ndarray, start: int, end: int,
                        adapter: object, drop: int = 0) -> None:
        """A CCM step (engine.backend.Context's), in a second context that keeps the adapter.

        Any change of a context's adapters makes llama.cpp re-reserve its scheduler (a new
        one, with the graphs and compute buffers of a worst-case batch) before the next
        decode: turning the adapter on for the slots and off after them cost 13-14 ms of
        the <COMP> decode and 16-18 ms of the text decoded after it on an H200, most of a CCM
        level's after-turn work. So a second context of the same model, its adapter left on,
        gets a copy of this cache (which ends at `end`), decodes the slots, and the text
        (and the `drop` oldest cells) goes; this cache takes the result back, compacted. The
        two copies replace the compaction round trip the step needs here anyway. The drop
        and the move are made in host memory on the state on its way back (`_host_moved`);
        where that cannot be, llama.cpp's position shift moves the cells in the second
        context. That context holds as many cells as its biggest use so far (it grows in
        steps), at most BESIDE_MAX_CELLS: a longer step runs here, as does one with a
        position shift pending (which a copy would lose); and if the second context fails
        (no memory for it), every step runs here from then on, as before.
        """
        n = len(vectors)
        touched = False
        if (self.adapter_beside and not self._shifted and self.pos_max() == end - 1
                and end + n <= BESIDE_MAX_CELLS):
            try:
                beside = self._beside_for(end + n, n, adapter)
                self._copy_state(self, beside)
                beside.decode_embeddings(vectors, end, adapter)
                moved = self._host_moved(beside, start, end, drop)
                if moved is not None and moved.checked:
                    if self._loaded(moved.state):
                        return
                    moved = None
                    touched = True  # this cache is empty now: beside's result must land
                # llama.cpp's shift: as the state to check against it has it, else the cells
                # after the gap move down
                up = moved.up if moved else beside._base_step(start, end, drop, False, self.n_ctx)
                beside._shift_gaps(start, end, drop, up)
                beside._apply_shift()
            except EngineError:
                if touched:
                    raise
                self._close_beside()  # this cache is untouched so far
                self.adapter_beside = False
            else:
                self._copy_state(beside, self)
                if moved is not None:
                    self._check_moves(moved)
                return
        slots_in_place(self, vectors, start, end, adapter, drop)

    def close_gaps(self, start: int, end: int, drop: int) -> None:
        """engine.backend.close_gaps, moving the side of the gap with fewer cells (`_base`);
        in host memory, as one state round trip with the compaction it needs anyway, where
        that is checked (`_host_moved`), else by llama.cpp's position shift."""
        base = self._base
        moved = self._host_moved(self, start, end, drop)
        if moved is not None and moved.checked:
            if self._loaded(moved.state):
                self._stale = True
                return
            try:  # the kept cells as they were (the dropped ones gone): the shift does the step
                self.set_state(moved.restore())
            except EngineError as exc:
                raise EngineError("llama.cpp refused a memory state it wrote itself; the "
                                  "chat's memory has to be rebuilt from its messages.") from exc
            self._base = base  # not the first kept cell's: the indices are those before
            moved = None
        # llama.cpp's shift: as the state to check against it has it, else the cells after
        # the gap move down
        up = moved.up if moved else self._base_step(start, end, drop, False, self.n_ctx)
        self._shift_gaps(start, end, drop, up)
        if moved is not None:
            self._apply_shift()
            self._round_trip()
            self._stale = True
            self._check_moves(moved)

    def _base_step(self, start: int, end: int, drop: int, on_host: bool, room: int) -> int:
        """How far `_base` moves when [start, end) and [0, drop) go: by `drop` if the cells
        after the gap move down, by `drop + end - start` if those before it move up
        (whichever are fewer, where the move is made in host memory: llama.cpp's shift costs
        the same for any number, and the cells before a gap would turn at every step, their
        roundings adding up), by -_base (every cell back to 0, once in a long while) where
        a context of `room` cells could then reach past the model's position_limit before
        the next step."""
        held = self.pos_max() + 1
        gap = end - start
        _, up = min((held - end, drop), (start - drop, drop + gap)) if on_host else (0, drop)
        if self._base + up + room > self.model.position_limit:
            return -self._base
        return up

    def _shift_gaps(self, start: int, end: int, drop: int, up: int) -> None:
        """The cells of [start, end) and [0, drop) go, the rest close up by llama.cpp's
        shift (applied at the next decode), and `_base` moves `up`."""
        self.remove(start, end)
        if drop:
            self.remove(0, drop)
        self.shift(drop, start, up - drop)
        self.shift(end, -1, up - drop - (end - start))
        self._base += up

    def _host_moved(self, source: LlamaContext, start: int, end: int,
                    drop: int) -> HostMoved | None:
        """Source's cache as `_shift_gaps(start, end, drop, up)` leaves it, the side of the
        gap with fewer cells moving (`up`: `_base_step`), made as state bytes in host
        memory: the kept cells at their new positions, the moved ones' keys
        re-rotated with llama.cpp's RoPE angles. None where that cannot be done (then never
        again), or would re-rotate more than HOST_ROTATE_MAX key elements (this step only).

        The first step of its kind (what turned, and whether old cells went) is made on a
        copy, kept beside the source's state for the check against llama.cpp's shift; once
        checked, llama.cpp drops the cells in the source (no shift: nothing moves yet) and
        the state it writes, the kept cells only, is turned in place: no copy of the cells
        in host memory (2,000 cells of a light window are 35 MB)."""
        if self.moves_on_host is False or source._shifted:  # a shift pending: not in a state
            return None
        up = source._base_step(start, end, drop, True, self.n_ctx)
        held = source.pos_max() + 1
        shifts = ((up - drop, start - drop), (up - drop - (end - start), held - end))
        signs = {int(np.sign(d)) for d, cells in shifts if d and cells > 0}
        kind = ("drop " if drop else "") + (" ".join(
            name for name, sign in (("up", 1), ("down", -1)) if sign in signs) or "still")
        checked = bool(self.moves_on_host) and kind in self._moves_checked
        try:
            rope = self.model.rope
            if rope is None:
                raise ValueError("no RoPE to move keys with")
            basis = self.model.key_basis(self.kv_type)
            if checked:
                source.remove(start, end)
                if drop:
                    source.remove(0, drop)
            state = SeqState(self._read_state(source))
            index = state.positions - source._base
            kept = (index >= drop) & ((index < start) | (index >= end))
            new = state.positions + np.where(index < start, shifts[0][0], shifts[1][0])
            turning = np.nonzero(kept & (new != state.positions))[0]
            if len(turning) * state.key_elements > HOST_ROTATE_MAX:
                return None  # this step only
            if not checked:
                keep = np.nonzero(kept)[0]
                rising = keep[new[keep] > state.positions[keep]]
                undo = self._pristine.turn_from_first(state, rising)
                made = state.moved(keep, new[keep], rope, self._made.array, basis)
                undo()
                return HostMoved(made, kind, False, up)
            old = state.positions[turning].copy()
            self._pristine.turn_from_first(state, turning[new[turning] > old])
            state.turn(turning, new[turning], rope, basis)
        except ValueError:
            self.moves_on_host = False
            return None

        def restore() -> np.ndarray:  # the cells back where they were, for llama.cpp's shift
            state.turn(turning, old, rope, basis)
            return state.buf
        return HostMoved(state.buf, kind, True, up, restore)

    def _check_moves(self, moved: HostMoved) -> None:
        """Compare a state made in host memory with llama.cpp's, in this cache just now."""
        if same_cells(moved.state, self._read_state(self)):
            self._moves_checked.add(moved.kind)
            self.moves_on_host = True
        else:
            self.moves_on_host = False

    def _loaded(self, state: np.ndarray) -> bool:
        """Load state bytes made here; False (and never again) if llama.cpp refuses them."""
        try:
            self.set_state(state)
        except EngineError:
            self.moves_on_host = False
            return False
        return True

    def _close_beside(self) -> None:
        if self._beside is not None:
            self._beside.close()
            self._beside = None

    def _beside_for(self, cells: int, n: int, adapter: object) -> LlamaContext:
        """The context beside this one, with room for `cells` and `adapter` on."""
        beside = self._beside
        if beside is None or beside.n_ctx < cells:
            room = min(self.n_ctx, BESIDE_MAX_CELLS, max(512, 1 << (cells - 1).bit_length()))
            self._close_beside()
            beside = LlamaContext(self.model, n_ctx=room, n_batch=max(n, 32),
                                  n_threads=self._n_threads, kv_type=self.kv_type,
                                  flash_attn=self.flash_attn)
            beside._keeps_adapter = True
            beside.adapter_beside = False
            self._beside = beside
        beside._use_adapter(adapter)
        return beside

    def _use_adapter(self, adapter: object | None) -> None:
        """Decode with this LoRA adapter from now on (None: none); a change costs llama.cpp
        a scheduler re-reserve, so an unchanged one is left alone."""
        if adapter is self._adapter:
            return
        if adapter is None:
            llama_cpp.llama_set_adapters_lora(self.ptr, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self.ptr, arr, 1, scales) != 0:
                raise EngineError("llama.cpp refused the LoRA adapter.")
        self._adapter = adapter

    def compact(self, last_token: int) -> None:
        """Make the cache after an eviction exactly what a save of it would restore.

        llama.cpp defers a position shift to the next decode, and a state saved before that
        restores wrong; so the last cell is decoded again, which applies it. Then the cache
        is compacted by a state round trip: decoding into the holes an eviction leaves gave
        logits far (up to 20) from the same cache compacted (CPU, llama-cpp-python 0.3.36).
        The last cell is decoded once more in the compacted cache, so its KV and the logits
        that sampling reads next come from there. A <COMP> slot (`last_token` < 0) cannot be
        decoded again: a throwaway token applies the shift instead (the next decode is new
        text, so no logits are needed). Decoding where cells of higher positions, or holes,
        sat before the new ones in the buffer also gave wrong logits (off by up to 24), so
        whatever decodes after an edit comes after a compaction.

        Nothing is done when the edits since the last compaction left no hole and shifted
        nothing (only the tail was removed): the cache is then already what a restore
        gives, and on a GPU the round trip is most of the memory work of a turn.
        """
        if not (self._holes or self._shifted):
            if self._stale and last_token >= 0:  # loaded by a host-made step: its logits
                self._pending = last_token  # when read (after a turn, the next one decodes)
            return
        last = self.pos_max()
        if last_token < 0:
            self._apply_shift()
            self._round_trip()
            return
        self.redecode(last_token, last)
        self._round_trip()
        self.redecode(last_token, last)

    def _apply_shift(self) -> None:
        """Apply a pending position shift with a throwaway token, decoded after the last cell
        and removed again (llama.cpp applies shifts at a decode)."""
        last = self.pos_max()
        self.decode([max(self.model.bos, 0)], last + 1)
        self.remove(last + 1)

    def _round_trip(self) -> None:
        """Save the sequence and load it back: it lands compacted."""
        self._copy_state(self, self)

    def _copy_state(self, source: LlamaContext, target: LlamaContext) -> None:
        """Make target's cache a copy of source's (compacted), through one buffer kept for
        the purpose: no bytes object, no copies of the state in Python."""
        written = self._read_into_scratch(source)
        base = source._base
        target.clear(data=False)
        buf = self._scratch.at_least(written)
        if llama_cpp.llama_state_seq_set_data(target.ptr, buf, written, SEQ) == 0:
            target.clear()
            raise EngineError("llama.cpp rejected its own memory state while copying it.")
        target._base, target._stale = base, True

    def _read_into_scratch(self, source: LlamaContext) -> int:
        size = source.state_size()
        return llama_cpp.llama_state_seq_get_data(source.ptr, self._scratch.at_least(size),
                                                  size, SEQ)

    def _read_state(self, source: LlamaContext) -> np.ndarray:
        """Source's state as bytes in the scratch buffer (valid until it is used again)."""
        return self._scratch.array(self._read_into_scratch(source))

    def current(self) -> None:
        """Logits are about to be read: decode the last cell again if `compact` left that
        for now (a GPU decode after an edit costs a graph rebuild, 3.9 ms on an H200)."""
        if self._pending is not None:
            token, self._pending = self._pending, None
            self.redecode(token, self.pos_max())

    def redecode(self, token: int, pos: int) -> None:
        """Decode the last cell again: logits are only current after a decode."""
        self.remove(pos)
        self.decode([token], pos)

    def logits(self, i: int = -1) -> np.ndarray:
        self.current()
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # -- KV cache --------------------------------------------------------------------------------

    def remove(self, p0: int, p1: int = -1) -> None:
        self._pending = None
        if 0 <= p1 <= self.pos_max():  # cells stay behind the removed ones: a hole
            self._holes = True
        llama_cpp.llama_memory_seq_rm(self.memory, SEQ, self._raw(p0), self._raw(p1))

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Move cells at positions [p0, p1) by delta (applied lazily, at the next decode)."""
        self._pending = None
        if delta and p0 <= self.pos_max() and (p1 < 0 or p1 > p0):
            self._shifted = True
        llama_cpp.llama_memory_seq_add(self.memory, SEQ, self._raw(p0), self._raw(p1), delta)

    def _raw(self, pos: int) -> int:
        """llama.cpp's position of a cell index (negative: open-ended, as llama.cpp takes)."""
        return pos + self._base if pos >= 0 else pos

    def sampler(self, params: SamplingParams) -> Sampler:
        return Sampler(params, self.model.vocab, self.model.n_vocab)

    def clear(self, data: bool = True) -> None:
        """Forget every cell; `data`: zero the buffers too. A state load overwrites the
        cells it fills and llama.cpp masks the rest, so it leaves them (zeroing a 4,096-cell
        cache took 1.5 ms of each load on the dev CPU, twice a CCM step)."""
        llama_cpp.llama_memory_clear(self.memory, data)
        self._holes = self._shifted = False
        self._pending = None
        self._base = 0

    def pos_max(self) -> int:
        raw = llama_cpp.llama_memory_seq_pos_max(self.memory, SEQ)
        return raw - self._base if raw >= 0 else -1

    def pos_min(self) -> int:
        raw = llama_cpp.llama_memory_seq_pos_min(self.memory, SEQ)
        return raw - self._base if raw >= 0 else -1

    def state_size(self) -> int:
        return llama_cpp.llama_state_seq_get_size(self.ptr, SEQ)

    def get_state(self) -> bytes:
        size = self.state_size()
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ptr, buf, size, SEQ)
        # a copy through the buffer protocol: ctypes.string_at takes a C int length and
        # returns the wrong size past 2 GiB (an 8B model's KV at 32k tokens is 4.3 GB)
        return bytes(memoryview(buf)[:written])

    def set_state(self, data: bytes | memoryview) -> None:
        self.clear(data=False)
        buf = np.frombuffer(data, dtype=np.uint8)  # llama.cpp reads the caller's bytes: no copy
        src = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(self.ptr, src, buf.size, SEQ) == 0:
            self.clear()
            raise EngineError("llama.cpp rejected the saved memory state.")
        # a state saved after gaps closed upward starts past 0 (see _base)
        self._base = max(0, llama_cpp.llama_memory_seq_pos_min(self.memory, SEQ))
        self._stale = True


class Sampler:
    """llama.cpp's own sampler chain: repetition penalties, DRY, then top-p, temperature and
    a seeded draw (or greedy)."""

    DRY_BREAKERS = (b"\n", b":", b'"', b"*")  # llama.cpp's defaults: a new line resets a run

    def __init__(self, params: SamplingParams, vocab: object, n_vocab: int) -> None:
        self.ptr = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        add = lambda sampler: llama_cpp.llama_sampler_chain_add(self.ptr, sampler)  # noqa: E731
        if params.repeat_penalty != 1.0 and params.repeat_last_n:
            add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.dry_multiplier > 0:
            breakers = (ctypes.c_char_p * len(self.DRY_BREAKERS))(*self.DRY_BREAKERS)
            add(llama_cpp.llama_sampler_init_dry(
                vocab, params.dry_multiplier, params.dry_base, params.dry_allowed_length, -1,
                breakers, len(self.DRY_BREAKERS)))
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
            add(llama_cpp.llama_sampler_init_dist(seed))

    def sample(self, ctx: LlamaContext) -> int:
        ctx.current()
        return llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, -1)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
