"""The bookkeeping of one conversation's KV memory: which cells it holds and what they mean.

A cell holds a token of the rendered chat text (`tokens[i] >= 0`) or a <COMP> slot (-1);
`ends[i]` is where the text it stands for ends in `rendered`. Slots sit at the front; after
them come the finished exchanges still held as text (`bounds`: the cell where each ends),
then the exchange in progress. Back ends hold the tensors; this holds their meaning, so the
edits policies make (evict, compress) and a rollback keep the two in step, and a saved state
carries it in its header. The last `undecoded` cells are held here but not yet in the back
end's cache: text a compression moved behind new slots, decoded there with the next message.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from ccm_chat.engine.errors import StateError


@dataclass(frozen=True)
class MemoryView:
    """A read-only copy of what the memory holds, for tests, benchmarks and evaluations."""

    rendered: bytes
    tokens: tuple[int, ...]
    ends: tuple[int, ...]
    slots: int
    exchanges: tuple[int, ...]  # cells of each finished exchange held as text, oldest first
    evicted: int  # tokens dropped from the memory so far
    frozen: int  # bytes of `rendered` before this cannot be rolled back in place


@dataclass
class KVSequence:
    rendered: bytes = b""  # the chat-template text the cells were decoded from
    tokens: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    slots: int = 0  # <COMP> cells at the front
    groups: int = 0  # exchanges compressed so far (CCM-merge's mean weight)
    bounds: list[int] = field(default_factory=list)
    frozen: int = 0  # bytes of `rendered` before this are (partly) evicted: no rollback
    evicted: int = 0  # tokens dropped so far
    undecoded: int = 0  # the last cells, not decoded into the cache yet

    @property
    def held(self) -> int:
        return len(self.tokens)

    @property
    def cached(self) -> int:
        """Cells the back end's cache holds (the first ones)."""
        return len(self.tokens) - self.undecoded

    @property
    def exchanges(self) -> list[int]:
        starts = [self.slots, *self.bounds][: len(self.bounds)]
        return [end - start for start, end in zip(starts, self.bounds, strict=True)]

    @property
    def text_tokens(self) -> int:
        """Tokens of the transcript the memory stands for (held as text, or evicted)."""
        return self.held - self.slots + self.evicted

    def view(self) -> MemoryView:
        return MemoryView(self.rendered, tuple(self.tokens), tuple(self.ends), self.slots,
                          tuple(self.exchanges), self.evicted, self.frozen)

    def record(self, token: int, end: int) -> None:
        self.tokens.append(token)
        self.ends.append(end)

    def truncate(self, keep: int) -> None:
        """Cells from `keep` on are gone (a rollback); the text follows them."""
        self.undecoded = max(0, keep - self.cached)
        del self.tokens[keep:]
        del self.ends[keep:]
        self.bounds = [b for b in self.bounds if b <= keep]
        self.rendered = self.rendered[: self.ends[-1] if keep else 0]

    def forget(self, start: int, end: int) -> None:
        """Cells [start, end) were evicted: what they stood for can no longer be rolled back."""
        self.frozen = max(self.frozen, self.ends[end - 1])
        slots = sum(1 for t in self.tokens[start:end] if t < 0)
        self.slots -= slots
        self.evicted += end - start - slots
        del self.tokens[start:end]
        del self.ends[start:end]
        width = end - start
        self._set_bounds([b if b <= start else max(start, b - width) for b in self.bounds])

    def add_slots(self, at: int, n: int) -> None:
        """n <COMP> cells were inserted at `at`; they stand for the text before them."""
        self.tokens[at:at] = [-1] * n
        self.ends[at:at] = [self.ends[at - 1]] * n
        self.bounds = [b + n if b > at else b for b in self.bounds]
        self.groups += 1

    def slots_joined(self, n: int) -> None:
        """The n cells after the slots are slots too now (a compression closed its gap)."""
        self.slots += n
        self._set_bounds(self.bounds)

    def end_exchange(self) -> None:
        if self.held > (self.bounds[-1] if self.bounds else self.slots):
            self.bounds.append(self.held)

    def _set_bounds(self, bounds: list[int]) -> None:
        kept: list[int] = []
        for b in bounds:
            if self.slots < b <= self.held and (not kept or b > kept[-1]):
                kept.append(b)
        self.bounds = kept

    # -- in a saved state's header -------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {"rendered": base64.b64encode(self.rendered).decode(), "kv_tokens": self.tokens,
                "kv_ends": self.ends, "frozen": self.frozen, "evicted": self.evicted,
                "groups": self.groups, "bounds": self.bounds, "undecoded": self.undecoded}

    @classmethod
    def from_header(cls, head: dict[str, Any], n_ctx: int) -> KVSequence:
        try:
            tokens = [int(t) for t in head["kv_tokens"]]
            seq = cls(rendered=base64.b64decode(head["rendered"]), tokens=tokens,
                      ends=[int(e) for e in head["kv_ends"]], slots=sum(t < 0 for t in tokens),
                      groups=int(head.get("groups", 0)),
                      bounds=[int(b) for b in head.get("bounds", [])],
                      frozen=int(head["frozen"]), evicted=int(head["evicted"]),
                      undecoded=int(head.get("undecoded", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"The memory state header is malformed ({exc}).") from exc
        if (len(seq.tokens) != len(seq.ends) or seq.held > n_ctx
                or not 0 <= seq.undecoded <= seq.held - seq.slots):
            raise StateError("The memory state does not fit this engine's context.")
        if seq.bounds != sorted(seq.bounds) or any(
                not seq.slots < b <= seq.held for b in seq.bounds):
            raise StateError("The memory state's exchange bounds do not fit its cells.")
        return seq
