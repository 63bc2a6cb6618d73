"""The transformers back end's fast path on CUDA: a static KV cache, the one-token decode step
replayed as a CUDA graph, and sampling on the GPU.

Eager PyTorch launches every kernel of a decode step from Python, hundreds a token, so a small
model decodes at a tenth of llama.cpp's speed. Here the step is captured once per span of
key columns (a power of two, so attention reads at most twice the cells held) and replayed:
the token goes in by a device fill, positions and the write index are device tensors, and the
only host sync per token is handing the sampled token over. The <COMP> slots' forward is
captured the same way, per span and row count. Prompts and scoring stay eager, on the same
static cache, and every memory edit (evict and shift, CCM slots, merge, save and restore) is
an in-place copy on it (engine.static_kv), so a captured step keeps reading the right cells.
The state format is HFContext's, so states move between them.
"""

from __future__ import annotations

import inspect
import os
import random
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
from transformers import AttentionInterface

from ccm_chat.engine.config import SamplingParams
from ccm_chat.engine.errors import EngineError
from ccm_chat.engine.hf_backend import HFContext, HFModel
from ccm_chat.engine.static_kv import StaticKVCache

SPAN_MIN = 256  # the smallest captured span of key columns
DECODE_ATTENTION = "ccm_static_decode"


def split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    """Attention for a few query rows over a long masked cache as two batched matrix
    products, the grouped-query heads kept grouped (no copy of the keys per head): the
    masked fused kernel parallelizes over heads and query rows only, a handful at decode."""
    b, h, q, d = query.shape
    groups = h // key.shape[1]
    grouped = query.reshape(b, key.shape[1], groups * q, d)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float()
    scale = scaling if scaling is not None else d ** -0.5
    if attention_mask is None:
        scores = scores * scale
    else:  # one kernel: mask + scale * scores (a one-row mask broadcasts over the groups)
        mask = attention_mask.float()
        scores = torch.add(mask if q == 1 else mask.repeat(1, 1, groups, 1), scores, alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).reshape(b, h, q, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, split_attention)


# RMSNorm classes whose forward is Llama's (x * rsqrt(mean(x^2) + eps), times the weight)
PLAIN_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


@contextmanager
def fused_norms(model: torch.nn.Module):
    """Llama's RMSNorm as torch's fused rms_norm (one kernel, not seven) while a step is
    captured: the same function in float32, rounded once instead of twice."""
    norms = [m for m in model.modules() if type(m).__name__ in PLAIN_RMS_NORMS]
    for m in norms:
        m.forward = partial(_rms_norm, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


def _rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), module.weight,
                                        module.variance_epsilon)


def span_for(cells: int, capacity: int) -> int:
    """The captured span that holds `cells` key columns: a power of two, at most capacity."""
    span = SPAN_MIN
    while span < cells:
        span *= 2
    return min(span, capacity)


class FastHFContext(HFContext):
    """HFContext on a StaticKVCache, with one-token decodes replayed from CUDA graphs."""

    def __init__(self, model: HFModel, n_ctx: int, n_batch: int = 512,
                 graphs: bool | None = None, attention: str | None = None,
                 compile_step: bool | None = None, fuse_norms: bool | None = None) -> None:
        self.cache = None
        # captured forwards: a decode step by span; <COMP> rows by (span, rows)
        self._graphs: dict[object, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.row_graphs = self.graphs  # <COMP> rows replayed too (False: eager)
        self._rows_in: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # embeds, LoRA mask
        # which attention the captured step runs ("split": two matrix products; "sdpa")
        self.attention = attention or os.environ.get("CCM_CHAT_HF_DECODE_ATTENTION", "split")
        self.fuse_norms = (os.environ.get("CCM_CHAT_HF_FUSED_NORMS", "1") != "0"
                           if fuse_norms is None else fuse_norms)
        if compile_step is None:
            compile_step = os.environ.get("CCM_CHAT_HF_COMPILE") == "1"
        # torch.compile fuses the step's small kernels before capture (minutes to compile
        # a span the first time, so off unless asked for)
        self._step_model = (torch.compile(model.torch_model, dynamic=False) if compile_step
                            else model.torch_model)
        self._dtype = next(model.torch_model.parameters()).dtype
        self._mask_min = torch.finfo(self._dtype).min
        super().__init__(model, n_ctx, n_batch)
        self._tok = torch.zeros((1, 1), dtype=torch.long, device=model.device)
        forward = inspect.signature(model.torch_model.forward).parameters
        self._cache_position = "cache_position" in forward  # transformers before 5.2x

    def close(self) -> None:
        self._graphs.clear()
        self.cache = None

    def clear(self) -> None:
        if self.cache is None:
            self.cache = StaticKVCache(self.model.config, self.n_ctx, self.model.device,
                                       self._dtype)
        self.cache.set_held(0)
        self.positions = torch.empty(0, dtype=torch.long)
        self._last: torch.Tensor | None = None

    # -- decoding --------------------------------------------------------------------------------

    def _check_room(self, start_pos: int, n: int) -> None:
        super()._check_room(start_pos, n)
        if start_pos + n > self.n_ctx:
            raise EngineError(f"{start_pos + n} cells do not fit the context of {self.n_ctx}.")

    @torch.inference_mode()
    def decode(self, tokens, start_pos: int, want=()) -> dict:
        self._check_room(start_pos, len(tokens))
        if len(tokens) == 1 and self.graphs and self._replay(int(tokens[0])):
            self.positions = torch.cat([self.positions, torch.tensor([start_pos])])
            return {}
        return super().decode(tokens, start_pos, want)

    def _forward_tokens(self, chunk: list[int], start: int, keep: list[int]) -> torch.Tensor:
        device = self.model.device
        return self._forward(len(chunk), input_ids=torch.tensor([chunk], device=device),
                             logits_to_keep=torch.tensor(keep, device=device,
                                                         dtype=torch.long))[0]

    def _keep_last(self, row: torch.Tensor) -> None:
        self._last = row.float()  # stays on the device for the sampler

    def _forward_embeddings(self, embeds: torch.Tensor, start_pos: int) -> None:
        if not (self.row_graphs and self._replay_rows(embeds)):
            self._forward(embeds.shape[1], inputs_embeds=embeds, logits_to_keep=1)

    def _replay_rows(self, embeds: torch.Tensor) -> bool:
        """<COMP> rows through the captured forward of their span and count (captured on
        first use): eager, the two-row forward of a 30-layer model launched its kernels one
        by one, 31-34 ms of the 32-35 ms after-turn work of a CCM level on an H200
        (bench/results/turn_profile_gpu_hf_deferred.json). The LoRA's mask is an input too.
        False where it cannot be captured (it then runs eager)."""
        n = embeds.shape[1]
        span = span_for(self.cache.held + n, self.n_ctx)
        key = ("rows", span, n)
        gate = self.model.compressor.gate
        if n not in self._rows_in:
            self._rows_in[n] = (torch.empty_like(embeds), torch.empty_like(gate.mask))
        rows_in, mask_in = self._rows_in[n]
        rows_in.copy_(embeds)
        mask_in.copy_(gate.mask)
        runner = self._graphs.get(key)
        if runner is None:
            gate.mask = mask_in  # the captured LoRA reads this tensor
            runner = self._capture(key, partial(self._rows_step, span, n))
            if runner is None:
                self.row_graphs = False
                return False
        runner[0].replay()
        self.cache.held += n
        return True

    def _forward(self, n_new: int, **inputs) -> torch.Tensor:
        """An eager forward of n_new cells after the held ones (attention reads exactly
        those, under a causal mask)."""
        cache, device = self.cache, self.model.device
        n = cache.held
        span = n + n_new
        cache.begin(n_new, span)
        rows = torch.arange(n, span, device=device)
        mask = torch.where(cache.steps[:span][None, :] <= rows[:, None], 0.0, self._mask_min)
        extra = {"cache_position": rows} if self._cache_position else {}
        out = self.model.torch_model(
            position_ids=rows[None], attention_mask=mask.to(self._dtype)[None, None],
            use_cache=True, **{self._cache_arg: cache}, **inputs, **extra)
        cache.grew(n_new)
        return out.logits

    def _replay(self, token: int) -> bool:
        """One token through the captured step of its span (captured on first use); False
        where this model's forward cannot be captured (it then runs eager)."""
        span = span_for(self.cache.held + 1, self.n_ctx)
        runner = self._graphs.get(span) or self._capture(span, partial(self._step, span))
        if runner is None:
            self.graphs = False
            return False
        self._tok.fill_(token)
        runner[0].replay()
        self.cache.held += 1  # the step moved the device's `length` itself
        self._last = runner[1]
        return True

    def _step(self, span: int) -> torch.Tensor:
        cache = self.cache
        cache.begin(1, span)
        mask = torch.where(cache.steps[:span] <= cache.length, 0.0, self._mask_min)
        if self.attention != "split":  # split attention adds it in float32
            mask = mask.to(self._dtype)
        extra = {"cache_position": cache.length.view(1)} if self._cache_position else {}
        out = self._step_model(
            input_ids=self._tok, position_ids=cache.length.view(1, 1),
            attention_mask=mask.view(1, 1, 1, span), use_cache=True,
            logits_to_keep=1, **{self._cache_arg: cache}, **extra)
        cache.length.add_(1)
        return out.logits[0, -1].float()

    def _rows_step(self, span: int, n: int) -> torch.Tensor:
        """n rows of input embeddings (the <COMP> slots, `_rows_in`) after the held cells."""
        cache = self.cache
        cache.begin(n, span)
        rows = cache.index
        mask = torch.where(cache.steps[:span][None, :] <= rows[:, None], 0.0, self._mask_min)
        if self.attention != "split":
            mask = mask.to(self._dtype)
        extra = {"cache_position": rows} if self._cache_position else {}
        out = self._step_model(
            inputs_embeds=self._rows_in[n][0], position_ids=rows[None],
            attention_mask=mask.view(1, 1, n, span), use_cache=True, logits_to_keep=1,
            **{self._cache_arg: cache}, **extra)
        cache.length.add_(n)
        return out.logits[0, -1]

    def _capture(self, key: object, step: Callable[[], torch.Tensor],
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """`step` (a forward after the held cells) captured as a CUDA graph under `key`."""
        config = self.model.torch_model.config
        implementation = config._attn_implementation
        held = self.cache.held
        if self.attention == "split":
            config._attn_implementation = DECODE_ATTENTION
        norms = fused_norms(self.model.torch_model) if self.fuse_norms else nullcontext()
        try:
            with norms:
                graph, out = self._record(step, held)
        except RuntimeError as exc:  # a forward with a host sync cannot be captured
            warnings.warn(f"A forward could not be captured as a CUDA graph ({exc}); "
                          "running it eagerly.", RuntimeWarning, stacklevel=2)
            return None
        finally:
            config._attn_implementation = implementation
            self.cache.set_held(held)  # the warm-up wrote past the held cells only
        self._graphs[key] = (graph, out)
        return self._graphs[key]

    def _record(self, step: Callable[[], torch.Tensor], held: int,
                ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuBLAS handles and workspaces
            for _ in range(2):
                step()
                self.cache.length.fill_(held)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = step()
        return graph, out

    def logits(self, i: int = -1) -> np.ndarray:
        if self._last is None:
            return np.zeros(self.model.n_vocab, dtype=np.float32)
        return self._last.float().cpu().numpy()

    def device_logits(self) -> torch.Tensor:
        """The last decode's logits, on the device (float32)."""
        if self._last is None:
            raise EngineError("No logits yet: decode first.")
        return self._last

    # -- memory edits ----------------------------------------------------------------------------

    @torch.inference_mode()
    def merge_slots(self, n: int, weight: float) -> None:
        self.cache.merge(n, weight)
        self.positions = self.positions[:-n]

    def _keep_cells(self, index: torch.Tensor) -> None:
        self.cache.keep(index)

    def _rotate_cells(self, sel: torch.Tensor, delta: int) -> None:
        self.cache.rotate(self._rotary, sel, delta)

    def state_size(self) -> int:
        return self.cache.held * self.cache.cell_bytes()

    def _cells_on_cpu(self) -> dict[str, torch.Tensor]:
        return self.cache.read()

    def _load_cells(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.cache.write(keys, values)

    def sampler(self, params: SamplingParams) -> TorchSampler:
        return TorchSampler(params, self.model.device)


class TorchSampler:
    """NumpySampler's rules on the device: the repetition penalty on the tokens it drew, then
    greedy, or temperature, top-p and a seeded draw (the exponential race: the argmax of
    p / E, E ~ Exp(1), is a draw from p), so only the chosen token crosses to the host."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator.manual_seed(seed)
        penalized = params.repeat_penalty != 1.0 and params.repeat_last_n > 0
        self.window = params.repeat_last_n if penalized else 0
        self.recent = torch.zeros(max(self.window, 1), dtype=torch.long, device=device)
        self.count = 0

    @torch.inference_mode()
    def sample(self, ctx: FastHFContext) -> int:
        p = self.params
        logits = ctx.device_logits()
        if self.window and self.count:
            seen = self.recent[: min(self.count, self.window)]
            logits = logits.clone()
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repeat_penalty,
                                       vals * p.repeat_penalty)
        token = self._draw(logits)
        if self.window:
            self.recent[self.count % self.window] = token
        self.count += 1
        return int(token)

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.temperature <= 0:
            return torch.argmax(logits)
        probs = torch.softmax(logits / p.temperature, dim=-1)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        if p.top_p >= 1.0:
            return torch.argmax(probs / race)
        ordered, order = torch.sort(probs, descending=True)
        kept = torch.where(ordered.cumsum(0) - ordered < p.top_p, ordered, 0.0)
        return order[torch.argmax(kept / race)]

    def close(self) -> None:
        pass
