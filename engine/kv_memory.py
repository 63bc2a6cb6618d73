"""The handle memory policies act on: one conversation's KV cells, edited in the back end's
context with their meaning (`KVSequence`) kept in step.

`KVMemory` syncs the cells to the chat text a conversation renders (the common prefix kept,
only the new tail decoded), and offers the policies (engine.memory) their edits: `evict`,
and for CCM `compress`. Between turns its cells may be parked as bytes while another
conversation holds the engine's one context.
"""

from __future__ import annotations

import copy
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ccm_chat.engine.errors import CancelledError, ContextFullError, EngineError
from ccm_chat.engine.kv_sequence import KVSequence
from ccm_chat.engine.rendering import Rendered, common_prefix, tokenize

if TYPE_CHECKING:
    from ccm_chat.engine.backend import Context
    from ccm_chat.engine.engine import Engine
    from ccm_chat.engine.memory import MemoryPolicy

# The longest message a compression level takes in, in context windows (a 2 MB paste is
# about 90 at 4,096 tokens, and minutes of decoding on a CPU for the last window of it)
MESSAGE_WINDOWS = 16
CANCEL_BATCH = 128  # tokens a batch takes in while a cancel may come: Esc acts within one

Progress = Callable[[int, int], None]


class KVMemory:
    """One conversation's KV memory: the cells (in the context `activate()` gives it, or
    parked as bytes), what they stand for (`kv`), and the policy that edits them.

    Cells are indexed 0..held-1 and their positions stay contiguous: after `evict` the cells
    behind the gap move down so the next token goes at position `held`. A compressing policy
    (CCM) uses one more edit, `compress`: the memory then is `slots` <COMP> cells at the
    front, followed by text: the finished exchanges still held verbatim (`exchanges`), then
    the exchange in progress.
    """

    def __init__(self, engine: Engine, activate: Callable[[], Context],
                 policy: MemoryPolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.kv = KVSequence()  # what the cells in the back end's context stand for
        self.parked: bytes | memoryview | None = b""  # the cells, while another chat runs
        self._activate = activate

    def ctx(self) -> Context:
        """The engine's context, holding these cells (parking whoever held it)."""
        return self._activate()

    def park(self) -> None:
        """Move the cells out of the shared context into bytes."""
        ctx = self.engine.ctx
        self.parked = ctx.get_state() if self.kv.cached else b""
        ctx.clear()

    def unpark(self) -> None:
        ctx = self.engine.ctx
        ctx.clear()
        if self.parked:
            ctx.set_state(self.parked)
        self.parked = None

    def reset(self) -> None:
        """Forget every cell (a rebuild starts from nothing)."""
        self.ctx().clear()
        self.kv = KVSequence()

    def end_exchange(self) -> None:
        """An exchange is finished: mark where its text ends, then let the policy work."""
        self.kv.end_exchange()
        self.policy.after_turn(self)

    # -- the edits policies make -----------------------------------------------------------------

    @property
    def held(self) -> int:
        """Tokens (KV cells) the memory holds now."""
        return self.kv.held

    def evict(self, start: int, end: int) -> None:
        """Drop cells [start, end) and close the gap."""
        if not 0 <= start < end <= self.held:
            raise ValueError(f"Cannot evict cells [{start}, {end}) of {self.held}.")
        ctx = self.ctx()
        if start >= self.kv.cached:  # text not decoded yet: nothing in the cache to edit
            self.kv.undecoded -= end - start
            self.kv.forget(start, end)
            return
        if end > self.kv.cached:
            self.catch_up(ctx)
        ctx.close_gaps(start, end, 0)
        self.kv.forget(start, end)
        if ctx.needs_compaction and self.kv.cached:
            ctx.compact(self.kv.tokens[self.kv.cached - 1])

    @property
    def slots(self) -> int:
        """<COMP> cells held (at the front)."""
        return self.kv.slots

    @property
    def exchanges(self) -> list[int]:
        """Cells of each finished exchange held as text, oldest first."""
        return self.kv.exchanges

    def compress(self, cells: int | None = None, merge: bool = False,
                 max_slots: int | None = None) -> None:
        """Run the compressor's <COMP> slots over the first `cells` text cells after the slots
        (None: all of them), with its adapter on, then keep only the slots in their place
        (merge: their running mean); the oldest whole groups of slots past `max_slots` go in
        the same step (one position shift for both). The slots see the slots before them and
        that text only, never the text after it, as the compressor was trained."""
        ccm = self.engine.ccm
        if ccm is None:
            raise EngineError("No trained compressor is loaded for this model.")
        ctx = self.ctx()
        n = len(ccm.vectors)
        text = self.held - self.kv.slots if cells is None else min(cells, self.held - self.kv.slots)
        if text <= 0:
            return
        if merge and text != self.held - self.kv.slots:
            raise EngineError("CCM-merge compresses all the text after its slots at once.")
        capacity = ctx.n_ctx - 1
        while self.held + n > capacity and self.kv.slots > n:  # the oldest groups go first
            self.evict(0, n)
        if self.held + n > capacity:  # then the span's oldest text, keeping its last token
            cut = self.held + n - capacity
            if cut > text - 1:
                raise ContextFullError("This exchange is too long to compress in this context.")
            self.evict(self.kv.slots, self.kv.slots + cut)
            text -= cut
        start = self.kv.slots
        end = start + text
        if not merge:
            over = 0 if max_slots is None else start + n - max_slots
            drop = min(start, -(-over // n) * n) if over > 0 else 0
            self._compress_span(ctx, start, end, drop)
            return
        self.catch_up(ctx)
        ctx.decode_embeddings(ccm.vectors, end, ccm.adapter)
        self.kv.add_slots(end, n)
        ctx.remove(start, end)  # the text goes; the new slots move onto the held ones' places
        ctx.shift(end, -1, -end)
        self.kv.forget(start, end)
        if start:
            ctx.merge_slots(n, 1.0 / self.kv.groups)
            self.kv.forget(n, 2 * n)
            self.kv.ends[:n] = [len(self.kv.rendered)] * n  # the mean stands for all of it
        self.kv.slots = n

    def _compress_span(self, ctx, start: int, end: int, drop: int) -> None:
        """Replace text cells [start, end) by their <COMP> slots, as pure CCM would make them.

        The slots see the slots before them and that text only: the text after it leaves the
        cache, and once the slots sit in the text's place it is decoded again behind them:
        on a GPU with the next message (`KVSequence.undecoded`: one batch instead of two,
        none in the turn's after-work), elsewhere at once (`Context.batches_cheaply`). That
        keeps the text held verbatim as the compressor was trained to read it: decoded after
        the memory as it is now. Left as decoded beside the text since compressed, it cost
        0.6-1.2 nats of next-reply NLL (default model, CPU). `drop`: the oldest slot cells
        that go in the same step."""
        ccm = self.engine.ccm
        n = len(ccm.vectors)  # type: ignore[union-attr]
        cached = self.kv.cached
        if cached < end:  # the span is text an earlier step moved: decode it now
            ctx.decode(self.kv.tokens[cached:end], cached)
        elif cached > end:
            ctx.remove(end)
            if ctx.needs_compaction:
                ctx.compact(-1)  # no holes where the slots go
        self.kv.undecoded = self.held - end  # the cache ends with the span now
        ctx.slots_over_text(ccm.vectors, start, end, ccm.adapter,  # type: ignore[union-attr]
                            drop)
        self.kv.add_slots(end, n)
        self.kv.forget(start, end)
        self.kv.slots_joined(n)
        if drop:
            self.kv.forget(0, drop)
        self.kv.undecoded = self.held - start - n + drop
        if not ctx.batches_cheaply:
            self.catch_up(ctx)

    def catch_up(self, ctx, then: Sequence[int] = ()) -> int:
        """Decode the cells held but not cached yet, and `then` after them, in one batch;
        return how many cells were decoded."""
        cached = self.kv.cached
        backlog = self.kv.tokens[cached:]
        if backlog or then:
            try:
                ctx.decode([*backlog, *then], cached)
            except BaseException:  # some batches may have landed: none of them count
                ctx.remove(cached)
                raise
            self.kv.undecoded = 0
        return len(backlog) + len(then)

    def redecode_last(self, ctx) -> None:
        """Logits are only current after a decode: recompute them for the last cell."""
        if not self.kv.tokens:
            raise EngineError("Nothing to generate from: the conversation is empty.")
        if not self.catch_up(ctx):
            ctx.redecode(self.kv.tokens[-1], self.held - 1)

    # -- syncing the cells to the rendered text --------------------------------------------------

    def sync(self, target: Rendered, rebuild: Callable[[], None],
             progress: Progress | None = None,
             cancel: threading.Event | None = None) -> tuple[int, float]:
        """Make the KV cache hold exactly `target`; return (tokens decoded, seconds).

        The common prefix is kept, anything after it is removed, and only the new tail is
        decoded; a rollback into text already evicted cannot be made in place, so then
        `rebuild()` recomputes the memory from the messages first. `progress(done, total)`
        hears of each batch of tokens decoded. `cancel` is checked between batches: once
        set, the cache and its bookkeeping go back to what they were before the new text,
        and CancelledError is raised.
        """
        ctx = self.ctx()
        common = common_prefix(self.kv.rendered, target.text)
        if common < self.kv.frozen:
            rebuild()
            ctx = self.ctx()
            common = common_prefix(self.kv.rendered, target.text)
        if common < len(self.kv.rendered):
            keep = bisect_right(self.kv.ends, common)
            if keep < self.kv.cached:
                ctx.remove(keep)
            self.kv.truncate(keep)
        if len(target.text) == len(self.kv.rendered):  # nothing new
            start = time.perf_counter()
            return self.catch_up(ctx), time.perf_counter() - start
        tokens, ends = tokenize(self.engine.model, target, len(self.kv.rendered),
                                first=not self.kv.tokens)
        capacity = ctx.n_ctx - 1
        self._check_fits(len(tokens), ctx.n_ctx)
        undo = self._undo_point(ctx, len(tokens), capacity) if cancel is not None else None
        backlog = self.kv.undecoded  # decoded with the first batch
        start = time.perf_counter()
        done = 0
        while done < len(tokens):
            if undo is not None and cancel.is_set():  # type: ignore[union-attr]
                self._roll_back(ctx, undo)
                raise CancelledError("Stopped before the whole message was read: it was not "
                                     "sent, and the chat's memory is as it was before it.")
            room = capacity - self.held
            if room < len(tokens) - done:
                self.catch_up(ctx)  # the policy edits the cache as it stands
                chunk = min(len(tokens) - done, max(1, ctx.n_ctx // 2))
                if not self.policy.make_room(self, chunk, capacity):
                    raise ContextFullError(
                        "A single message is longer than this memory policy can take in."
                    )
                room = capacity - self.held
            n = min(room, len(tokens) - done, ctx.n_batch if undo is None else CANCEL_BATCH)
            self.catch_up(ctx, tokens[done : done + n])
            for tok, tok_end in zip(tokens[done : done + n], ends[done : done + n], strict=True):
                self.kv.record(tok, tok_end)
            done += n
            if progress is not None:
                progress(done, len(tokens))
        self.kv.rendered = target.text
        return len(tokens) + backlog, time.perf_counter() - start

    def _check_fits(self, n: int, n_ctx: int) -> None:
        """Refuse, before decoding any of them, `n` new tokens that can never fit: beyond the
        context window with compression off; with a level, more than MESSAGE_WINDOWS
        windows (a level slides over a message longer than the window, keeping its end, so
        of a longer one it would keep only a sliver, after minutes of decoding)."""
        capacity = n_ctx - 1
        if self.policy.budget is None:
            if self.held + n > capacity:
                raise ContextFullError(
                    f"This conversation needs {self.held + n} tokens, more than the context "
                    f"window of {n_ctx}. Start a new chat, raise the context size, or pick a "
                    "compression level in settings."
                )
        elif n > MESSAGE_WINDOWS * n_ctx:
            raise ContextFullError(
                f"This message is {n:,} tokens long, more than a compression level takes in "
                f"at once ({MESSAGE_WINDOWS * n_ctx:,} tokens: {MESSAGE_WINDOWS} times the "
                f"context window of {n_ctx:,}, of which it keeps only the end). Shorten "
                "it, or send it in parts."
            )

    def _undo_point(self, ctx, n: int, capacity: int) -> tuple[KVSequence, bytes | None]:
        """What a cancelled sync puts back: the bookkeeping, and the cache's bytes too when
        the policy will have to make room for the `n` new tokens (an eviction or a
        compression cannot be undone in place)."""
        saved = copy.deepcopy(self.kv)
        state = ctx.get_state() if self.held + n > capacity and self.kv.cached else None
        return saved, state

    def _roll_back(self, ctx, undo: tuple[KVSequence, bytes | None]) -> None:
        saved, state = undo
        if state is not None:
            ctx.set_state(state)
        else:  # only cells after the saved ones were added
            ctx.remove(saved.cached)
        self.kv = saved

    def prefill_kept(self, rendered: Rendered) -> None:
        """Decode only the tokens the policy keeps of `rendered`, at contiguous positions."""
        ctx = self.ctx()
        tokens, ends = tokenize(self.engine.model, rendered, 0, first=True)
        sink, recent = self.policy.kept_after_rebuild  # type: ignore[misc]
        keep = list(range(len(tokens)))
        if len(tokens) > sink + recent:
            keep = keep[:sink] + keep[len(tokens) - recent:]
            self.kv.frozen = ends[len(tokens) - recent - 1]
        kept = [tokens[i] for i in keep]
        if len(kept) >= ctx.n_ctx:
            raise ContextFullError("The memory this policy keeps does not fit the context.")
        ctx.decode(kept, 0)
        self.kv.tokens, self.kv.ends = kept, [ends[i] for i in keep]
        self.kv.evicted = len(tokens) - len(kept)
        self.kv.rendered = rendered.text

