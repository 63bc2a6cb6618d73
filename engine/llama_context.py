"""llama.cpp's context primitives: decode (tokens, embeddings), remove, shift, state get/set,
the LoRA adapter, logits and sampling, on sequence 0 of one context.

The high-level `Llama` class assumes contiguous positions and owns the KV cache; memory
policies need to edit the cache between turns, so the decode loop is driven here directly.
Compaction (engine.llama_compact) and the CCM step's second context and host-side key moves
(engine.llama_moves) build on these calls; engine.llama_backend puts the three together.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np

from ccm_chat.engine.ccm.files import check_embeddings
from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.llama_model import LlamaModel
from ccm_chat.engine.threads import resolve_threads

SEQ = 0
KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


class LlamaPrimitives:
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
        self._holes = False  # cells were removed from before others since the last compaction
        self._shifted = False  # positions were moved (applied lazily) since then
        self._n_threads = n_threads
        self._adapter: object | None = None  # the LoRA adapter this context decodes with
        self._keeps_adapter = False  # True for the context beside: it leaves it on
        # llama.cpp's position of cell 0. RoPE attention reads only the distance between a
        # query and a key, so a gap closes the same with the cells before it moved up as
        # with those after it moved down; moving the fewer means fewer keys to re-rotate
        # (a window eviction: the 4 sink cells, not the 500 after the gap; a CCM step that
        # drops old groups: the new slots only). Conversations see positions from 0.
        self._base = 0
        self._stale = False  # the cache was loaded since the last decode: no logits yet
        self._pending: int | None = None  # the last token, decoded again when logits are read

    def close(self) -> None:
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

    def sample(self, ctx: LlamaPrimitives) -> int:
        ctx.current()
        return llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, -1)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

