"""The CCM compressor around a causal LM: <COMP> vectors plus a conditional LoRA on q/k/v/o.

The vectors are a table of their own fed through `inputs_embeds` (no vocabulary rows: the
default model ties its input and output embeddings). Two ways to run an episode must agree:
`parallel_logits` (one masked forward, for training) and `recursive_logits` (turn by turn on
a compact cache that keeps only the memory, as inference does), under either method: concat
keeps every group, merge keeps the running mean of the groups.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from engine.ccm import attention
from engine.ccm.layout import METHODS, Layout, episode_layout
from engine.ccm.lora import CompGate, ConditionalLoRALinear
from engine.rope import rotate_keys

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
        would say that the LoRA stayed at zero."""
        from safetensors.torch import load_file

        result = self.load_state_dict(load_file(path), strict=False)
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
             **kwargs) -> torch.Tensor:
        self.gate.mask, self.gate.layout = gate, layout
        config = self.model.config
        implementation = config._attn_implementation
        if layout is not None:
            config._attn_implementation = attention.NAME
        try:
            return self.model(**kwargs).logits[0]
        finally:
            self.gate.mask, self.gate.layout = None, None
            config._attn_implementation = implementation

    def episode_embeds(self, turns: list[list[int]]) -> torch.Tensor:
        """Each turn's token embeddings, with the <COMP> vectors after every turn but the last."""
        embed = self.model.get_input_embeddings()
        dtype, device = embed.weight.dtype, embed.weight.device
        pieces = []
        for b, ids in enumerate(turns):
            pieces.append(embed(torch.tensor(ids, device=device)))
            if b < len(turns) - 1:
                pieces.append(self.comp.to(dtype))
        return torch.cat(pieces)[None]

    def parallel_logits(self, turns: list[list[int]]) -> tuple[torch.Tensor, Layout]:
        """One forward over the flattened episode under the method's block mask."""
        layout = episode_layout([len(t) for t in turns], self.n_comp, self.method)
        weight = self.model.get_input_embeddings().weight
        dtype, device = weight.dtype, weight.device
        logits = self._run(
            layout.is_comp[None].to(device, dtype), layout,
            inputs_embeds=self.episode_embeds(turns),
            position_ids=layout.positions[None].to(device),
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

    def recursive_logits(self, turns: list[list[int]]) -> list[torch.Tensor]:
        """Turn by turn: read the turn, run the <COMP> slots, keep only the memory."""
        cache = DynamicCache(config=self.model.config)
        out = []
        for t, ids in enumerate(turns):
            held = cache.get_seq_length()
            out.append(self._run(
                None, input_ids=torch.tensor([ids]),
                position_ids=torch.arange(held, held + len(ids))[None],
                use_cache=True, **{self._cache_arg: cache},
            ))
            if t < len(turns) - 1:
                self.compress_into(cache, held, t + 1)
        return out
