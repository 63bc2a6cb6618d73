"""The CCM compressor around a causal LM: <COMP> vectors plus a conditional LoRA on q/k/v/o.

The vectors are a table of their own fed through `inputs_embeds` (no vocabulary rows: the
default model ties its input and output embeddings). Two ways to run an episode must agree:
`parallel_logits` (one masked forward, for training) and `recursive_logits` (turn by turn on
a compact cache that keeps only the memory, as inference does), under either method: concat
keeps every group, merge keeps the running mean of the groups. The hybrid memory of the app
(old exchanges as slots, the last w verbatim) has its pair too: read blocks in the parallel
forward (`block_logits`) and `hybrid_recursive_logits`.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import DynamicCache

from ccm_chat.engine.ccm import attention
from ccm_chat.engine.ccm.layout import METHODS, Block, Layout, block_layout
from ccm_chat.engine.ccm.lora import CompGate, ConditionalLoRALinear
from ccm_chat.engine.rope import rotate_keys

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Compressor(nn.Module):
    def __init__(self, model: nn.Module, n_comp: int, rank: int = 8, alpha: float = 16.0,
                 method: str = "concat") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown CCM method {method!r}; one of {', '.join(METHODS)}")
        self.model = model
        self.n_comp = n_comp
        self.method = method
        self.gate = CompGate(model.model.rotary_emb)
        embed = model.get_input_embeddings().weight
        std = float(embed.detach().float().std())
        self.comp = nn.Parameter(torch.randn(n_comp, embed.shape[1]) * std)
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.ccm_gate = self.gate
            for name in TARGETS:
                setattr(attn, name,
                        ConditionalLoRALinear(getattr(attn, name), rank, alpha, self.gate))
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def load_trainable(self, path) -> None:
        """Load trained tensors (a compressor.safetensors); every one must fit, or nothing
        would say that the LoRA stayed at zero, and be finite floats (a NaN would turn every
        reply to noise with no word)."""
        from safetensors.torch import load_file

        tensors = load_file(path)
        for name, t in tensors.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: tensor {name} is not a tensor of finite floats")
        result = self.load_state_dict(tensors, strict=False)
        wanted = {n for n, p in self.named_parameters() if any(p is t for t in self.trainable())}
        missing = wanted & set(result.missing_keys)
        if missing or result.unexpected_keys:
            raise ValueError(f"{path} does not fit this model: missing "
                             f"{sorted(missing)[:3]}, unexpected {result.unexpected_keys[:3]}")

    def trainable(self) -> list[nn.Parameter]:
        lora = [p for m in self.model.modules() if isinstance(m, ConditionalLoRALinear)
                for p in (m.lora_a, m.lora_b)]
        return [self.comp, *lora]

    def _run(self, gate: torch.Tensor | None, layout: Layout | None = None,
             rows: torch.Tensor | None = None, head: bool = True, **kwargs) -> torch.Tensor:
        """The model's logits (at the flat `rows` only, when given: an episode's vocabulary
        logits at every position would not fit); without `head`, the last hidden states
        there (training applies the head a chunk of rows at a time)."""
        self.gate.mask, self.gate.layout, self.gate.attention_mask = gate, layout, None
        config = self.model.config
        implementation = config._attn_implementation
        if layout is not None:
            config._attn_implementation = attention.NAME
        try:
            if rows is None:
                return self.model(**kwargs).logits[0]
            hidden = self.model.model(**kwargs).last_hidden_state[0, rows]
            return self.model.lm_head(hidden) if head else hidden
        finally:
            self.gate.mask, self.gate.layout, self.gate.attention_mask = None, None, None
            config._attn_implementation = implementation

    def parallel_logits(self, turns: list[list[int]]) -> tuple[torch.Tensor, Layout]:
        """One forward over the flattened episode under the method's block mask."""
        last = len(turns) - 1
        return self.block_logits([(t, b, b < last) for b, t in enumerate(turns)])

    def block_logits(self, blocks: list[tuple[list[int], int, bool]],
                     rows: torch.Tensor | None = None, head: bool = True,
                     ) -> tuple[torch.Tensor, Layout]:
        """One forward over blocks of (text ids, groups of memory read, slots follow), laid
        out by `block_layout`; logits at every flat position, or at `rows` only (their last
        hidden states instead without `head`)."""
        layout = block_layout([Block(len(t), g, c) for t, g, c in blocks], self.n_comp,
                              self.method)
        embed = self.model.get_input_embeddings()
        dtype, device = embed.weight.dtype, embed.weight.device
        flat = torch.tensor([i for t, _, _ in blocks for i in t], device=device)
        embeds = torch.empty(layout.length, embed.weight.shape[1], dtype=dtype, device=device)
        is_comp = layout.is_comp.to(device)
        embeds[~is_comp] = embed(flat)
        if layout.n_groups:
            embeds[is_comp] = self.comp.to(dtype).repeat(layout.n_groups, 1)
        logits = self._run(
            is_comp[None].to(dtype), layout, rows=rows, head=head,
            inputs_embeds=embeds[None], position_ids=layout.positions[None].to(device),
            use_cache=False,
        )
        return logits, layout

    def compress_into(self, cache: DynamicCache, turn_start: int, groups: int) -> None:
        """Run the <COMP> slots after the turn that begins at cache index `turn_start`, then
        leave only the memory: concat appends the group, merge folds it into the mean
        (`groups` is how many groups the memory stands for, this one included)."""
        held = cache.get_seq_length()
        dtype = self.model.get_input_embeddings().weight.dtype
        device = self.comp.device
        self._run(
            torch.ones(1, self.n_comp, dtype=dtype, device=device),
            inputs_embeds=self.comp[None].to(dtype),
            position_ids=torch.arange(held, held + self.n_comp, device=device)[None],
            use_cache=True, **{self._cache_arg: cache},
        )
        n, merge = self.n_comp, self.method == "merge"
        delta = torch.full((n,), -(held if merge else held - turn_start))
        for layer in cache.layers:
            k = rotate_keys(self.gate.rotary, layer.keys[:, :, -n:], delta)
            v = layer.values[:, :, -n:]
            if merge and turn_start:  # the mean with the n slots held before the turn
                w = 1.0 / groups
                k = layer.keys[:, :, :n] * (1 - w) + k * w
                v = layer.values[:, :, :n] * (1 - w) + v * w
            keep = 0 if merge else turn_start
            layer.keys = torch.cat([layer.keys[:, :, :keep], k], 2)
            layer.values = torch.cat([layer.values[:, :, :keep], v], 2)

    def _read(self, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
        """Text through the frozen model after what the cache holds (the cache grows)."""
        held = cache.get_seq_length()
        device = self.comp.device
        return self._run(
            None, input_ids=torch.tensor([ids], device=device),
            position_ids=torch.arange(held, held + len(ids), device=device)[None],
            use_cache=True, **{self._cache_arg: cache},
        )

    def recursive_logits(self, turns: list[list[int]]) -> list[torch.Tensor]:
        """Turn by turn: read the turn, run the <COMP> slots, keep only the memory."""
        return self.hybrid_recursive_logits(turns, 0)

    def hybrid_recursive_logits(self, turns: list[list[int]], window: int) -> list[torch.Tensor]:
        """Turn by turn, as the app's hybrid memory reads: turn j's logits given the slots of
        turns before j - window and the text of turns j - window..j verbatim after them; the
        slots of each turn are made from the slots before it and its own text, as always."""
        cache = DynamicCache(config=self.model.config)
        memories, out = [], []  # memories[g]: the cache holding the first g groups
        for t, ids in enumerate(turns):
            held = cache.get_seq_length()
            memories.append(copy.deepcopy(cache) if window else None)
            logits = self._read(cache, ids)
            if window:
                first = max(0, t - window)
                view = copy.deepcopy(memories[first])
                text = [i for turn in turns[first:t + 1] for i in turn]
                logits = self._read(view, text)[-len(ids):]
            out.append(logits)
            if t < len(turns) - 1:
                self.compress_into(cache, held, t + 1)
        return out
