"""The CCM compressor around a causal LM: <COMP> vectors plus a conditional LoRA on q/k/v/o.

The vectors are a table of their own fed through `inputs_embeds` (no vocabulary rows: the
default model ties its input and output embeddings). Two ways to run an episode must agree:
`parallel_logits` (one masked forward, for training) and `recursive_logits` (turn by turn,
keeping only the <COMP> keys and values, as inference does).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from engine.ccm.layout import Layout, concat_layout
from engine.ccm.lora import CompGate, ConditionalLoRALinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class Compressor(nn.Module):
    def __init__(self, model: nn.Module, n_comp: int, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.model = model
        self.n_comp = n_comp
        self.gate = CompGate()
        embed = model.get_input_embeddings().weight
        std = float(embed.detach().float().std())
        self.comp = nn.Parameter(torch.randn(n_comp, embed.shape[1]) * std)
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in TARGETS:
                setattr(attn, name,
                        ConditionalLoRALinear(getattr(attn, name), rank, alpha, self.gate))
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def trainable(self) -> list[nn.Parameter]:
        lora = [p for m in self.model.modules() if isinstance(m, ConditionalLoRALinear)
                for p in (m.lora_a, m.lora_b)]
        return [self.comp, *lora]

    def _run(self, gate: torch.Tensor | None, **kwargs) -> torch.Tensor:
        self.gate.mask = gate
        try:
            return self.model(**kwargs).logits[0]
        finally:
            self.gate.mask = None

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
        """One forward over the flattened episode under the CCM-concat block mask."""
        layout = concat_layout([len(t) for t in turns], self.n_comp)
        weight = self.model.get_input_embeddings().weight
        dtype, device = weight.dtype, weight.device
        logits = self._run(
            layout.is_comp[None].to(device, dtype),
            inputs_embeds=self.episode_embeds(turns),
            position_ids=torch.arange(layout.length, device=device)[None],
            attention_mask=layout.additive_mask(dtype).to(device),
            use_cache=False,
        )
        return logits, layout

    def recursive_logits(self, turns: list[list[int]]) -> list[torch.Tensor]:
        """Turn by turn: read the turn, run the <COMP> slots, drop the turn's own KV."""
        cache = DynamicCache(config=self.model.config)
        pos, out = 0, []
        for t, ids in enumerate(turns):
            held = cache.get_seq_length()
            out.append(self._run(
                None, input_ids=torch.tensor([ids]),
                position_ids=torch.arange(pos, pos + len(ids))[None],
                use_cache=True, **{self._cache_arg: cache},
            ))
            pos += len(ids)
            if t == len(turns) - 1:
                break
            dtype = self.model.get_input_embeddings().weight.dtype
            self._run(
                torch.ones(1, self.n_comp, dtype=dtype),
                inputs_embeds=self.comp[None].to(dtype),
                position_ids=torch.arange(pos, pos + self.n_comp)[None],
                use_cache=True, **{self._cache_arg: cache},
            )
            pos += self.n_comp
            keep = torch.cat([torch.arange(held), torch.arange(held + len(ids),
                                                               held + len(ids) + self.n_comp)])
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(2, keep)
                layer.values = layer.values.index_select(2, keep)
        return out
