"""An engine-side conversation: one KV sequence kept in step with the transcript.

The KV cache holds the tokens of `_rendered`, the chat-template text of the conversation so
far, less what the memory policy evicted. Each call renders the transcript it needs and syncs
the cache to it: the common prefix is kept, anything after it is removed, and only the new
tail is decoded. That one mechanism covers a new turn, a reply cut by a stop string, a
regenerated reply and scoring a candidate. A rollback into text the policy already evicted
cannot be undone in place, so the memory is rebuilt from the messages instead.
"""

from __future__ import annotations

import codecs
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.config import CompressionConfig, SamplingParams
from ccm_chat.engine.errors import ContextFullError, EngineError, StateError
from ccm_chat.engine.kv_sequence import KVSequence, MemoryView
from ccm_chat.engine.memory import MemoryPolicy
from ccm_chat.engine.reply import Reply, ReplyStats
from ccm_chat.engine.state_blob import StateBlob, origin_mismatch
from ccm_chat.engine.stops import StopStringMatcher

if TYPE_CHECKING:
    from ccm_chat.engine.engine import Engine

ROLES = ("system", "user", "assistant")
GENERATION_HEADROOM = 64  # cells a policy frees at once when a reply fills the context

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MemoryStats:
    """What the conversation's memory holds and what it stands for."""

    method: str
    memory_tokens: int
    memory_bytes: int
    full_context_tokens: int
    full_context_bytes: int
    context_window: int
    verbatim_exchanges: int = 0  # finished exchanges held as text
    compressed_exchanges: int = 0  # exchanges held as <COMP> slots

    @property
    def ratio(self) -> float:
        return self.full_context_tokens / self.memory_tokens if self.memory_tokens else 1.0


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Conversation:
    def __init__(
        self,
        engine: Engine,
        system: str | None,
        compression: CompressionConfig,
    ) -> None:
        self.engine = engine
        self.compression = compression  # also sets self.policy
        self.messages: list[ChatMessage] = []
        if system:
            self.messages.append(ChatMessage("system", system))
        self._last_reply: ReplyStats | None = None
        self._pending: Reply | None = None  # a reply not finished yet
        self.kv = KVSequence()  # what the cells in the back end's context stand for
        self._parked: bytes | memoryview | None = b""

    @property
    def compression(self) -> CompressionConfig:
        return self._compression

    @compression.setter
    def compression(self, config: CompressionConfig) -> None:
        """A new level takes effect from the next turn, within what the engine was loaded for."""
        if config.kv_type != self.engine.kv_type:
            raise ValueError(
                f"This engine's KV cache is {self.engine.kv_type}, not {config.kv_type}: "
                "load an engine for that level."
            )
        policy = config.policy()
        if policy.budget is not None and not self.engine.evicts:
            raise ValueError(
                f"This engine was loaded for a level that keeps every token; load one with "
                f"compression={config.level!r} to run {config.method!r}."
            )
        if config.method.startswith("ccm-"):
            self._check_compressor(config)
        self._compression = config
        self.policy: MemoryPolicy = policy

    def _check_compressor(self, config: CompressionConfig) -> None:
        ccm = self.engine.ccm
        if ccm is None:
            raise ValueError(f"{config.method} needs a trained compressor for this model, and "
                             "none is loaded: train one with `ccm-chat train-compressor`.")
        if config.method == "ccm-merge" and not self.engine.ctx.merges:
            raise ValueError("CCM-merge is not available on the llama.cpp back end: it averages "
                             "cached keys and values, which llama.cpp's cache cannot do. Use "
                             "ccm-concat, or the hf back end (--backend hf).")
        if (config.params.get("compressor") != ccm.files.fingerprint
                or config.params.get("n_comp") != ccm.files.n_comp):
            raise ValueError("This memory was set up for another compressor than the one "
                             "loaded.")

    # -- the public contract ---------------------------------------------------------------------

    def send(
        self,
        text: str,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        **overrides: object,
    ) -> Reply:
        """Add a user turn and stream the assistant's reply, piece by piece.

        Stops at end of generation, a stop string, max_tokens, a full context, when `cancel` is
        set, or when the caller stops reading (then `reply.finish()`, or this conversation's
        next call, ends the turn). Whatever was generated is kept as the reply.
        """
        params = _params(params, overrides)
        self.add_turn("user", text, decode=False)
        return self._reply(params, cancel)

    def generate(
        self,
        params: SamplingParams | None = None,
        cancel: threading.Event | None = None,
        **overrides: object,
    ) -> Reply:
        """Stream a reply to the transcript as it stands (after a user turn, or to regenerate)."""
        self._settle()
        return self._reply(_params(params, overrides), cancel)

    def _reply(self, params: SamplingParams, cancel: threading.Event | None) -> Reply:
        self._pending = Reply(self, params, cancel)
        return self._pending

    def add_turn(self, role: str, text: str, decode: bool = True) -> None:
        """Append a turn without generating (teacher forcing); its tokens go into memory now.

        The memory policy runs at the end of each exchange, after an assistant turn, as it
        does after a generated reply.
        """
        self._settle()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.messages.append(ChatMessage(role, text))
        if decode:
            self._sync(self.engine.model.render_chat(self.messages, add_assistant=False))
            if role == "assistant":
                self._end_turn()

    def truncate(self, n_messages: int) -> None:
        """Forget every message after the first n (the memory follows at the next sync)."""
        self._settle()
        del self.messages[n_messages:]

    def score(self, reply: str) -> float:
        """Mean token negative log-likelihood of `reply` as the next assistant turn."""
        self._settle()
        tokens = self.engine.model.tokenize(reply.encode(), False, False)
        if not tokens:
            raise ValueError("Cannot score an empty reply.")
        self._sync(self.engine.model.render_chat(self.messages, add_assistant=True))
        ctx = self._ctx()
        if not self.policy.make_room(self, len(tokens), ctx.n_ctx - 1):
            raise ContextFullError("The reply does not fit in the context window.")
        self._catch_up(ctx)  # text a compression just moved
        n0 = self.held
        ctx.remove(n0 - 1)
        rows = ctx.decode([self.kv.tokens[-1], *tokens[:-1]], n0 - 1, want=range(len(tokens)))
        rows[len(tokens) - 1] = ctx.logits(-1)
        ctx.remove(n0)
        nll = []
        for j, tok in enumerate(tokens):
            row = rows[j].astype(np.float64)
            top = row.max()
            nll.append(top + np.log(np.exp(row - top).sum()) - row[tok])
        return float(np.mean(nll))

    def memory_view(self) -> MemoryView:
        self._settle()
        return self.kv.view()

    def next_token_logits(self) -> np.ndarray:
        """The model's next-token logits for an assistant reply to the transcript as it is."""
        self._settle()
        decoded, _ = self._sync(self.engine.model.render_chat(self.messages, add_assistant=True))
        ctx = self._ctx()
        if decoded == 0:  # logits are only current after a decode
            self._redecode_last(ctx)
        return ctx.logits(-1)

    def stats(self) -> MemoryStats:
        self._settle()
        held, cached = self.kv.held, self.kv.cached
        size = self._ctx().state_size() if cached else 0
        if cached < held:  # the text after new slots takes what the cells before it do
            size += (held - cached) * size // max(1, cached)
        full = self.kv.text_tokens
        n_comp = len(self.engine.ccm.vectors) if self.engine.ccm is not None else 1
        merged = self.compression.method == "ccm-merge"
        return MemoryStats(
            method=self.compression.method,
            memory_tokens=held,
            memory_bytes=size,
            full_context_tokens=full,
            full_context_bytes=full * self.engine.model.f16_bytes_per_token,
            context_window=self.engine.n_ctx,
            verbatim_exchanges=len(self.exchanges),
            compressed_exchanges=self.kv.groups if merged else self.kv.slots // n_comp,
        )

    def rebuild(self, progress: Progress | None = None) -> None:
        """Recompute the memory from the messages.

        A policy that keeps whole tokens (full, window) says which tokens it would hold, and
        only those are decoded, in one batch; one that transforms them (CCM) is replayed turn
        by turn, as if chatted live.
        """
        self._settle()
        ctx = self._ctx()
        ctx.clear()
        self.kv = KVSequence()
        render = self.engine.model.render_chat
        total = len(self.messages)
        if self.policy.budget is None:  # nothing is evicted: one batched prefill is the same
            self._sync(render(self.messages, add_assistant=False), progress)
        elif self.policy.kept_after_rebuild is not None:
            self._prefill_kept(render(self.messages, add_assistant=False))
        else:
            for i in range(1, total + 1):
                self._sync(render(self.messages[:i], add_assistant=False))
                if self.messages[i - 1].role == "assistant":
                    self._end_turn()
                if progress is not None:
                    progress(i, total)
        if progress is not None:
            progress(total, total)

    def _prefill_kept(self, rendered: bytes) -> None:
        """Decode only the tokens the policy keeps of `rendered`, at contiguous positions."""
        model, ctx = self.engine.model, self._ctx()
        tokens = model.tokenize(rendered, add_special=True, parse_special=True)
        ends = self._token_ends(tokens, 0, len(rendered), first=True)
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
        self.kv.rendered = rendered

    def _token_ends(self, tokens: list[int], base: int, length: int, first: bool) -> list[int]:
        """Where each token ends in the rendered bytes (the BOS token adds none)."""
        model = self.engine.model
        ends, end = [], base
        for i, tok in enumerate(tokens):
            if not (first and i == 0 and model.add_bos and tok == model.bos):
                end = min(end + len(model.piece(tok, special=True)), base + length)
            ends.append(end)
        if ends:
            ends[-1] = base + length
        return ends

    def save_state(self) -> bytes:
        """The memory as bytes: restoring them continues exactly here, with no re-prefill."""
        self._settle()
        ctx = self._ctx()
        payload = ctx.get_state() if self.kv.cached else b""
        header = {
            "backend": self.engine.info.backend,
            "model": self.engine.fingerprint,
            "compression": {"level": self.compression.level, **self.compression.key()},
            "flash_attn": self.engine.flash_attn,
            "messages": [[m.role, m.content] for m in self.messages],
            **self.kv.header(),
        }
        return StateBlob(header, payload).to_bytes()

    @classmethod
    def from_state(cls, engine: Engine, data: bytes) -> Conversation:
        blob = StateBlob.from_bytes(data)
        head = blob.header
        foreign = origin_mismatch(head.get("model"), head.get("backend"), engine.fingerprint,
                                  engine.info.backend)
        if foreign:
            raise StateError(f"The memory state was {foreign}.")
        kv_type = (head.get("compression") or {}).get("kv_type")
        if kv_type != engine.kv_type:
            raise StateError(
                f"The memory state holds a {kv_type} KV cache; this engine's is {engine.kv_type}."
            )
        saved_flash = head.get("flash_attn")
        if None not in (saved_flash, engine.flash_attn) and saved_flash != engine.flash_attn:
            raise StateError(
                "The memory state's V cache is laid out for flash attention "
                f"{'on' if saved_flash else 'off'}, this engine's for "
                f"{'on' if engine.flash_attn else 'off'} (saved on another device or setting)."
            )
        try:
            comp = CompressionConfig(**head["compression"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"The memory state header is malformed ({exc}).") from exc
        try:
            conv = cls(engine, None, comp)
        except ValueError as exc:  # e.g. made with a compressor this engine does not have
            raise StateError(str(exc)) from exc
        try:
            conv.messages = [ChatMessage(r, c) for r, c in head["messages"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"The memory state header is malformed ({exc}).") from exc
        conv.kv = KVSequence.from_header(head, engine.n_ctx)
        conv._parked = blob.payload
        try:
            conv._ctx()  # load it now, so a bad payload fails here and not mid-reply
        except StateError:
            raise
        except EngineError as exc:
            raise StateError(f"The memory state's KV payload was refused ({exc})") from exc
        if conv.engine.ctx.pos_max() != conv.kv.cached - 1:
            engine.release(conv)
            raise StateError("The memory state's KV payload does not match its header.")
        return conv

    # -- the KVMemory handle policies edit -------------------------------------------------------

    @property
    def held(self) -> int:
        """Tokens (KV cells) the memory holds now."""
        return self.kv.held

    def evict(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.held:
            raise ValueError(f"Cannot evict cells [{start}, {end}) of {self.held}.")
        ctx = self._ctx()
        if start >= self.kv.cached:  # text not decoded yet: nothing in the cache to edit
            self.kv.undecoded -= end - start
            self.kv.forget(start, end)
            return
        if end > self.kv.cached:
            self._catch_up(ctx)
        ctx.close_gaps(start, end, 0)
        self.kv.forget(start, end)
        if ctx.needs_compaction and self.kv.cached:
            ctx.compact(self.kv.tokens[self.kv.cached - 1])

    @property
    def slots(self) -> int:
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
        ctx = self._ctx()
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
        self._catch_up(ctx)
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
            self._catch_up(ctx)

    def _catch_up(self, ctx, then: Sequence[int] = ()) -> int:
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

    # -- internals -------------------------------------------------------------------------------

    def _ctx(self):
        return self.engine.activate(self)

    def park(self) -> None:
        """Move this conversation's KV out of the shared context into bytes."""
        ctx = self.engine.ctx
        self._parked = ctx.get_state() if self.kv.cached else b""
        ctx.clear()

    def unpark(self) -> None:
        ctx = self.engine.ctx
        ctx.clear()
        if self._parked:
            ctx.set_state(self._parked)
        self._parked = None

    def _sync(self, target: bytes, progress: Progress | None = None) -> tuple[int, float]:
        """Make the KV cache hold exactly `target`; return (tokens decoded, seconds).

        `progress(done, total)` hears of each batch of tokens decoded.
        """
        ctx = self._ctx()
        common = _common_prefix(self.kv.rendered, target)
        if common < self.kv.frozen:
            self.rebuild()
            ctx = self._ctx()
            common = _common_prefix(self.kv.rendered, target)
        if common < len(self.kv.rendered):
            keep = bisect_right(self.kv.ends, common)
            if keep < self.kv.cached:
                ctx.remove(keep)
            self.kv.truncate(keep)
        delta = target[len(self.kv.rendered) :]
        if not delta:
            start = time.perf_counter()
            return self._catch_up(ctx), time.perf_counter() - start
        model = self.engine.model
        first = not self.kv.tokens
        tokens = model.tokenize(delta, add_special=first, parse_special=True)
        capacity = ctx.n_ctx - 1
        if self.policy.budget is None and self.held + len(tokens) > capacity:
            raise ContextFullError(
                f"This conversation needs {self.held + len(tokens)} tokens, more than "
                f"the context window of {ctx.n_ctx}. Start a new chat, raise the context size, "
                "or pick a compression level in settings."
            )
        ends = self._token_ends(tokens, len(self.kv.rendered), len(delta), first)
        backlog = self.kv.undecoded  # decoded with the first batch
        start = time.perf_counter()
        done = 0
        while done < len(tokens):
            room = capacity - self.held
            if room < len(tokens) - done:
                self._catch_up(ctx)  # the policy edits the cache as it stands
                chunk = min(len(tokens) - done, max(1, ctx.n_ctx // 2))
                if not self.policy.make_room(self, chunk, capacity):
                    raise ContextFullError(
                        "A single message is longer than this memory policy can take in."
                    )
                room = capacity - self.held
            n = min(room, len(tokens) - done, ctx.n_batch)
            self._catch_up(ctx, tokens[done : done + n])
            for tok, tok_end in zip(tokens[done : done + n], ends[done : done + n], strict=True):
                self.kv.record(tok, tok_end)
            done += n
            if progress is not None:
                progress(done, len(tokens))
        self.kv.rendered = target
        return len(tokens) + backlog, time.perf_counter() - start

    def _end_turn(self) -> None:
        """An exchange is finished: mark where its text ends, then let the policy work."""
        self.kv.end_exchange()
        self.policy.after_turn(self)


    def _redecode_last(self, ctx) -> None:
        """Logits are only current after a decode: recompute them for the last cell."""
        if not self.kv.tokens:
            raise EngineError("Nothing to generate from: the conversation is empty.")
        if not self._catch_up(ctx):
            ctx.redecode(self.kv.tokens[-1], self.held - 1)

    def _stream(self, reply: Reply) -> Iterator[str]:
        """Generate the reply's tokens; the turn is finished apart, by `_finish`."""
        params, cancel = reply.params, reply.cancel_event
        model = self.engine.model
        prompt = model.render_chat(self.messages, add_assistant=True)
        reply.prompt_tokens, reply.prefill_seconds = self._sync(prompt)
        ctx = self._ctx()
        if reply.prompt_tokens == 0:
            self._redecode_last(ctx)
        sampler = ctx.sampler(params)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringMatcher(params.stop)
        started = time.perf_counter()
        try:
            while True:
                if cancel.is_set():
                    reply.finish_reason = "cancelled"
                    break
                if reply.tokens >= params.max_tokens:
                    reply.finish_reason = "length"
                    break
                if self.held + 1 > ctx.n_ctx - 1 and not (
                    self.policy.make_room(
                        self, min(GENERATION_HEADROOM, ctx.n_ctx // 4), ctx.n_ctx - 1)
                    or self.policy.make_room(self, 1, ctx.n_ctx - 1)
                ):
                    reply.finish_reason = "context_full"
                    break
                if self.kv.undecoded:  # text a compression to make room moved: its logits
                    self._catch_up(ctx)
                token = sampler.sample(ctx)
                if model.is_end_of_generation(token):
                    reply.finish_reason = "stop"
                    break
                piece = model.piece(token, special=True)
                ctx.decode([token], self.held)
                self.kv.rendered += piece
                self.kv.record(token, len(self.kv.rendered))
                reply.tokens += 1
                text = stops.feed(utf8.decode(piece))
                if text:
                    yield text
                if stops.stopped:
                    reply.finish_reason = "stop"
                    break
        except Exception:
            reply.failed = True
            raise
        finally:
            reply.decode_seconds = time.perf_counter() - started  # not the policy's work
            sampler.close()
            if not stops.stopped:
                reply.tail = stops.feed(utf8.decode(b"", final=True)) + stops.flush()
        if reply.tail:
            tail, reply.tail = reply.tail, ""
            yield tail

    def _finish(self, reply: Reply) -> None:
        """The reply joins the transcript and the policy does its work on the exchange."""
        text = "".join(reply.pieces) + reply.tail
        self.messages.append(ChatMessage("assistant", text))
        if self._pending is reply:
            self._pending = None
        if self.policy.reads_finished_exchange:
            if not reply.failed:  # after a failed decode the cache is left for a rebuild
                # the reply's end-of-turn marker, which generation stops before, goes in
                # too: a compressor was trained on exchanges as the template renders them
                with suppress(ContextFullError):
                    self._sync(self.engine.model.render_chat(self.messages, add_assistant=False))
                self._end_turn()
        else:
            self._end_turn()
        reply.stats = ReplyStats(text=text, tokens=reply.tokens,
                                 prompt_tokens=reply.prompt_tokens,
                                 prefill_seconds=reply.prefill_seconds,
                                 decode_seconds=reply.decode_seconds,
                                 finish_reason=reply.finish_reason)
        self._last_reply = reply.stats

    def _settle(self) -> None:
        """A reply its caller stopped reading is finished before anything else happens."""
        if self._pending is not None and not self._pending.running:
            self._pending.finish()

    @property
    def last_reply(self) -> ReplyStats | None:
        """How the last reply went (finishing it, if its caller stopped reading early)."""
        self._settle()
        return self._last_reply


def _params(params: SamplingParams | None, overrides: dict[str, object]) -> SamplingParams:
    base = params or SamplingParams()
    if not overrides:
        return base
    values = {**base.__dict__, **overrides}
    if isinstance(values.get("stop"), list | str):
        stop = values["stop"]
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(**values)  # type: ignore[arg-type]
