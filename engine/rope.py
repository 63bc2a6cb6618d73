"""Moving cached keys to other positions: rotary embedding rotations compose, so a key rotated
for position p becomes the key for p + delta by one more rotation of delta."""

from __future__ import annotations

import torch


def rotate_keys(rotary, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """keys (batch, heads, n, head_dim) moved by delta (n,) positions, in the keys' dtype."""
    part = keys.float()
    cos, sin = rotary(part, delta.to(keys.device)[None])
    scale = getattr(rotary, "attention_scaling", 1.0) or 1.0
    cos, sin = cos.float()[:, None] / scale, sin.float()[:, None] / scale
    half = part.shape[-1] // 2
    rotated = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    return (part * cos + rotated * sin).to(keys.dtype)
