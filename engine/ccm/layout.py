"""Where the <COMP> groups sit in a flattened episode, and who may attend to whom.

An episode of turns t1..tk is laid out as t1 C1 t2 C2 ... tk, each Ci a group of n <COMP>
slots. Positions are monotone (the slots use positions up). Under CCM-concat a token of
block i (ti and Ci) sees the earlier tokens of its own block and every earlier group Cj,
j < i, but no earlier turn's text: exactly what the recursive loop keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    is_comp: torch.Tensor  # (L,) bool: a <COMP> slot
    block: torch.Tensor  # (L,) long: which turn's block a position belongs to
    slot: torch.Tensor  # (L,) long: which <COMP> vector (0..n-1), -1 for text
    text_index: list[list[int]]  # per turn, the flat positions of its tokens

    @property
    def length(self) -> int:
        return int(self.is_comp.numel())

    def allowed(self) -> torch.Tensor:
        """(L, L) bool: query i may attend to key j."""
        i = torch.arange(self.length)
        causal = i[None, :] <= i[:, None]
        same = self.block[None, :] == self.block[:, None]
        earlier_comp = self.is_comp[None, :] & (self.block[None, :] < self.block[:, None])
        return causal & (same | earlier_comp)

    def additive_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(1, 1, L, L): 0 where allowed, the dtype's minimum elsewhere."""
        mask = torch.zeros(self.length, self.length, dtype=dtype)
        mask.masked_fill_(~self.allowed(), torch.finfo(dtype).min)
        return mask[None, None]


def concat_layout(turn_lengths: list[int], n_comp: int) -> Layout:
    """The layout for turns of these lengths: a <COMP> group after every turn but the last."""
    is_comp, block, slot, text_index = [], [], [], []
    pos = 0
    for b, length in enumerate(turn_lengths):
        text_index.append(list(range(pos, pos + length)))
        is_comp += [False] * length
        block += [b] * length
        slot += [-1] * length
        pos += length
        if b < len(turn_lengths) - 1:
            is_comp += [True] * n_comp
            block += [b] * n_comp
            slot += list(range(n_comp))
            pos += n_comp
    return Layout(torch.tensor(is_comp), torch.tensor(block), torch.tensor(slot), text_index)
