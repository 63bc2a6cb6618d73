"""An engine-side conversation: the transcript, and one KV memory kept in step with it.

The KV cache holds the tokens of the chat-template text of the conversation so far, less
what the memory policy evicted (engine.kv_memory). Each call renders the transcript it
needs (engine.rendering) and syncs the memory to it: the common prefix is kept, anything
after it is removed, and only the new tail is decoded. That one mechanism covers a new
turn, a reply cut by a stop string, a regenerated reply and scoring a candidate. A rollback
into text the policy already evicted cannot be undone in place, so the memory is rebuilt
from the messages instead. A reply (engine.reply) drives the generation a step at a time
(`read_prompt`, `room_for_token`, `step`, `end_reply`); saving and restoring the memory is
engine.conversation_state's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ccm_chat.engine import conversation_state
from ccm_chat.engine.chat import ChatMessage
from ccm_chat.engine.config import CompressionConfig, SamplingParams
from ccm_chat.engine.errors import CancelledError, ContextFullError
from ccm_chat.engine.kv_memory import KVMemory, Progress
from ccm_chat.engine.kv_sequence import KVSequence, MemoryView
from ccm_chat.engine.memory import MemoryPolicy
from ccm_chat.engine.recall import ExchangeIndex, Recalled, choose, forgotten, recall_message
from ccm_chat.engine.rendering import (  # noqa: F401  (control_texts, spells_text: re-exported)
    Rendered,
    control_texts,
    render,
    spells_text,
)
from ccm_chat.engine.reply import Reply, ReplyStats

if TYPE_CHECKING:
    from ccm_chat.engine.backend import Sampler
    from ccm_chat.engine.engine import Engine

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
GENERATION_HEADROOM = 64  # cells a policy frees at once when a reply fills the context


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


class Conversation:
    def __init__(
        self,
        engine: Engine,
        system: str | None,
        compression: CompressionConfig,
    ) -> None:
        self.engine = engine
        self.memory = KVMemory(engine, self._ctx, engine.policy_for(compression))
        self.compression = compression  # also sets the memory's policy
        self.messages: list[ChatMessage] = []
        if system:
            self.messages.append(ChatMessage("system", system))
        self._last_reply: ReplyStats | None = None
        self._pending: Reply | None = None  # a reply not finished yet
        self.recall = True  # bring back earlier exchanges a message asks about (engine.recall)
        self.last_recall: Recalled | None = None  # what the last prompt brought back
        self._index = ExchangeIndex()
        self._recall_prompt: Rendered | None = None  # the prompt, while its recall is held

    @property
    def compression(self) -> CompressionConfig:
        return self._compression

    @compression.setter
    def compression(self, config: CompressionConfig) -> None:
        """A new level takes effect from the next turn, within what the engine was loaded for."""
        self.memory.policy = self.engine.policy_for(config)
        self._compression = config
        self.recall_tokens = config.recall_tokens  # cells a turn may recall at this level

    @property
    def policy(self) -> MemoryPolicy:
        """The memory policy, which edits `memory` (engine.memory)."""
        return self.memory.policy

    @property
    def kv(self) -> KVSequence:
        """What the memory's cells stand for (read-only use: the memory keeps it)."""
        return self.memory.kv

    @kv.setter
    def kv(self, seq: KVSequence) -> None:
        self.memory.kv = seq

    @property
    def held(self) -> int:
        """Tokens (KV cells) the memory holds now."""
        return self.memory.held

    @property
    def slots(self) -> int:
        """<COMP> cells the memory holds (at the front)."""
        return self.memory.slots

    @property
    def exchanges(self) -> list[int]:
        """Cells of each finished exchange the memory holds as text, oldest first."""
        return self.memory.exchanges

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

    def add_turn(self, role: str, text: str, decode: bool = True,
                 cancel: threading.Event | None = None) -> None:
        """Append a turn without generating (teacher forcing); its tokens go into memory now.

        The memory policy runs at the end of each exchange, after an assistant turn, as it
        does after a generated reply. `cancel`, checked between decode batches, stops a long
        message with CancelledError: the turn is dropped and the memory is as it was.
        """
        self._settle()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.messages.append(ChatMessage(role, text))
        if decode:
            try:
                self._sync(self._render(add_assistant=False), cancel=cancel)
            except CancelledError:
                self.messages.pop()
                raise
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
        self._sync(self._prompt())
        ctx = self._ctx()
        if not self.policy.make_room(self.memory, len(tokens), ctx.n_ctx - 1):
            raise ContextFullError("The reply does not fit in the context window.")
        self.memory.catch_up(ctx)  # text a compression just moved
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
        self._forget_recall(add_assistant=True)
        return float(np.mean(nll))

    def memory_view(self) -> MemoryView:
        self._settle()
        return self.kv.view()

    def next_token_logits(self) -> np.ndarray:
        """The model's next-token logits for an assistant reply to the transcript as it is."""
        self._settle()
        decoded, _ = self._sync(self._render(add_assistant=True))
        ctx = self._ctx()
        if decoded == 0:  # logits are only current after a decode
            self.memory.redecode_last(ctx)
        return ctx.logits(-1)

    def stats(self) -> MemoryStats:
        self._settle()
        held, cached = self.kv.held, self.kv.cached
        size = self._ctx().state_size() if cached else 0
        if cached < held:  # the text after new slots takes what the cells before it do
            size += (held - cached) * size // max(1, cached)
        full = self.kv.text_tokens
        n_comp = len(self.engine.ccm.vectors) if self.engine.ccm is not None else 1
        merged = self.policy.merges
        return MemoryStats(
            method=self.compression.method,
            memory_tokens=held,
            memory_bytes=size,
            full_context_tokens=full,
            full_context_bytes=full * self.engine.model.f16_bytes_per_token,
            context_window=self.engine.n_ctx,
            verbatim_exchanges=len(self.memory.exchanges),
            compressed_exchanges=self.kv.groups if merged else self.kv.slots // n_comp,
        )

    def rebuild(self, progress: Progress | None = None) -> None:
        """Recompute the memory from the messages.

        How is the policy's to say (`MemoryPolicy.rebuilds`): one that keeps whole tokens
        (full, window) has only those it would hold decoded, in one batch; one that
        transforms them (CCM) is replayed turn by turn, as if chatted live.
        """
        self._settle()
        self.memory.reset()
        total = len(self.messages)
        if self.policy.rebuilds == "prefill":  # nothing is evicted: one batch is the same
            self._sync(self._render(add_assistant=False), progress)
        elif self.policy.rebuilds == "kept":
            self.memory.prefill_kept(self._render(add_assistant=False))
        else:
            for i in range(1, total + 1):
                self._sync(self._render(add_assistant=False, upto=i))
                if self.messages[i - 1].role == "assistant":
                    self._end_turn()
                if progress is not None:
                    progress(i, total)
        if progress is not None:
            progress(total, total)


    def _render(self, add_assistant: bool, upto: int | None = None) -> Rendered:
        return render(self.engine.model, self.messages[:upto], add_assistant)

    def save_state(self) -> bytes:
        """The memory as bytes: restoring them continues exactly here, with no re-prefill
        (engine.conversation_state: what the header binds the KV cells to)."""
        self._settle()
        return conversation_state.save_state(self)

    @classmethod
    def from_state(cls, engine: Engine, data: bytes,
                   transcript: Sequence[tuple[str, str]] | None = None) -> Conversation:
        """The conversation a `save_state` blob holds, checked before it is trusted
        (engine.conversation_state). `transcript`: the (role, content) pairs it must stand
        for a prefix of."""
        return conversation_state.from_state(cls, engine, data, transcript)

    # -- the engine's one context ----------------------------------------------------------------

    def _ctx(self):
        return self.engine.activate(self)

    def park(self) -> None:
        """Move this conversation's KV out of the shared context into bytes."""
        self.memory.park()

    def unpark(self) -> None:
        self.memory.unpark()

    def _sync(self, target: Rendered, progress: Progress | None = None,
              cancel: threading.Event | None = None) -> tuple[int, float]:
        """Make the KV cache hold exactly `target` (KVMemory.sync); return (tokens decoded,
        seconds)."""
        if self._recall_prompt is not None and not target.text.startswith(
                self._recall_prompt.text):
            self._recall_prompt = None  # the sync drops the recalled cells
        return self.memory.sync(target, self.rebuild, progress, cancel)

    # -- recall: earlier exchanges brought back for one turn (engine.recall) ---------------------

    def _prompt(self) -> Rendered:
        """The chat up to the assistant's header, with the earlier exchanges the last user
        message asks about, which the memory no longer holds verbatim, just before it."""
        plain = self._render(add_assistant=True)
        self.last_recall = None
        last = self.messages[-1] if self.messages else None
        if not (self.recall and self.recall_tokens > 0 and last and last.role == "user"):
            return plain
        texts = forgotten(self.messages[:-1], plain.plain, self.kv.frozen)
        # what the context has room for beside the memory, the new text (bytes: at least its
        # tokens) and a reply's first cells: recall never makes the memory evict
        room = (self.engine.n_ctx - 1 - self.held - GENERATION_HEADROOM
                - (len(plain.text) - len(self.kv.rendered)))
        share = min(self.recall_tokens, room)
        if not texts or share <= 0:
            return plain
        model = self.engine.model
        found = choose(self._index, last.content, texts, share,
                       lambda text: len(model.tokenize(text.encode(), False, False)))
        if not found.exchanges:
            return plain
        note = ChatMessage("system", recall_message([texts[i] for i in found.exchanges]))
        prompt = render(model, [*self.messages[:-1], note, last], True)
        before = self._render(add_assistant=False, upto=-1).text
        if not (prompt.text.startswith(before) and plain.text.startswith(before)):
            log.debug("No recall: the template would move the text the memory holds.")
            return plain  # a template that would move the held text: no recall, no rollback
        self.last_recall = found
        self._recall_prompt = prompt
        return prompt

    def _forget_recall(self, add_assistant: bool) -> None:
        """The recalled exchanges leave the cache, which then holds what it would have held
        had they never come: the text after them is decoded again in their place."""
        if self._recall_prompt is not None:
            self._sync(self._render(add_assistant=add_assistant))

    def _end_turn(self) -> None:
        """An exchange is finished: mark where its text ends, then let the policy work."""
        self.memory.end_exchange()

    # -- a reply's steps (engine.reply drives them) ----------------------------------------------

    def read_prompt(self, cancel: threading.Event | None) -> tuple[int, float]:
        """Read the prompt in (with what recall brings back) before a reply; return (tokens
        decoded, seconds). CancelledError when `cancel` stops it: the memory is as it was."""
        return self._sync(self._prompt(), cancel=cancel)

    def sampler(self, params: SamplingParams, redecode: bool) -> Sampler:
        """A sampler for the reply. `redecode`: the prompt decoded nothing, so the last cell
        is decoded again first (logits are only current after a decode)."""
        ctx = self._ctx()
        if redecode:
            self.memory.redecode_last(ctx)
        return ctx.sampler(params)

    def room_for_token(self) -> bool:
        """Whether one more token fits, the policy making room if it must (a reply that
        fills the context: GENERATION_HEADROOM cells at once, else one)."""
        ctx = self._ctx()
        return self.held + 1 <= ctx.n_ctx - 1 or (
            self.policy.make_room(
                self.memory, min(GENERATION_HEADROOM, ctx.n_ctx // 4), ctx.n_ctx - 1)
            or self.policy.make_room(self.memory, 1, ctx.n_ctx - 1)
        )

    def step(self, sampler: Sampler) -> bytes | None:
        """Sample the next token of the reply and decode it into the memory; return its
        text, or None at the end of generation (nothing decoded)."""
        ctx = self._ctx()
        if self.kv.undecoded:  # text a compression to make room moved: its logits
            self.memory.catch_up(ctx)
        token = sampler.sample(ctx)
        model = self.engine.model
        if model.is_end_of_generation(token):
            return None
        piece = model.piece(token, special=True)
        ctx.decode([token], self.held)
        self.kv.rendered += piece
        self.kv.record(token, len(self.kv.rendered))
        return piece

    def end_reply(self, reply: Reply) -> None:
        """The reply joins the transcript and the policy does its work on the exchange."""
        text = "".join(reply.pieces) + reply.tail
        self.messages.append(ChatMessage("assistant", text))
        if self._pending is reply:
            self._pending = None
        if reply.prompt_read and not reply.failed:
            try:
                self._forget_recall(add_assistant=False)
            except ContextFullError as exc:
                log.info("The recalled exchanges stay in the memory for now (%s).", exc)
        if self.policy.reads_finished_exchange:
            # after a failed decode the cache is left for a rebuild; after a prompt not read
            # in (cancelled), for the next message's sync
            if reply.prompt_read and not reply.failed:
                # the reply's end-of-turn marker, which generation stops before, goes in
                # too: a compressor was trained on exchanges as the template renders them
                try:
                    self._sync(self._render(add_assistant=False))
                except ContextFullError as exc:
                    log.info("The reply's end-of-turn marker did not fit (%s).", exc)
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
