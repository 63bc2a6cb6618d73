"""Where the <COMP> groups sit in a flattened episode, and who may attend to whom.

An episode of turns t1..tk is laid out as t1 C1 t2 C2 ... tk, each Ci a group of n <COMP>
slots. Positions follow what inference holds, a compact cache: turn i starts right after the
memory it reads, its <COMP> slots follow the turn, and then the turn's text is dropped and
the slots move down to close the gap (their "memory view" position). A token of block i (ti
and Ci) sees the earlier tokens of its own block and, of earlier blocks, only the memory:
- CCM-concat: every earlier group, in its memory view;
- CCM-merge: M(i-1), the running mean of the groups' memory views (n slots in all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("concat", "merge")


@dataclass(frozen=True)
class Layout:
    is_comp: torch.Tensor  # (L,) bool: a <COMP> slot
    block: torch.Tensor  # (L,) long: which turn's block a position belongs to
    positions: torch.Tensor  # (L,) long: the position each token is read at
    text_index: list[list[int]]  # per turn, the flat indices of its tokens
    view_delta: torch.Tensor  # (groups,) long: how far a group's slots move into memory
    n_comp: int
    merge: bool

    @property
    def length(self) -> int:
        return int(self.is_comp.numel())

    @property
    def n_groups(self) -> int:
        return len(self.text_index) - 1

    def comp_index(self) -> torch.Tensor:
        """(groups, n): the flat indices of each group's slots."""
        return self.is_comp.nonzero().flatten().view(self.n_groups, self.n_comp)

    def allowed(self) -> torch.Tensor:
        """(L, L) bool: query i may attend to key j (own block, causal)."""
        i = torch.arange(self.length)
        return (i[None, :] <= i[:, None]) & (self.block[None, :] == self.block[:, None])

    def memory_allowed(self) -> torch.Tensor:
        """(L, groups * n) bool: query i may attend to memory entry j (group j // n's view,
        or for merge the mean of groups 0..j // n)."""
        group = torch.arange(self.n_groups).repeat_interleave(self.n_comp)
        if self.merge:
            return self.block[:, None] == group[None, :] + 1
        return self.block[:, None] > group[None, :]

    def additive_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(L, L + groups * n): 0 where allowed, the dtype's minimum elsewhere."""
        allowed = torch.cat([self.allowed(), self.memory_allowed()], 1)
        mask = torch.zeros(allowed.shape, dtype=dtype)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def episode_layout(turn_lengths: list[int], n_comp: int, method: str = "concat") -> Layout:
    """The layout for turns of these lengths: a <COMP> group after every turn but the last."""
    if method not in METHODS:
        raise ValueError(f"unknown CCM method {method!r}; one of {', '.join(METHODS)}")
    merge = method == "merge"
    is_comp, block, positions, text_index, view_delta = [], [], [], [], []
    flat = 0
    for b, length in enumerate(turn_lengths):
        memory = (n_comp if b else 0) if merge else b * n_comp  # slots held before turn b
        text_index.append(list(range(flat, flat + length)))
        count = length + (n_comp if b < len(turn_lengths) - 1 else 0)
        is_comp += [False] * length + [True] * (count - length)
        block += [b] * count
        positions += range(memory, memory + count)
        flat += count
        if count > length:  # slot s moves to memory + s (concat) or s (merge)
            view_delta.append(-(length + memory) if merge else -length)
    return Layout(torch.tensor(is_comp), torch.tensor(block), torch.tensor(positions),
                  text_index, torch.tensor(view_delta, dtype=torch.long), n_comp, merge)
