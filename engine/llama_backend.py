"""The llama.cpp back end: open a model and its context (engine.backend's entry point).

A context is three jobs, a class each: the primitives over llama-cpp-python's low-level
bindings (engine.llama_context: decode, remove, shift, state get/set, adapters), compaction
after an edit (engine.llama_compact), and the CCM step's second context with the KV moves
made in host memory (engine.llama_moves). `LlamaContext` puts them together; the model is
engine.llama_model's. Everything works on sequence 0 of one context: the engine parks and
restores conversations.
"""

from __future__ import annotations

from ccm_chat.engine.backend import BackendOptions, Opened
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.llama_compact import Compaction
from ccm_chat.engine.llama_context import KV_TYPES, SEQ, LlamaPrimitives, Sampler
from ccm_chat.engine.llama_model import POSITION_LIMIT, LlamaModel, gpu_available
from ccm_chat.engine.llama_moves import BESIDE_MAX_CELLS, HostMoved, HostMoves
from ccm_chat.engine.llama_options import LlamaOptions

__all__ = ["BESIDE_MAX_CELLS", "HOST_ROTATE_MAX", "KV_TYPES", "POSITION_LIMIT", "SEQ",
           "HostMoved", "LlamaContext", "LlamaModel", "LlamaOptions", "Sampler", "gpu_available",
           "open_backend"]

# Keys re-rotated in host memory at most (elements, all layers), beyond which a CCM step has
# llama.cpp shift them instead (numpy's time grows with them, the shift's hardly). H200, 60
# turns, steps that also dropped old groups: 0.37 M rotating elements (default model,
# aggressive) took 14.3 % of a turn on the host against 27.4 % shifted; 2.1 M (8B shape)
# took 12.8 % against 9.8 % (bench/results/turn_profile_gpu*_host_moves.json, "late").
HOST_ROTATE_MAX = 1 << 20


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
                           flash_attn=options.flash_attn, options=options.llama)
    except Exception:
        model.close()
        raise
    label = "GPU (CUDA)" if n_gpu_layers != 0 and has_gpu else "CPU"
    return Opened(model, ctx, label, n_gpu_layers)



class LlamaContext(HostMoves, Compaction, LlamaPrimitives):
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
        options: LlamaOptions | None = None,
    ) -> None:
        """`options`: which of the optimisations run (engine.llama_options; None: all)."""
        LlamaPrimitives.__init__(self, model, n_ctx, n_batch, n_threads, kv_type, evicts,
                                 flash_attn)
        self.options = options = options or LlamaOptions()
        pin = model.offloaded if options.pinned_buffers is None else options.pinned_buffers
        self._init_compaction(pin)
        self._init_moves(pin, options.beside_context, options.host_moves)
        if options.defer_moved_text is not None:
            self.batches_cheaply = options.defer_moved_text

    @property
    def host_rotate_max(self) -> int:
        """HOST_ROTATE_MAX, read at each step (a test or benchmark may lower it)."""
        return HOST_ROTATE_MAX

    def close(self) -> None:
        self._close_beside()
        self._scratch.free()
        self._made.free()
        LlamaPrimitives.close(self)
