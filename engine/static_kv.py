"""A pre-allocated KV cache that memory policies edit in place, for CUDA-graph decoding.

transformers' StaticCache keeps fixed tensors so a captured decode step can read and write
them at the same addresses every time; this one adds the edits a memory policy makes (drop a
range and close the gap, re-rotate a range of keys, average slots) as in-place copies on one
tensor that holds every layer's keys and values, so an edit is a few kernels, not one per
layer. Cells sit at indices 0..held-1 in position order; `length` (a device tensor) is where
the next cell goes, read by the layers inside a captured step, so a step never syncs the host.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, StaticLayer

from ccm_chat.engine.rope import rotate_keys


class EditableLayer(StaticLayer):
    """One layer's view of the shared buffer; writes the new cells at the cache's `length`."""

    def __init__(self, owner: StaticKVCache, index: int) -> None:
        super().__init__(max_cache_len=owner.capacity)
        self.owner = owner
        self.keys = owner.kv[0, index]
        self.values = owner.kv[1, index]
        self.is_initialized = True
        self.device = owner.kv.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocated up front by the owner."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner = self.owner
        self.keys.index_copy_(2, owner.index, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, owner.index, value_states.to(self.values.dtype))
        span = owner.span
        return self.keys[:, :, :span], self.values[:, :, :span]

    def get_seq_length(self) -> int:
        return self.owner.held

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.owner.span, 0


class StaticKVCache(Cache):
    """Every layer's K and V in one (2, layers, 1, kv heads, capacity, head dim) tensor."""

    def __init__(self, config, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.capacity = capacity
        self.kv = torch.zeros(2, config.num_hidden_layers, 1, n_kv, capacity, head_dim,
                              device=device, dtype=dtype)
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.steps = torch.arange(capacity, device=device)
        self.held = 0  # host copy of `length`
        self.span = capacity  # key columns the attention reads (a captured step's bucket)
        self.index = self.steps[:1]  # where the forward in progress writes (see `begin`)
        super().__init__(layers=[EditableLayer(self, i) for i in range(config.num_hidden_layers)])

    # -- bookkeeping -----------------------------------------------------------------------------

    def begin(self, n_new: int, span: int) -> None:
        """A forward of n_new cells follows, reading the first `span` key columns; on the
        device, so it can be part of a captured step."""
        self.index = self.steps[:n_new] + self.length
        self.span = span

    def set_held(self, n: int) -> None:
        if not 0 <= n <= self.capacity:
            raise ValueError(f"{n} cells do not fit a cache of {self.capacity}.")
        self.held = n
        self.length.fill_(n)

    def grew(self, n: int) -> None:
        """n cells were written at `length` by a forward: move past them."""
        self.held += n
        self.length.add_(n)

    def cell_bytes(self) -> int:
        return self.kv[:, :, :, :, 0].nelement() * self.kv.element_size()

    # -- edits -----------------------------------------------------------------------------------

    def keep(self, index: torch.Tensor) -> None:
        """Only the cells at `index` (ascending, on the CPU) stay, moved down to 0..len-1."""
        n = len(index)
        moved = (index != torch.arange(n)).nonzero()
        if len(moved):  # the cells before the first gap stay where they are
            at = int(moved[0])
            self.kv[..., at:n, :] = self.kv.index_select(4, index[at:].to(self.kv.device))
        self.set_held(n)

    def rotate(self, rotary, index: torch.Tensor, delta: int) -> None:
        """Keys of the cells at `index` move by `delta` positions (one more rotary rotation)."""
        if not len(index) or delta == 0:
            return
        step = torch.full((len(index),), delta)
        first, last = int(index[0]), int(index[-1])
        if last - first + 1 == len(index):
            keys = self.kv[0, :, 0, :, first: last + 1]  # (layers, heads, n, dim)
            self.kv[0, :, 0, :, first: last + 1] = rotate_keys(rotary, keys, step)
            return
        at = index.to(self.kv.device)
        keys = self.kv[0, :, 0].index_select(2, at)
        self.kv[0, :, 0].index_copy_(2, at, rotate_keys(rotary, keys, step))

    def merge(self, n: int, weight: float) -> None:
        """The last n cells fold into the first n as a running mean, and go."""
        held = self.held
        head = self.kv[..., :n, :] * (1 - weight) + self.kv[..., held - n: held, :] * weight
        self.kv[..., :n, :] = head.to(self.kv.dtype)
        self.set_held(held - n)

    # -- state -----------------------------------------------------------------------------------

    def read(self) -> dict[str, torch.Tensor]:
        """Each layer's held keys and values on the CPU, as the dynamic cache's state has them."""
        kv = self.kv[..., : self.held, :].cpu()
        out = {}
        for i in range(kv.shape[1]):
            out[f"k.{i}"] = kv[0, i].clone()
            out[f"v.{i}"] = kv[1, i].clone()
        return out

    def write(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Hold exactly these cells ((1, heads, n, dim) a layer), from index 0."""
        n = keys[0].shape[2] if keys else 0
        if n > self.capacity:
            raise ValueError(f"{n} cells do not fit a cache of {self.capacity}.")
        block = torch.stack([torch.stack(keys), torch.stack(values)])
        self.kv[..., :n, :] = block.to(self.kv.device, self.kv.dtype)
        self.set_held(n)
