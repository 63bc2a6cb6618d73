"""A LoRA that is on only at <COMP> positions: ordinary text runs through the frozen model."""

from __future__ import annotations

import math

import torch
from torch import nn


class CompGate:
    """What the current forward is: which positions are <COMP> slots ((batch, seq) float, or
    None) and, in a parallel training forward, the episode's layout; with the model's rotary
    embedding, which moves slots into their memory positions."""

    def __init__(self, rotary: nn.Module) -> None:
        self.mask: torch.Tensor | None = None
        self.layout = None
        self.attention_mask: torch.Tensor | None = None  # the layout's, built once a forward
        self.rotary = rotary


class ConditionalLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: CompGate) -> None:
        super().__init__()
        self.base = base
        self.gate = gate
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self.gate.mask
        if mask is None:
            return out
        if not torch.is_grad_enabled():
            # inference: the <COMP> batch is a few rows, so the LoRA runs on all of them under
            # the mask; selecting rows would sync the host with the GPU in every projection
            delta = (x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
            return out + delta * (self.scale * mask[..., None].to(x.dtype))
        # training: long forwards with few <COMP> rows, so only those rows run the LoRA
        rows = mask.reshape(-1).nonzero().flatten()
        if not rows.numel():
            return out
        flat = x.reshape(-1, x.shape[-1])[rows]
        delta = (flat @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
        delta = delta * (self.scale * mask.reshape(-1)[rows, None].to(x.dtype))
        return out.reshape(-1, out.shape[-1]).index_add(0, rows, delta).view(out.shape)
