"""Where the <COMP> groups sit in a flattened episode, and who may attend to whom.

An episode of exchanges t1..tk is laid out as blocks. A *compression block* is ti Ci, Ci a
group of n <COMP> slots: positions follow what inference holds, a compact cache: exchange i
starts right after the memory it reads, its slots follow its text, and then the text is
dropped and the slots move down to close the gap (their "memory view" position). A token
of a block sees the earlier tokens of its own block and, of earlier groups, only the memory:
- CCM-concat: the groups of the exchanges before it, in their memory view;
- CCM-merge: M(i-1), the running mean of those groups' memory views (n slots in all).

A *read block* is how a reply reads the hybrid memory of the app: the slots of the first g
groups, then raw text (the last exchanges verbatim and the exchange itself) at the positions
right after those slots, causal within the block. It has no slots of its own, so it changes
no group; one forward can hold many read blocks beside the compression blocks, each at the
positions inference gives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

METHODS = ("concat", "merge")


@dataclass(frozen=True)
class Block:
    """`length` text tokens reading the first `groups` groups of memory; `comp`: slots follow."""

    length: int
    groups: int
    comp: bool


@dataclass(frozen=True)
class Layout:
    is_comp: torch.Tensor  # (L,) bool: a <COMP> slot
    block: torch.Tensor  # (L,) long: which block a position belongs to
    positions: torch.Tensor  # (L,) long: the position each token is read at
    text_index: list[list[int]]  # per block, the flat indices of its text tokens
    view_delta: torch.Tensor  # (groups,) long: how far a group's slots move into memory
    n_comp: int
    merge: bool
    reads: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # (blocks,) long: how many groups of memory each block reads

    @property
    def length(self) -> int:
        return int(self.is_comp.numel())

    @property
    def n_groups(self) -> int:
        return int(self.is_comp.sum()) // self.n_comp if self.n_comp else 0

    def comp_index(self) -> torch.Tensor:
        """(groups, n): the flat indices of each group's slots."""
        return self.is_comp.nonzero().flatten().view(self.n_groups, self.n_comp)

    def allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(L, L) bool: query i may attend to key j (own block, causal)."""
        i = torch.arange(self.length, device=device)
        block = self.block.to(device)
        return (i[None, :] <= i[:, None]) & (block[None, :] == block[:, None])

    def memory_allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(L, groups * n) bool: query i may attend to memory entry j (group j // n's view,
        or for merge the mean of groups 0..j // n)."""
        group = torch.arange(self.n_groups, device=device).repeat_interleave(self.n_comp)
        reads = self.reads.to(device)[self.block.to(device)]
        if self.merge:
            return reads[:, None] == group[None, :] + 1
        return reads[:, None] > group[None, :]

    def additive_mask(self, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", pad_to: int = 1) -> torch.Tensor:
        """(L, L + groups * n [+ padding]): 0 where allowed, the dtype's minimum elsewhere.
        Padded key columns (to a multiple of `pad_to`) are never allowed."""
        allowed = torch.cat([self.allowed(device), self.memory_allowed(device)], 1)
        extra = -allowed.shape[1] % pad_to
        if extra:
            allowed = torch.nn.functional.pad(allowed, (0, extra), value=False)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def block_layout(blocks: list[Block], n_comp: int, method: str = "concat") -> Layout:
    """The layout of these blocks, in order. A block reading g groups must come after the
    g-th group's block; compression blocks number the groups in their order."""
    if method not in METHODS:
        raise ValueError(f"unknown CCM method {method!r}; one of {', '.join(METHODS)}")
    merge = method == "merge"
    is_comp, block, positions, text_index, view_delta = [], [], [], [], []
    flat = groups = 0
    for b, spec in enumerate(blocks):
        if spec.groups > groups:
            raise ValueError(f"block {b} reads {spec.groups} groups; only {groups} came before")
        if spec.comp and spec.groups != groups:
            raise ValueError(f"compression block {b} must read all {groups} groups before it")
        memory = (n_comp if spec.groups else 0) if merge else spec.groups * n_comp
        text_index.append(list(range(flat, flat + spec.length)))
        count = spec.length + (n_comp if spec.comp else 0)
        is_comp += [False] * spec.length + [True] * (count - spec.length)
        block += [b] * count
        positions += range(memory, memory + count)
        flat += count
        if spec.comp:  # slot s moves to memory + s (concat) or s (merge)
            view_delta.append(-(spec.length + memory) if merge else -spec.length)
            groups += 1
    return Layout(torch.tensor(is_comp, dtype=torch.bool), torch.tensor(block, dtype=torch.long),
                  torch.tensor(positions, dtype=torch.long), text_index,
                  torch.tensor(view_delta, dtype=torch.long), n_comp, merge,
                  torch.tensor([s.groups for s in blocks], dtype=torch.long))


def episode_layout(turn_lengths: list[int], n_comp: int, method: str = "concat") -> Layout:
    """The layout for turns of these lengths: a <COMP> group after every turn but the last."""
    last = len(turn_lengths) - 1
    return block_layout([Block(n, b, b < last) for b, n in enumerate(turn_lengths)],
                        n_comp, method)
