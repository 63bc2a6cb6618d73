"""The parallel forward's attention: each block's own keys plus the memory earlier blocks left.

At every layer the <COMP> slots' keys are moved to their memory-view positions (one more
rotary rotation, as the inference cache does when it drops a turn's text) and appended to
the sequence's keys, with their values; for CCM-merge the appended entries are the running
means over groups, M(g) = (1 - 1/g) M(g-1) + (1/g) C(g). The layout's mask says who sees
what; it is built once per forward (on the gate) and shared by the layers. Registered with
transformers' AttentionInterface and used only during that forward.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from ccm_chat.engine.rope import rotate_keys

NAME = "ccm_episode"
PAD = 16  # key columns padded to a multiple of this: the memory-efficient kernel's alignment


def episode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0,
                      **kwargs):
    gate = module.ccm_gate
    layout = gate.layout
    index = layout.comp_index().to(key.device).flatten()
    delta = layout.view_delta.repeat_interleave(layout.n_comp)
    mem_k = rotate_keys(gate.rotary, key[:, :, index], delta)
    mem_v = value[:, :, index]
    if layout.merge:
        mem_k, mem_v = _running_mean(mem_k, layout.n_comp), _running_mean(mem_v, layout.n_comp)
    keys, values = torch.cat([key, mem_k], 2), torch.cat([value, mem_v], 2)
    mask = gate.attention_mask
    if mask is None or mask.dtype != query.dtype or mask.device != query.device:
        mask = gate.attention_mask = layout.additive_mask(query.dtype, query.device, PAD)
    extra = mask.shape[-1] - keys.shape[2]
    if extra:
        keys, values = F.pad(keys, (0, 0, 0, extra)), F.pad(values, (0, 0, 0, extra))
    # grouped-query heads spelled out: with enable_gqa the masked kernels fall back to the
    # math one, which keeps every (L x L) score for the backward pass
    repeat = query.shape[1] // keys.shape[1]
    if repeat > 1:
        keys, values = keys.repeat_interleave(repeat, 1), values.repeat_interleave(repeat, 1)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask[None, None],
                                         scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _running_mean(states: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, G*n, D) group by group -> the mean of groups 0..g at each group g."""
    b, h, gn, d = states.shape
    groups = states.view(b, h, gn // n, n, d)
    counts = torch.arange(1, gn // n + 1, device=states.device, dtype=states.dtype)
    return (groups.cumsum(2) / counts[None, None, :, None, None]).view(b, h, gn, d)


AttentionInterface.register(NAME, episode_attention)
